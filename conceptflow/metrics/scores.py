"""Metric formulas on embeddings, distance matrices and prompts (no model loading here).

Definitions follow the papers the project compares with:
- DINO score (DreamBooth, Ruiz et al. 2023; ConceptFlow §5): mean pairwise cosine between the
  DINO ViT-S/16 CLS embeddings of generated and real images.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine between each generated image and its own prompt's CLIP text embedding,
  with the concept references replaced by their class words (the CLIP text encoder was never
  tuned on the new tokens; Textual Localization §4.1 drops its identifier the same way).
- KID (Bińkowski et al. 2018): unbiased MMD² with the kernel k(x, y) = (γ xᵀy + c)^d, averaged
  over random subsets; computed by torchmetrics on features we pass in.
- LPIPS diversity (Textual Localization §4.1): mean pairwise LPIPS among images generated
  from the same prompt.
"""

from __future__ import annotations

import re
import warnings

import torch

from conceptflow.schema import CONCEPT_REFERENCE
from conceptflow.errors import CatalogError

KID_SEED = 0


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosines between the rows of ``a`` (N, D) and ``b`` (M, D); rows need not be unit length."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over every pair (i, j)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("mean_pairwise_cosine needs at least one row on each side")
    return cosine_matrix(a, b).mean().item()


def clip_t(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """CLIP-T: mean of cos(image_i, text_i) over paired rows (image i was generated from text i).

    This is the raw cosine. CLIPScore (Hessel et al. 2021) reports 2.5·max(cos, 0) and
    torchmetrics 100·max(cos, 0); multiply when comparing with numbers reported that way.
    """
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(
            f"clip_t pairs image i with text i; got {tuple(image_embeddings.shape)} images "
            f"and {tuple(text_embeddings.shape)} texts"
        )
    if len(image_embeddings) == 0:
        raise ValueError("clip_t needs at least one image")
    return torch.diagonal(cosine_matrix(image_embeddings, text_embeddings)).mean().item()


def clip_i(generated_embeddings: torch.Tensor, reference_embeddings: torch.Tensor) -> float:
    """CLIP-I: mean pairwise cosine of CLIP image embeddings, generated vs reference."""
    return mean_pairwise_cosine(generated_embeddings, reference_embeddings)


def dino_score(generated_embeddings: torch.Tensor, reference_embeddings: torch.Tensor) -> float:
    """DINO score: mean pairwise cosine of DINO CLS embeddings, generated vs reference."""
    return mean_pairwise_cosine(generated_embeddings, reference_embeddings)


def kid(
    real_features: torch.Tensor,
    generated_features: torch.Tensor,
    subsets: int = 100,
    subset_size: int | None = None,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = KID_SEED,
) -> tuple[float, float]:
    """KID (mean, std over subsets) of two feature sets, by torchmetrics' KernelInceptionDistance.

    torchmetrics takes any ``nn.Module`` as its feature extractor; we give it the identity and
    feed features we computed ourselves (no Inception weights needed). ``subset_size`` defaults
    to the smaller set's size (at least 2 each: the unbiased MMD² divides by m(m−1)); ``gamma``
    defaults to 1/D. Subsets are drawn with a fixed seed and without touching the global RNG.
    The estimator is unbiased, so equal distributions give values around 0, slightly negative
    as often as positive.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    largest = min(len(real_features), len(generated_features))
    if largest < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated feature rows; got "
                         f"{len(real_features)} and {len(generated_features)}")
    subset_size = largest if subset_size is None else subset_size
    if subset_size == len(real_features) == len(generated_features):
        subsets = 1  # every subset would be the whole of both sets, and MMD ignores row order
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=torch.nn.Identity(), subsets=subsets, subset_size=subset_size,
            degree=degree, gamma=gamma, coef=float(coef),
        )
    metric.update(real_features.double(), real=True)
    metric.update(generated_features.double(), real=False)
    # The kernels are small (subset_size² entries); intra-op threads only add synchronisation,
    # which on a busy CPU made a 100-subset KID ~20x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = metric.compute()
    finally:
        torch.set_num_threads(threads)
    return mean.item(), std.item()


def lpips_diversity(pairwise_distances: torch.Tensor) -> float:
    """Mean LPIPS over the distinct pairs of an (N, N) distance matrix (N ≥ 2)."""
    count = len(pairwise_distances)
    if count < 2:
        raise ValueError("lpips_diversity needs at least 2 images")
    first, second = torch.triu_indices(count, count, offset=1)
    return pairwise_distances[first, second].float().mean().item()


def concepts_in_prompt(prompt: str) -> list[str]:
    """The concept names a prompt references as ``<name>``, in order of first appearance."""
    return list(dict.fromkeys(CONCEPT_REFERENCE.findall(prompt)))


def strip_concept_references(prompt: str, class_words: dict[str, str]) -> str:
    """The prompt CLIP-T reads: every ``<name>`` becomes its class word.

    "a <dog> and a <cat> on the beach" -> "a dog and a cat on the beach". Where the class word
    already follows the reference ("a photo of <dog> dog"), the reference is simply dropped.
    """
    unknown = [name for name in concepts_in_prompt(prompt) if name not in class_words]
    if unknown:
        raise CatalogError(
            f"prompt {prompt!r} references {['<' + n + '>' for n in unknown]}, which are not concepts "
            f"of this evaluation (known: {sorted(class_words)}); add them to the catalog's concepts "
            "or fix the prompt"
        )

    def replace(match: re.Match) -> str:
        class_word = class_words[match.group(1)]
        following = prompt[match.end():].lstrip()
        if re.match(rf"{re.escape(class_word)}\b", following, flags=re.IGNORECASE):
            return ""
        return class_word

    stripped = CONCEPT_REFERENCE.sub(replace, prompt)
    return re.sub(r"\s+", " ", stripped).strip()
