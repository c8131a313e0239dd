"""The embedded base tokenises exactly like open_clip (and so like real SD 1.x)."""

import pytest

from conceptflow.models.tokenizer import build_clip_tokenizer

PROMPTS = [
    "a photo of a dog",
    "A DOG, on the beach!! (at sunset)",
    "naïve café résumé — 東京 🐶",
    "a sks dog in the style of van gogh's 'starry night'",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_reference_prompt_ids(tokenizer):
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_open_clip(tokenizer, prompt):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    expected = [49406] + reference.encode(prompt) + [49407]
    assert tokenizer(prompt).input_ids == expected


def test_vocabulary_size_and_padding(tokenizer):
    assert len(tokenizer) == 49408
    padded = tokenizer("a dog", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_embedded_base_uses_it(tiny_pipeline):
    assert tiny_pipeline.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
