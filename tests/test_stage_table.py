"""dvc.yaml agrees with the stage table (conceptflow/stages/table.py), and the table keeps the
config hashes the stages computed before it existed (the caching keys of outputs on disk).

``drift`` renders dvc.yaml's stages for each concept and combination of a catalog (``${key}``,
``${item.<field>}``) and lists every disagreement with the table: stage names and fan-out,
commands, deps (exactly the upstream outputs' folders, or their parent folder where DVC cannot
name a combination's own concepts, plus the stage's sources), params (the catalog keys of its
config slice) and outs (its Layout folder).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from conceptflow.config import Catalog, GenerateConfig, config_hash
from conceptflow.stages import table
from conceptflow.stages.table import STAGES, Stage

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
CATALOGS = [ROOT / "catalog.yaml", ROOT / "catalogs" / "dreambooth.yaml"]
FOREACH = {"${concepts}": "concept", "${combinations}": "combination"}
SENTINEL = "\0item"


def render(value, key: str | None, spec: dict | None):
    """dvc.yaml's ``do`` block for one foreach item: ``${key}`` and ``${item.<field>}`` filled in."""
    if isinstance(value, dict):
        return {k: render(v, key, spec) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, key, spec) for v in value]
    if not isinstance(value, str):
        return value

    def fill(match):
        name = match.group(1)
        if name == "key" and key is not None:
            return key
        if name.startswith("item.") and spec is not None:
            return str(spec[name[len("item."):]])
        raise AssertionError(f"dvc.yaml interpolates ${{{name}}}, which this test cannot render")

    return re.sub(r"\$\{([^}]+)\}", fill, value)


def rendered_stages(dvc: dict, raw: dict) -> dict[tuple[str, str | None], tuple[str, dict]]:
    """(stage, item) -> (fan-out, rendered definition) for every dvc.yaml stage and item."""
    out = {}
    for name, definition in dvc["stages"].items():
        if "foreach" in definition:
            fan_out = FOREACH.get(definition["foreach"], f"unknown foreach {definition['foreach']}")
            for key, spec in (raw.get(fan_out + "s") or {}).items():
                out[(name, key)] = (fan_out, render(definition["do"], key, spec or {}))
        else:
            out[(name, None)] = ("catalog", render(definition, None, None))
    return out


def relative(catalog: Catalog, path: Path) -> str:
    path = Path(path)
    return (path.relative_to(catalog.root) if path.is_absolute() else path).as_posix()


def collection(catalog: Catalog, row: Stage) -> str:
    """The folder above every item's output of ``row`` (data/adapters for data/adapters/<name>)."""
    parts = Path(relative(catalog, row.folder(catalog, SENTINEL))).parts
    return Path(*parts[:parts.index(SENTINEL)]).as_posix()


def expected_deps(catalog: Catalog, row: Stage, item: str | None, rows: dict[str, Stage]) -> list[str]:
    deps = [relative(catalog, path) for path in (row.sources(catalog, item) if row.sources else ())]
    for name in row.upstream:
        upstream = rows[name]
        same = upstream.fan_out == row.fan_out and row.fan_out != "catalog"
        deps.append(relative(catalog, upstream.folder(catalog, item)) if same else collection(catalog, upstream))
    return list(dict.fromkeys(deps))


def dvc_params(definition: dict) -> list[str]:
    keys = []
    for entry in definition.get("params", []):
        assert isinstance(entry, dict) and list(entry) == ["catalog.yaml"], f"params not from catalog.yaml: {entry}"
        keys += entry["catalog.yaml"]
    return keys


def drift(dvc: dict, raw: dict, catalog: Catalog, stages: tuple[Stage, ...] = STAGES) -> list[str]:
    """Every disagreement between a parsed dvc.yaml and the stage table, for one catalog."""
    rows = {row.name: row for row in stages}
    problems = []
    if list(dvc["stages"]) != list(rows):
        problems.append(f"stages: dvc.yaml has {list(dvc['stages'])}, the table {list(rows)}")
    rendered = rendered_stages(dvc, raw)
    for (name, item), (fan_out, definition) in rendered.items():
        row = rows.get(name)
        if row is None:
            continue
        where = f"{name}@{item}" if item else name
        if fan_out != row.fan_out:
            problems.append(f"{where}: dvc.yaml runs it per {fan_out}, the table per {row.fan_out}")
            continue
        cli = ["conceptflow", row.name, "--catalog", "catalog.yaml", *row.command(item).split()[1:]]
        if definition.get("cmd", "").split() != cli:
            problems.append(f"{where}: cmd {definition.get('cmd')!r}, expected {' '.join(cli)!r}")
        deps, wanted = definition.get("deps", []), expected_deps(catalog, row, item, rows)
        if sorted(deps) != sorted(wanted):
            problems.append(f"{where}: deps {deps}, expected {wanted}")
        params, keys = dvc_params(definition), list(row.params(catalog, item))
        if sorted(params) != sorted(keys) or len(set(params)) != len(params):
            problems.append(f"{where}: params {params}, expected {keys}")
        outs, folder = definition.get("outs", []), [relative(catalog, row.folder(catalog, item))]
        if outs != folder:
            problems.append(f"{where}: outs {outs}, expected {folder}")
    for row in stages:
        for item in (row.items(catalog) if row.fan_out != "catalog" else [None]):
            if row.name in dvc["stages"] and (row.name, item) not in rendered:
                problems.append(f"{row.name}@{item}: in the table, not in dvc.yaml")
    return problems


@pytest.fixture
def no_fingerprint(monkeypatch):
    """The base model's file fingerprint is no catalog key: skip hashing (or building) the model."""
    monkeypatch.setattr("conceptflow.models.loading.model_fingerprint", lambda model_id: "fingerprint")


def load(path: Path) -> tuple[dict, Catalog]:
    raw = yaml.safe_load(path.read_text())
    return raw, Catalog.model_validate({**raw, "root": str(ROOT)})


@pytest.mark.parametrize("path", CATALOGS, ids=lambda p: p.name)
def test_dvc_yaml_matches_the_stage_table(path, no_fingerprint):
    raw, catalog = load(path)
    assert drift(DVC_YAML, raw, catalog) == []


def _without(items: list, value) -> list:
    assert value in items
    return [item for item in items if item != value]


def test_drift_is_reported(no_fingerprint):
    """Each kind of drift, made on a copy of dvc.yaml or of the table, is caught."""
    raw, catalog = load(CATALOGS[0])
    stages = DVC_YAML["stages"]

    def changed(edit) -> list[str]:
        dvc = copy.deepcopy(DVC_YAML)
        edit(dvc["stages"])
        return drift(dvc, raw, catalog)

    def drop_param(s, stage, key):
        s[stage]["do"]["params"][0]["catalog.yaml"] = _without(stages[stage]["do"]["params"][0]["catalog.yaml"], key)

    assert any("fuse@" in p and "params" in p for p in changed(lambda s: drop_param(s, "fuse", "base_model")))
    assert any("params" in p
               for p in changed(lambda s: s["evaluate"]["do"]["params"][0]["catalog.yaml"].append("seed")))
    assert any("evaluate@" in p and "deps" in p
               for p in changed(lambda s: s["evaluate"]["do"].update(deps=["data/generated/${key}"])))
    assert any("deps" in p for p in changed(lambda s: s["train"]["do"]["deps"].append("data/fused")))
    assert any("outs" in p for p in changed(lambda s: s["generate"]["do"].update(outs=["data/images/${key}"])))
    assert any("report" in p and "params" in p for p in changed(lambda s: s["report"].pop("params")))
    assert any("stages" in p for p in changed(lambda s: s.update(extra={"cmd": "true"})))
    assert any("stages" in p for p in changed(lambda s: s.pop("mask")))
    assert any("runs it per combination" in p
               for p in changed(lambda s: s.update(mask={**s["mask"], "foreach": "${combinations}"})))
    assert any("cmd" in p for p in changed(lambda s: s["ingest"]["do"].update(cmd="conceptflow mask --concept ${key}")))

    # ... and drift of the table: an upstream, a config part or a folder dvc.yaml does not list
    by_name = {row.name: row for row in STAGES}

    def with_row(**update) -> tuple[Stage, ...]:
        name = update.pop("name")
        return tuple(dataclasses.replace(row, **update) if row.name == name else row for row in STAGES)

    assert drift(DVC_YAML, raw, catalog, with_row(name="generate", upstream=("fuse", "train")))
    extra = by_name["evaluate"].config
    with_seed = with_row(name="evaluate", config=lambda c, i: (*extra(c, i), table.Part("seed", c.seed)))
    assert drift(DVC_YAML, raw, catalog, with_seed)
    assert drift(DVC_YAML, raw, catalog, with_row(name="fuse", layout="generated"))


def catalog_value(catalog: Catalog, key: str):
    head, _, rest = key.partition(".")
    if head in ("concepts", "combinations"):
        name, _, field = rest.partition(".")
        entry = catalog.concept(name) if head == "concepts" else catalog.combination(name)
        return getattr(entry, field) if field else entry
    return getattr(catalog, key)


def raw_has(raw: dict, key: str) -> bool:
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("path", CATALOGS, ids=lambda p: p.name)
def test_config_slices_hash_what_their_params_name(path, no_fingerprint):
    """A part keyed ``fuse`` hashes the catalog's ``fuse``; DVC needs every key in the file."""
    raw, catalog = load(path)
    for row in STAGES:
        for item in row.items(catalog):
            for part in row.config_slice(catalog, item):
                if part.key is not None:
                    assert part.value == catalog_value(catalog, part.key), (row.name, part.key)
                    assert raw_has(raw, part.key), f"{path.name} has no {part.key} (dvc.yaml params of {row.name})"


def test_config_hashes_are_unchanged():
    """The hashes each stage computed before the table existed (its own config_hash call)."""
    from conceptflow.models.loading import model_fingerprint

    catalog = load(CATALOGS[0])[1]
    concept, combination = catalog.concepts[0], catalog.combinations[0]
    fingerprint = model_fingerprint(catalog.base_model_source)
    before = {
        "ingest": config_hash(catalog.resolution),
        "mask": config_hash(catalog.mask, concept.class_word),
        "train": config_hash(concept.train, concept.class_word, catalog.base_model, fingerprint, catalog.seed,
                             catalog.resolution, catalog.dtype),
        "fuse": config_hash(catalog.fuse, catalog.base_model, catalog.seed, catalog.resolution),
        "generate": config_hash(catalog.generate, combination, catalog.resolution),
        "evaluate": config_hash(catalog.evaluate),
        "report": catalog.project,
    }
    items = {"concept": concept.name, "combination": combination.name, "catalog": None}
    assert {row.name: row.config_hash(catalog, items[row.fan_out]) for row in STAGES} == before
    # generate --sampler: the catalog's settings with the sampler replaced, re-validated
    sampled = GenerateConfig.model_validate({**catalog.generate.model_dump(exclude_unset=True), "sampler": "fused"})
    assert table.generate_settings(catalog, "fused") == sampled
    assert table.stage("generate").config_hash(catalog, combination.name, sampler="fused") == config_hash(
        sampled, combination, catalog.resolution)


def test_plan_runs_each_concept_then_each_combination(no_fingerprint):
    raw, catalog = load(CATALOGS[0])
    first, second = (c.name for c in catalog.concepts)
    combination = catalog.combinations[0].name
    jobs = [(row.name, item) for row, item in table.plan(catalog, table.needed_for("generate"), (combination,))]
    assert jobs == [("ingest", first), ("mask", first), ("train", first), ("ingest", second), ("mask", second),
                    ("train", second), ("fuse", combination), ("generate", combination)]
    assert [row.name for row in table.needed_for("evaluate")] == ["ingest", "mask", "train", "fuse", "generate",
                                                                  "evaluate"]




def test_base_model_fingerprint_is_read_once_per_file_version(tmp_path, monkeypatch):
    import os

    from conceptflow.models import loading

    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "model.safetensors"
    weights.write_bytes(b"weights")
    (tmp_path / "model_index.json").write_text("{}")
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real(self))
    first = loading.model_fingerprint(str(tmp_path))
    assert loading.model_fingerprint(str(tmp_path)) == first and len(reads) == 2  # two files, read once
    weights.write_bytes(b"other weights")
    assert loading.model_fingerprint(str(tmp_path)) != first and len(reads) == 4
    weights.write_bytes(b"weights")  # the first bytes again, at another mtime: read again, the first fingerprint
    os.utime(weights, ns=(5, 5))
    assert loading.model_fingerprint(str(tmp_path)) == first and len(reads) == 6
