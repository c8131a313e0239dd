"""The evaluate stage's library call: generated images + reference photos -> a metrics dict.

A generated image belongs to every concept its prompt references as ``<name>``. Per concept:
CLIP-T over its images, CLIP-I / DINO between its images and its own reference photos
(ConceptFlow §5 scores identity per concept in multi-concept images), KID between the two sets,
LPIPS diversity within each prompt's images. Overall: CLIP-T over all images, CLIP-I / DINO
averaged over concepts, KID of all generated vs all reference images, LPIPS diversity averaged
over prompts. A metric that cannot be computed (too few images) is ``None``.

The result is plain JSON (floats, ints, strings, None). Metrics that need grounded segmentation
(SegSim, omission/redundancy counts) slot into the same ``overall`` / ``per_concept`` dicts
under the names in ``HIGHER_IS_BETTER``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from conceptflow.config import EvaluateConfig
from conceptflow.errors import DataError
from conceptflow.metrics.encoders import ImageEncoder, ImageTextEncoder, PerceptualDistance
from conceptflow.metrics.scores import (
    clip_i,
    clip_t,
    concepts_in_prompt,
    dino_score,
    kid,
    lpips_diversity,
    strip_concept_references,
)

KID_SUBSETS = 100
# Direction of each metric, for "no worse than the champion" comparisons.
HIGHER_IS_BETTER = {
    "clip_t": True,
    "clip_i": True,
    "dino": True,
    "kid": False,
    "lpips_diversity": True,
    "segsim": True,  # not computed here yet: needs the grounded mask backends
    "omission_rate": False,  # not computed here yet
    "redundancy_rate": False,  # not computed here yet
}


@dataclass
class MetricEncoders:
    """The loaded networks; build once with ``load_metric_encoders`` and reuse across calls."""

    clip: ImageTextEncoder
    dino: ImageEncoder
    lpips: PerceptualDistance

    def describe(self) -> dict[str, str]:
        return {
            "clip": self.clip.model_id,
            "dino": self.dino.model_id,
            "lpips": self.lpips.describe(),
            "kid_features": f"CLIP image embeddings ({self.clip.model_id})",
        }


def load_metric_encoders(config: EvaluateConfig | None = None, device: str = "cpu") -> MetricEncoders:
    config = config or EvaluateConfig()
    return MetricEncoders(
        clip=ImageTextEncoder(config.clip_model, device),
        dino=ImageEncoder(config.dino_model, device),
        lpips=PerceptualDistance(device),
    )


def _check_inputs(generated, references, class_words) -> list[list[str]]:
    if not generated:
        raise DataError("nothing to evaluate: no generated images were given; run the generate stage first")
    for name, images in references.items():
        if not images:
            raise DataError(
                f"concept {name!r} has no reference images to compare with; add photos to its folder"
            )
    prompt_concepts = []
    for _, prompt in generated:
        names = concepts_in_prompt(prompt)
        missing = [n for n in names if n not in references]
        if missing:
            raise DataError(
                f"prompt {prompt!r} references {missing}, for which no reference images were given; "
                "evaluate them together with their concepts' images"
            )
        strip_concept_references(prompt, class_words)  # raises on unknown class words
        prompt_concepts.append(names)
    return prompt_concepts


def _kid_or_none(real: torch.Tensor, fake: torch.Tensor) -> tuple[float | None, float | None]:
    if min(len(real), len(fake)) < 2:
        return None, None
    return kid(real, fake, subsets=KID_SUBSETS)


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def evaluate_images(
    generated: Sequence[tuple[Image.Image, str]],
    references: dict[str, Sequence[Image.Image]],
    class_words: dict[str, str],
    config: EvaluateConfig | None = None,
    device: str = "cpu",
    encoders: MetricEncoders | None = None,
) -> dict:
    """Metrics of ``generated`` (image, prompt) pairs against each concept's ``references``.

    Args:
        generated: images with the catalog prompt (``<name>`` references) each was sampled from.
        references: concept name -> its real photos.
        class_words: concept name -> class word (for CLIP-T's prompt, e.g. ``{"dog": "dog"}``).
        config: which CLIP / DINO encoders to load (ignored when ``encoders`` is given).
        device: where the encoders run.
        encoders: already loaded encoders, to share them across calls.

    Returns:
        ``{"overall": {metric: value}, "per_concept": {name: {metric: value, "n_generated",
        "n_references"}}, "counts": {...}, "encoders": {...}, "higher_is_better": {...}}``.
    """
    prompt_concepts = _check_inputs(generated, references, class_words)
    encoders = encoders or load_metric_encoders(config, device)
    images = [image for image, _ in generated]
    prompts = [prompt for _, prompt in generated]

    generated_clip = encoders.clip.embed_images(images)
    generated_dino = encoders.dino.embed_images(images)
    text_clip = encoders.clip.embed_texts([strip_concept_references(p, class_words) for p in prompts])
    reference_clip = {name: encoders.clip.embed_images(refs) for name, refs in references.items()}
    reference_dino = {name: encoders.dino.embed_images(refs) for name, refs in references.items()}

    rows_by_prompt: dict[str, list[int]] = defaultdict(list)
    for row, prompt in enumerate(prompts):
        rows_by_prompt[prompt].append(row)
    diversity_by_prompt = {
        prompt: lpips_diversity(encoders.lpips.pairwise([images[r] for r in rows]))
        for prompt, rows in rows_by_prompt.items() if len(rows) >= 2
    }

    per_concept = {}
    for name in references:
        rows = [row for row, names in enumerate(prompt_concepts) if name in names]
        scores: dict = {"n_generated": len(rows), "n_references": len(references[name])}
        if rows:
            kid_mean, kid_std = _kid_or_none(reference_clip[name], generated_clip[rows])
            scores.update(
                clip_t=clip_t(generated_clip[rows], text_clip[rows]),
                clip_i=clip_i(generated_clip[rows], reference_clip[name]),
                dino=dino_score(generated_dino[rows], reference_dino[name]),
                kid=kid_mean,
                kid_std=kid_std,
                lpips_diversity=_mean_or_none(
                    [d for p, d in diversity_by_prompt.items() if name in concepts_in_prompt(p)]
                ),
            )
        else:
            scores.update(clip_t=None, clip_i=None, dino=None, kid=None, kid_std=None, lpips_diversity=None)
        per_concept[name] = scores

    all_reference_clip = torch.cat(list(reference_clip.values())) if reference_clip else torch.empty(0)
    kid_mean, kid_std = _kid_or_none(all_reference_clip, generated_clip)
    overall = {
        "clip_t": clip_t(generated_clip, text_clip),
        "clip_i": _mean_or_none([s["clip_i"] for s in per_concept.values()]),
        "dino": _mean_or_none([s["dino"] for s in per_concept.values()]),
        "kid": kid_mean,
        "kid_std": kid_std,
        "lpips_diversity": _mean_or_none(list(diversity_by_prompt.values())),
    }
    return {
        "overall": overall,
        "per_concept": per_concept,
        "counts": {
            "generated": len(generated),
            "prompts": len(rows_by_prompt),
            "references": sum(len(refs) for refs in references.values()),
        },
        "encoders": encoders.describe(),
        "higher_is_better": {k: v for k, v in HIGHER_IS_BETTER.items() if k in overall},
    }


def flatten_metrics(result: dict) -> dict[str, float]:
    """``evaluate_images``' output as flat ``{key: float}`` for MLflow: ``clip_t``, ``dog/clip_t``...

    Metrics that are ``None`` are left out (MLflow cannot log them).
    """
    flat = {key: float(value) for key, value in result["overall"].items() if value is not None}
    for name, scores in result["per_concept"].items():
        flat.update({f"{name}/{key}": float(value) for key, value in scores.items() if value is not None})
    return flat
