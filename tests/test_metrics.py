"""Metrics: formulas on known inputs, KID against its equation, encoders through the loader."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptflow.config import EvaluateConfig
from conceptflow.errors import CatalogError, ConceptflowError, DataError, ModelUnavailableError
from conceptflow.metrics.encoders import ImageEncoder, ImageTextEncoder, PerceptualDistance
from conceptflow.metrics.evaluate import evaluate_images, flatten_metrics, load_metric_encoders
from conceptflow.metrics.scores import (
    clip_i,
    clip_t,
    concepts_in_prompt,
    cosine_matrix,
    dino_score,
    kid,
    lpips_diversity,
    mean_pairwise_cosine,
    strip_concept_references,
)


def _noise_image(seed: int, size: int = 64, low: int = 0, high: int = 256) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(low, high, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def encoders():
    return load_metric_encoders(EvaluateConfig(), "cpu")


# --- formulas -----------------------------------------------------------------------------

def test_cosine_of_known_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    expected = torch.tensor([[1.0, 2 ** -0.5, 0.0], [0.0, 2 ** -0.5, -1.0]])
    torch.testing.assert_close(cosine_matrix(a, b), expected)
    assert mean_pairwise_cosine(a, b) == pytest.approx(expected.mean().item())
    assert clip_i(a, a) == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert dino_score(b[:1], b[:1] * 5) == pytest.approx(1.0)


def test_clip_t_pairs_rows_not_all_pairs():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert clip_t(images, texts) == pytest.approx((1.0 + 2 ** -0.5) / 2)
    with pytest.raises(ValueError):
        clip_t(images, texts[:1])


def test_lpips_diversity_is_mean_over_distinct_pairs():
    distances = torch.tensor([[0.0, 0.2, 0.4], [0.2, 0.0, 0.6], [0.4, 0.6, 0.0]])
    assert lpips_diversity(distances) == pytest.approx(0.4)


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor, degree=3, coef=1.0) -> float:
    """Bińkowski et al. 2018, Eq. 4, written out with loops as the reference."""
    gamma = 1.0 / x.shape[1]
    k = lambda u, v: (gamma * float(u @ v) + coef) ** degree  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_unbiased_mmd_equation():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    fake = torch.randn(6, 8, generator=generator, dtype=torch.float64) + 0.5
    mean, std = kid(real, fake, subsets=3)  # subset = all rows, so one subset suffices
    assert mean == pytest.approx(_unbiased_mmd2(real, fake), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_one_distribution_and_larger_for_two():
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(40, 16, generator=generator)
    same = torch.randn(40, 16, generator=generator)
    shifted = torch.randn(40, 16, generator=generator) + 1.0
    same_kid, _ = kid(real, same, subsets=20, subset_size=20)
    shifted_kid, _ = kid(real, shifted, subsets=20, subset_size=20)
    identical_kid, _ = kid(real, real, subsets=20, subset_size=20)
    # Unbiased: an independent sample scores ~0 either side. Reusing the very same rows scores
    # slightly negative (the k(x, x) terms are left out of the within-set sums but not across).
    assert shifted_kid > 1.0
    assert abs(same_kid) < 0.02 * shifted_kid
    assert -0.1 * shifted_kid < identical_kid < 0
    assert kid(real, shifted, subsets=5, subset_size=10) == kid(real, shifted, subsets=5, subset_size=10)
    with pytest.raises(ValueError):
        kid(real[:1], shifted)


# --- prompts -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a <dog> and a <cat> on the beach", "a dog and a cat on the beach"),
        ("a photo of <dog> dog", "a photo of dog"),
        ("<cat>", "cat"),
        ("a <dog> next to <dog>", "a dog next to dog"),
        ("a <teddy> in the snow", "a teddy bear in the snow"),
        ("a photo of a beach", "a photo of a beach"),
    ],
)
def test_strip_concept_references(prompt, expected):
    class_words = {"dog": "dog", "cat": "cat", "teddy": "teddy bear"}
    assert strip_concept_references(prompt, class_words) == expected


def test_unknown_concept_reference_is_a_user_error():
    with pytest.raises(CatalogError, match="<bird>"):
        strip_concept_references("a <bird> on a <dog>", {"dog": "dog"})
    assert concepts_in_prompt("<cat> and <dog> and <cat>") == ["cat", "dog"]


# --- encoders ----------------------------------------------------------------------------

def test_tiny_encoders_load_offline_and_embed(encoders):
    images = [_noise_image(0), _noise_image(1, size=48)]
    clip_images = encoders.clip.embed_images(images)
    clip_texts = encoders.clip.embed_texts(["a dog", "a cat on the beach " * 40])  # > 77 tokens
    dino_images = encoders.dino.embed_images(images)
    assert clip_images.shape == clip_texts.shape == (2, 32)
    assert dino_images.shape == (2, 32)
    for embeddings in (clip_images, clip_texts, dino_images):
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    # batching does not change an image's embedding
    torch.testing.assert_close(encoders.dino.embed_images(images[:1]), dino_images[:1])
    assert encoders.clip.model_id == "embedded:tiny-clip" and encoders.dino.model_id == "embedded:tiny-dino"


@pytest.mark.parametrize("encoder_class", [ImageTextEncoder, ImageEncoder])
def test_missing_model_names_the_id_and_the_fix(encoder_class, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelUnavailableError, match="no-such-model") as raised:
        encoder_class(missing)
    assert isinstance(raised.value, ConceptflowError)
    assert "local folder" in str(raised.value)


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(encoders):
    images = [_noise_image(0), _noise_image(0), _noise_image(2)]
    distances = encoders.lpips.pairwise(images)
    assert distances[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert distances[0, 2] > 1e-3 and distances[0, 2] == distances[2, 0]
    assert "alex" in encoders.lpips.describe()
    # seeded backbone: a second instance measures the same distance
    assert PerceptualDistance().pairwise(images)[0, 2] == pytest.approx(distances[0, 2].item(), rel=1e-5)


# --- the evaluate call -------------------------------------------------------------------

def test_generated_equal_to_references_scores_one(encoders):
    dog = [_noise_image(10), _noise_image(11)]
    cat = [_noise_image(20, low=100), _noise_image(21, low=100)]
    generated = [(dog[0], "a <dog>"), (dog[1], "a <dog>"), (cat[0], "a <cat>"), (cat[1], "a <cat>")]
    result = evaluate_images(generated, {"dog": dog, "cat": cat}, {"dog": "dog", "cat": "cat"},
                             encoders=encoders)
    for name in ("dog", "cat"):
        scores = result["per_concept"][name]
        # each generated image equals one of the two references: mean = (1 + cos(ref0, ref1)) / 2
        reference_dino = encoders.dino.embed_images(dog if name == "dog" else cat)
        expected = (1 + float(reference_dino[0] @ reference_dino[1])) / 2
        assert scores["dino"] == pytest.approx(expected, abs=1e-5)
        assert scores["n_generated"] == 2 and scores["n_references"] == 2
        assert scores["kid"] is not None and scores["lpips_diversity"] > 0
    json.dumps(result)  # JSON-serialisable as it is


def test_evaluate_multi_concept_structure(encoders):
    dog = [_noise_image(30), _noise_image(31), _noise_image(32)]
    cat = [_noise_image(40, low=128)]
    generated = [
        (_noise_image(50), "a <dog> and a <cat> on the beach"),
        (_noise_image(51), "a <dog> and a <cat> on the beach"),
        (_noise_image(52), "a <dog> in the snow"),
    ]
    result = evaluate_images(generated, {"dog": dog, "cat": cat}, {"dog": "dog", "cat": "cat"},
                             encoders=encoders)
    assert result["counts"] == {"generated": 3, "prompts": 2, "references": 4}
    assert result["per_concept"]["dog"]["n_generated"] == 3
    assert result["per_concept"]["cat"]["n_generated"] == 2
    assert result["per_concept"]["cat"]["kid"] is None  # one reference photo: no unbiased KID
    assert result["per_concept"]["dog"]["kid"] is not None
    # only the beach prompt has two images, and it mentions both concepts
    beach_diversity = result["per_concept"]["cat"]["lpips_diversity"]
    assert result["overall"]["lpips_diversity"] == pytest.approx(beach_diversity)
    overall = result["overall"]
    assert overall["dino"] == pytest.approx((result["per_concept"]["dog"]["dino"]
                                             + result["per_concept"]["cat"]["dino"]) / 2)
    assert result["encoders"]["clip"] == "embedded:tiny-clip"
    assert result["higher_is_better"]["kid"] is False
    flat = flatten_metrics(result)
    assert flat["clip_t"] == overall["clip_t"] and "cat/kid" not in flat and "dog/kid" in flat


def test_evaluate_rejects_prompts_without_references(encoders):
    with pytest.raises(DataError, match="cat"):
        evaluate_images([(_noise_image(0), "a <cat>")], {"dog": [_noise_image(1)]},
                        {"dog": "dog", "cat": "cat"}, encoders=encoders)
    with pytest.raises(DataError, match="generate"):
        evaluate_images([], {"dog": [_noise_image(1)]}, {"dog": "dog"}, encoders=encoders)
