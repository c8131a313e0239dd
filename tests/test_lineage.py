"""`conceptflow lineage` and `conceptflow reproduce` on a tiny registered project.

One project (embedded:tiny-sd, two toy concepts trained 2 steps — ED-LoRA and ConceptFlow-S —,
one combination, average fusion, the fused sampler at 2 steps) runs every stage in-process, is
recorded in DVC (pushed to its local remote) and registered in its SQLite store. Then, as
subprocesses: `lineage` prints the chain the tags and dvc.lock hold; `reproduce` in a fresh
`git clone` (no data/, no DVC cache: only the remote and the registry) retrains each concept
and finds its adapter bit-identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conceptflow.cli"]
FIRST, SECOND = "zigzag_star", "quartered_heart"
COMBO = f"{FIRST}+{SECOND}"


def _catalog() -> dict:
    concepts = {name: {"class_word": word, "images": f"photos/{name}",
                       "train": {"method": method, "steps": 2, "checkpoint_every": 2}}
                for name, word, method in ((FIRST, "star", "edlora"), (SECOND, "heart", "conceptflow_s"))}
    return {"project": "lineage-test", "base_model": "embedded:tiny-sd", "device": "cpu", "dtype": "float32",
            "resolution": 64, "seed": 0, "concepts": concepts,
            "combinations": {COMBO: {"concepts": [FIRST, SECOND], "prompts": [f"a <{FIRST}> and a <{SECOND}>"],
                                     "seeds": [0]}},
            "mask": {"backend": "auto"}, "fuse": {"method": "average"},
            "generate": {"sampler": "fused", "steps": 2, "batch_size": 1}, "evaluate": {}}


def cli(cwd: Path, *args: str, uri: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    result = subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"conceptflow {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from conceptflow.config import load_catalog
    from conceptflow.lineage import record_outputs
    from conceptflow.stages.register import register
    from conceptflow.stages.table import plan

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    project = tmp_path_factory.mktemp("registered")
    for name in (FIRST, SECOND):
        photos = project / "photos" / name
        photos.mkdir(parents=True)
        for stem in ("00", "01"):
            for suffix in (".png", ".txt"):
                shutil.copy(ROOT / "assets" / "toy-concepts" / name / f"{stem}{suffix}", photos)
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    (project / "catalog.yaml").write_text(yaml.safe_dump(_catalog(), sort_keys=False))
    (project / ".gitignore").write_text("data/\nmlruns.db\nmlartifacts/\n.dvc-remote/\n")
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *command], cwd=project, check=True)
    catalog = load_catalog(project / "catalog.yaml")
    for row, item in plan(catalog):
        row.call(catalog, item)
    record_outputs(project, push=True)
    previous_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        lines = register(catalog)
    finally:
        if previous_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_uri
    torch.set_num_threads(previous_threads)
    uri = f"sqlite:///{project / 'mlruns.db'}"
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {"project": project, "uri": uri, "lines": lines, "lock": lock}


def test_concept_lineage_prints_the_chain_in_order(registered):
    lock = registered["lock"]
    text = cli(registered["project"], "lineage", f"concept.{FIRST}@champion", uri=registered["uri"]).stdout
    chain = [lock[f"ingest@{FIRST}"]["outs"][0]["md5"], lock[f"mask@{FIRST}"]["outs"][0]["md5"], "config hash",
             f"concepts.{FIRST}.train = ", "-> code revision", "-> base model       embedded:tiny-sd", "-> base model hash",
             lock[f"train@{FIRST}"]["outs"][0]["md5"], f"concept.{FIRST}/1"]
    positions = [text.index(step) for step in chain]
    assert positions == sorted(positions), text
    assert '"method": "edlora"' in text and f"concept.{FIRST} version 1 @champion" in text


def test_combination_lineage_lists_its_concepts_with_their_chains(registered):
    lock = registered["lock"]
    text = cli(registered["project"], "lineage", f"combo.{COMBO}/1", uri=registered["uri"]).stdout
    assert lock[f"fuse@{COMBO}"]["outs"][0]["md5"] in text and '"method": "average"' in text
    fused_from = text.index("fused from:")
    for name in (FIRST, SECOND):
        assert text.index(f"concept.{name} version 1") > fused_from
        assert lock[f"train@{name}"]["outs"][0]["md5"] in text[fused_from:]


@pytest.mark.parametrize("reference, message", [
    ("concept.nobody@champion", "concept.nobody"),
    (f"concept.{FIRST}/9", "version 9"),
    (f"concept.{FIRST}@staging", "'staging'"),
    ("dog", "concept.<name> or combo."),
])
def test_unknown_names_versions_and_aliases_are_clear_errors(registered, reference, message):
    result = cli(registered["project"], "lineage", reference, uri=registered["uri"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("name", [FIRST, SECOND])
def test_reproduce_in_a_clean_clone_is_bit_identical(registered, tmp_path, name):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(registered["project"]), str(clone)], check=True)
    assert not (clone / "data").exists() and not (clone / ".dvc-remote").exists()
    out = tmp_path / "rebuilt"
    result = cli(clone, "reproduce", f"concept.{name}/1", "--out", str(out),
                 "--dvc-remote", str(registered["project"] / ".dvc-remote"), uri=registered["uri"])
    assert "bit-identical" in result.stdout, result.stdout
    from conceptflow.fileio import file_md5

    rebuilt = file_md5(out / "data" / "adapters" / name / "adapter.safetensors")
    original = file_md5(registered["project"] / "data" / "adapters" / name / "adapter.safetensors")
    assert rebuilt == original
    assert f"adapter md5  recorded {original}  rebuilt {original}" in result.stdout


def test_differing_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    from conceptflow.provenance.rebuild import _differing_tensors

    save_file({"a": torch.zeros(3), "b": torch.ones(2), "c": torch.ones(1)}, str(tmp_path / "recorded.safetensors"))
    save_file({"a": torch.zeros(3), "b": torch.tensor([1.0, 1.5]), "d": torch.ones(1)},
              str(tmp_path / "rebuilt.safetensors"))
    found = dict(_differing_tensors(tmp_path / "recorded.safetensors", tmp_path / "rebuilt.safetensors"))
    assert set(found) == {"b", "c", "d"}
    assert "max |diff| 0.5, 1 of 2" in found["b"] and "only in the recorded" in found["c"]


def test_dvc_calls_run_in_one_process_and_a_dvc_error_names_the_folder_and_call(tmp_path):
    """record_outputs' DVC calls (conceptflow.dvc_calls): the default remote added once, and a
    failure says which call failed where, with DVC's message."""
    import subprocess

    from conceptflow.errors import ConceptflowError
    from conceptflow.lineage import _dvc_calls, dvc_status_clean, ensure_dvc_repo

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    ensure_dvc_repo(tmp_path)
    config = (tmp_path / ".dvc" / "config").read_text()
    assert "remote = local" in config and "url = ../.dvc-remote" in config  # as `dvc remote add` writes it
    assert _dvc_calls(tmp_path, "default-remote") == {"default-remote": False}  # already there: unchanged
    assert (tmp_path / ".dvc" / "config").read_text() == config
    assert dvc_status_clean(tmp_path) is True  # no stages, nothing to report

    (tmp_path / "dvc.yaml").write_text("stages:\n  broken:\n    cmd: true\n")  # cmd must be a string
    with pytest.raises(ConceptflowError, match=rf"DVC failed in {tmp_path} \(status\): dvc status: .*dvc.yaml"
                                               r".* validation failed"):
        dvc_status_clean(tmp_path)
