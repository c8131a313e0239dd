"""Catalog validation: the forms users write, and errors that name the file and the fix."""

import pytest

from conceptflow.config import EMBEDDED_BASE, load_catalog
from conceptflow.errors import CatalogError

GOOD = """
concepts:
  dog: {class_word: dog, images: photos/dog}
  cat: {class_word: cat, images: photos/cat, train: {method: conceptflow_s, steps: 5}}
combinations:
  dog+cat: {concepts: [dog, cat], prompts: ["a <dog> and a <cat>"]}
"""


def write(tmp_path, text):
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


def test_mapping_form_and_defaults(tmp_path):
    catalog = load_catalog(write(tmp_path, GOOD))
    assert [c.name for c in catalog.concepts] == ["dog", "cat"]
    assert catalog.concept("cat").train.method == "conceptflow_s"
    assert catalog.concept("dog").train.method == "edlora"
    assert catalog.combination("dog+cat").concepts == ("dog", "cat")
    assert catalog.base_model == EMBEDDED_BASE
    assert catalog.images_dir(catalog.concept("dog")) == tmp_path / "photos" / "dog"
    assert catalog.concept("dog").tokens == ("<dog1>", "<dog2>")


def test_default_catalog_is_valid():
    from pathlib import Path

    catalog = load_catalog(Path(__file__).resolve().parents[1] / "catalog.yaml")
    assert catalog.combinations and len(catalog.concepts) >= 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("concepts:\n  Dog!: {class_word: dog, images: x}\n", "must match"),
        ("concepts:\n  dog: {class_word: dog, images: x}\ncombinations:\n  c: {concepts: [dog, cow], prompts: [a]}\n",
         "unknown concepts ['cow']"),
        ("concepts:\n  dog: {class_word: dog, images: x}\ncombinations:\n  c: {concepts: [dog], prompts: ['a <cat>']}\n",
         "references ['cat']"),
        ("concepts:\n  dog: {class_word: dog, images: x, train: {method: dreambooth}}\n", "method"),
        ("concepts: [\n", "not valid YAML"),
        ("concepts:\n  dog: {class_word: dog, images: x, colour: red}\n", "colour"),
    ],
)
def test_errors_name_the_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_missing_catalog(tmp_path):
    with pytest.raises(CatalogError, match="--catalog"):
        load_catalog(tmp_path / "nope.yaml")


def test_base_model_folder_resolves_against_the_catalog(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    for base, expected in [("models/base", str((tmp_path / "models" / "base").resolve())),
                           ("embedded:tiny-sd", "embedded:tiny-sd"),
                           ("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")]:
        catalog = load_catalog(write(tmp_path, f"base_model: {base}\n" + GOOD))
        assert catalog.base_model_source == expected
        assert catalog.base_model == base  # lineage and cache keys keep what the user wrote
