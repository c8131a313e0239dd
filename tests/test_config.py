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


@pytest.mark.parametrize("name", ["dog+cat", "My-Combo_2", "a", "9lives"])
def test_combination_names_that_stay_accepted(tmp_path, name):
    text = GOOD.replace("  dog+cat: {concepts", f"  {name}: {{concepts")
    assert load_catalog(write(tmp_path, text)).combinations[0].name == name


def test_problems_are_listed_together_and_name_the_item(tmp_path):
    text = GOOD.replace('prompts: ["a <dog> and a <cat>"]}', 'prompts: ["a <dog>"], seeds: [-1, 2, 2]}')
    text = text.replace("  dog+cat: {concepts: [dog, cat]", "  dog+cat: {concepts: [dog, dog]")
    with pytest.raises(CatalogError) as error:
        load_catalog(write(tmp_path, text))
    message = str(error.value)
    assert "2 problems" in message
    assert "combinations.dog+cat.concepts: concepts ['dog'] are listed more than once" in message
    assert "combinations.dog+cat.seeds: seed -1 is outside 0..4294967295" in message


def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path):
    path = write(tmp_path, GOOD + "combinations:\n  x: {concepts: [dog], prompts: [a]}\n")
    with pytest.raises(CatalogError, match=r"line 7: the key 'combinations' is written twice .*first on line 5"):
        load_catalog(path)


def test_layout_keeps_every_output_in_its_stage_folder(tmp_path):
    from types import SimpleNamespace

    from conceptflow.layout import Layout

    layout = Layout(SimpleNamespace(root=tmp_path))
    assert layout.fused("dog+cat") == tmp_path / "data" / "fused" / "dog+cat"
    for method in (layout.images, layout.masks, layout.adapter, layout.fused, layout.generated, layout.metrics,
                   layout.checkpoints):
        for name in ("../ESCAPED", "a/b", "..", ".", "", "/etc"):
            with pytest.raises(CatalogError, match="name"):
                method(name)
    assert not list(tmp_path.iterdir())  # nothing was created


def test_validate_catalog_lists_every_run_time_problem(tmp_path):
    from conceptflow.validation import validate_catalog

    (tmp_path / "photos" / "dog").mkdir(parents=True)
    text = "base_model: ./nope\ndevice: gpu\nevaluate: {toy_evaluators: evals}\n" + GOOD
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as error:
        validate_catalog(load_catalog(path), path)
    message = str(error.value)
    for field in ("base_model:", "device:", "evaluate.toy_evaluators:", "concepts.cat.images:"):
        assert f"  - {field}" in message, message
    assert message.startswith(f"{path}: 4 problems")


LAYOUT = """
concepts:
  dog: {class_word: dog, images: photos/dog}
  cat: {class_word: cat, images: photos/cat}
combinations:
  dog+cat: {concepts: [dog, cat], prompts: ["a <dog> and a <cat>"], LAYOUT}
"""


def test_combination_layout_boxes_are_checked_and_unset_layouts_keep_the_hash(tmp_path):
    from conceptflow.config import config_hash

    boxed = load_catalog(write(tmp_path, LAYOUT.replace("LAYOUT", "layout: {dog: [0, 0, 0.5, 1], cat: [0.5, 0, 1, 1]}")))
    assert boxed.combination("dog+cat").layout == {"dog": (0.0, 0.0, 0.5, 1.0), "cat": (0.5, 0.0, 1.0, 1.0)}
    plain = load_catalog(write(tmp_path, GOOD))
    # a combination without layout fields dumps (and hashes) as before the fields existed
    assert set(plain.combination("dog+cat").model_dump()) == {"name", "concepts", "prompts", "seeds"}
    assert config_hash(plain.combination("dog+cat")) != config_hash(boxed.combination("dog+cat"))
    for layout, message in (("layout: {dog: [0.6, 0, 0.5, 1], cat: [0.5, 0, 1, 1]}", "0 <= x0 < x1 <= 1"),
                            ("layout: {dog: [0, 0, 0.5, 1.5], cat: [0.5, 0, 1, 1]}", "0 <= y0 < y1 <= 1"),
                            ("layout: {dog: [0, 0, 0.5, 1]}", "missing: ['cat']"),
                            ("layout: {dog: [0, 0, 0.5, 1], cat: [0.5, 0, 1, 1], cow: [0, 0, 1, 1]}",
                             "unknown: ['cow']")):
        with pytest.raises(CatalogError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_catalog(write(tmp_path, LAYOUT.replace("LAYOUT", layout)))
