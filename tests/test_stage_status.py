"""The flow's pre-check: which items a run would skip, decided as each stage decides it."""

from __future__ import annotations

import yaml
from PIL import Image

from conceptflow.config import load_catalog
from conceptflow.stages.chain import make_combination
from conceptflow.stages.status import up_to_date_items
from conceptflow.stages.table import needed_for, plan
from conceptflow.toy.concepts import write_toy_catalog


def test_up_to_date_items_match_what_the_stages_skip(tmp_path, one_torch_thread):
    path = write_toy_catalog(tmp_path, ["zigzag_star", "eye_heart", "flag_circle"], images_per_concept=2,
                             train_steps=1, combinations={"a": ("zigzag_star", "eye_heart"),
                                                          "b": ("eye_heart", "flag_circle")}, prompt_seeds=(0,))
    raw = yaml.safe_load(path.read_text())
    raw["generate"] = {"sampler": "fused", "steps": 1}
    raw["fuse"] = {"method": "average"}
    path.write_text(yaml.safe_dump(raw))
    catalog = load_catalog(path)
    jobs = plan(catalog, needed_for("generate"))
    assert up_to_date_items(catalog, jobs) == {}  # nothing made yet
    for name in ("a", "b"):
        make_combination(catalog, name)
    skipped = up_to_date_items(catalog, jobs)
    assert set(skipped) == {f"{row.name}:{item}" for row, item in jobs}
    for row, item in jobs:  # the stages agree: each finds itself up to date, with the same manifest
        manifest, ran = row.call(catalog, item)
        assert not ran and manifest.key == skipped[f"{row.name}:{item}"].key
    # one concept's photo changed: it and everything that reads it run; the rest stays skipped
    photo = tmp_path / "concepts" / "flag_circle" / "00.png"
    Image.open(photo).rotate(90).save(photo)
    skipped = up_to_date_items(catalog, jobs)
    pending = {f"{row.name}:{item}" for row, item in jobs} - set(skipped)
    assert pending == {"ingest:flag_circle", "mask:flag_circle", "train:flag_circle", "fuse:b", "generate:b"}
    # another sampler for generate: its key differs, so generate is not up to date
    assert "generate:a" not in up_to_date_items(catalog, jobs, {"sampler": "cones2_layout"})
