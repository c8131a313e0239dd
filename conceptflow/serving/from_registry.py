"""Generate from a registry name: fetch a version's pyfunc model, check its bytes, sample it.

Where the bytes come from, and what they must be:

* **The registry says which version a name means** (alias or number) and serves its files:
  the version's source is the run's ``pyfunc/`` model, holding the stage folder (adapter or
  fused model) as ``artifacts/adapter`` and its ``ServingSpec`` (base model id, hash and path,
  sampling settings).
* **The DVC md5 is the identity of those bytes.** The spec and the version's ``artifact.md5``
  tag carry the md5 DVC recorded in dvc.lock. The fetched folder must match the spec's
  ``content_md5`` (always), and, when a DVC remote is known (given, or the project's default
  local remote), must be exactly the visible files of that DVC folder object; with
  ``from_dvc=True`` the folder is read from the DVC remote instead of the registry's copy
  (the registry then supplies only the version's spec).

Nothing of the catalog or the training data is read; the base model is resolved from the spec
(``serving.base_model``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from conceptflow.errors import RegistryError
from conceptflow.fileio import content_md5
from conceptflow.registry import PYFUNC_PATH, lookup
from conceptflow.serving import dvc_remote
from conceptflow.serving.base_model import resolve_base_model
from conceptflow.serving.generation import ServedModel, sample_requests, write_images
from conceptflow.serving.reference import ModelReference
from conceptflow.serving.spec import ServingSpec


@dataclass(frozen=True)
class FetchedVersion:
    """A version's files on this machine: the registry entry, its adapter folder and spec."""

    entry: dict
    adapter: Path
    spec: ServingSpec
    source: str  # "registry" or "dvc": where the adapter folder's bytes came from
    dvc_checked: bool  # the folder was compared with the DVC remote's record


def fetch_version(store: str, reference: ModelReference, workdir: Path, remote: Path | None = None,
                  from_dvc: bool = False) -> FetchedVersion:
    import mlflow.artifacts

    from conceptflow.serving.pyfunc import read_saved_model

    entry = lookup(store, reference.name, reference.alias, reference.version)
    if entry["source"] != f"runs:/{entry['run_id']}/{PYFUNC_PATH}":
        raise RegistryError(f"{reference.name} version {entry['version']} (source {entry['source']}) was registered "
                            "without the pyfunc model: run `conceptflow register` in the project to add a version "
                            "that has it")
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=entry["source"],
                                                         dst_path=str(Path(workdir) / "model"), tracking_uri=store))
    adapter, spec = read_saved_model(model_dir)
    dvc_md5 = spec.artifact_md5 if spec.artifact_md5.endswith(".dir") else None
    if from_dvc:
        if remote is None or dvc_md5 is None:
            raise RegistryError(f"{reference}: reading from DVC needs a DVC remote (--dvc-remote) and a version "
                                f"whose artifact.md5 is a DVC folder md5 (it is {spec.artifact_md5!r})")
        adapter = dvc_remote.materialise(remote, dvc_md5, Path(workdir) / "dvc-adapter")
    if content_md5(adapter) != spec.content_md5:
        raise RegistryError(f"{reference}: the fetched folder's md5 {content_md5(adapter)} is not the registered "
                            f"{spec.content_md5}; the artifact store's copy is damaged")
    checked = remote is not None and dvc_md5 is not None
    if checked:
        dvc_remote.check_folder(adapter, remote, dvc_md5)
    return FetchedVersion(entry, adapter, spec, "dvc" if from_dvc else "registry", checked)


def sample_registered(store: str, reference: ModelReference, prompts: Sequence[str], seeds: Sequence[int], out: Path,
                      sampler: str | None = None, steps: int | None = None, guidance_scale: float | None = None,
                      batch_size: int | None = None, project: Path | None = None, remote: Path | None = None,
                      from_dvc: bool = False, verify_base: bool = True, device: str = "cpu") -> dict:
    """Sample ``prompts`` x ``seeds`` from a registered version into ``out``; returns images.json's header."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "images.json").is_file():
        raise RegistryError(f"{out} exists and is not an earlier sample output (no images.json): choose an empty "
                            "or new folder, it is replaced")
    with tempfile.TemporaryDirectory(prefix="cf-sample-") as workdir:
        fetched = fetch_version(store, reference, Path(workdir), remote, from_dvc)
        spec = fetched.spec
        settings = spec.settings(sampler, steps, guidance_scale, batch_size)
        base = resolve_base_model(spec.base_model, spec.base_model_hash, spec.base_model_path, project, verify_base)
        model = ServedModel(fetched.adapter, spec, base, device)
        requests = sample_requests(prompts, seeds)
        result = model.sample(requests, settings)
    header = {"model": reference.name, "version": fetched.entry["version"], "reference": str(reference),
              "artifact_md5": spec.artifact_md5, "artifact_source": fetched.source, "dvc_checked": fetched.dvc_checked,
              "base_model": spec.base_model, "base_model_source": base, "base_model_hash": spec.base_model_hash,
              "base_verified": bool(verify_base and spec.base_model_hash), "resolution": spec.resolution}
    write_images(out, requests, result, settings, header)
    return header
