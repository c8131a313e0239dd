"""Retrain a registered concept version from what it recorded, in a fresh folder, and compare.

``reproduce(uri, reference, out)`` needs only the registry and the DVC remote (plus a checkout
of the project when the base model is a project folder such as ``assets/toy-base``):

1. the version's config slice: its ``config.train`` tag, else the catalog at the recorded git
   revision (``git show <rev>:catalog.yaml`` in the project checkout);
2. the base model: resolved like ``conceptflow sample`` does (``serving.base_model``) and its
   content hash checked against ``base_model_hash``;
3. a one-concept project in ``out``: ``catalog.yaml`` with the recorded settings (the base model
   id kept as it was recorded, so the config hash is the recorded one; a project-relative base
   is linked into ``out``), the ingested images and masks pulled by md5 from the DVC remote
   (``dvc.images.md5``, ``dvc.masks.md5``: every file of the folder, manifests included);
4. the train stage, forced; then its folder against the recorded adapter folder
   (``dvc.adapter.md5``): file by file, and on a differing ``adapter.safetensors`` tensor by
   tensor.

The code that trains is the code installed here; the recorded revision is reported beside the
running one (run from a checkout of that revision for a like-for-like rebuild). The DVC remote
is read as a local folder (DVC 3 layout, ``serving.dvc_remote``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from conceptflow.errors import ConceptflowError
from conceptflow.fileio import file_md5
from conceptflow.provenance.chain import resolve_version
from conceptflow.serving.dvc_remote import folder_listing
from conceptflow.serving.reference import ModelReference, parse_model_reference

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class Reproduction:
    """What ``reproduce`` found: identical or not, the differing files and tensors."""

    name: str
    version: str
    folder: Path
    recorded_md5: str  # the recorded adapter.safetensors md5
    rebuilt_md5: str
    config_hash_recorded: str
    config_hash_rebuilt: str
    revision_recorded: str
    revision_running: str
    differing_files: list[str] = field(default_factory=list)
    differing_tensors: list[tuple[str, str]] = field(default_factory=list)  # (key, how it differs)

    @property
    def identical(self) -> bool:
        return self.recorded_md5 == self.rebuilt_md5


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return result.stdout if result.returncode == 0 else None


def _remote_object(remote: Path, md5: str) -> Path:
    for prefix in (Path("files") / "md5", Path()):
        candidate = Path(remote) / prefix / md5[:2] / md5[2:]
        if candidate.is_file():
            return candidate
    raise ConceptflowError(f"the DVC remote {remote} holds no object {md5}: was `dvc push` run after the pipeline "
                           "that registered this version?")


def pull_folder(remote: Path, md5: str, destination: Path) -> dict[str, str]:
    """Every file of DVC folder ``md5`` (hidden ones too: the stage manifest) into ``destination``,
    each checked against its md5; returns the listing {relative path: md5}."""
    listing = folder_listing(remote, md5)
    if destination.exists():
        shutil.rmtree(destination)
    for relative, file_hash in listing.items():
        source = _remote_object(remote, file_hash)
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        if file_md5(target) != file_hash:
            raise ConceptflowError(f"DVC object {source} is corrupt (md5 differs from {file_hash})")
    return listing


def recorded_config(tags: dict[str, str], name: str, project: Path | None) -> dict:
    """The train config slice the version recorded, else the one of the catalog at its git revision."""
    if tags.get("config.train"):
        return json.loads(tags["config.train"])
    revision = tags.get("git_revision", "").removesuffix("-dirty")
    text = _git(project, "show", f"{revision}:catalog.yaml") if project is not None and revision else None
    if text is None:
        raise ConceptflowError(f"concept.{name} recorded no config.train tag and git revision {revision or '?'} "
                               f"is not in {project or 'a project checkout'}: pass --project <checkout of it>")
    from conceptflow.config import Catalog
    from conceptflow.stages.table import stage

    raw = yaml.safe_load(text)
    raw["root"] = str(project)
    catalog = Catalog.model_validate(raw)
    return {part.key or "base_model_fingerprint": (part.value.model_dump(mode="json", exclude={"root"})
                                                   if hasattr(part.value, "model_dump") else part.value)
            for part in stage("train").config_slice(catalog, name)}


def _catalog_yaml(name: str, config: dict) -> dict:
    concept = {"class_word": config[f"concepts.{name}.class_word"], "images": f"data/concepts/{name}/images",
               "train": config[f"concepts.{name}.train"]}
    return {"project": f"reproduce-{name}", "base_model": config["base_model"], "device": "cpu",
            "dtype": config["dtype"], "resolution": config["resolution"], "seed": config["seed"],
            "concepts": {name: concept}}


def _differing_tensors(recorded: Path, rebuilt: Path) -> list[tuple[str, str]]:
    from safetensors.torch import load_file

    first, second = load_file(str(recorded)), load_file(str(rebuilt))
    found = [(key, "only in the recorded adapter") for key in sorted(set(first) - set(second))]
    found += [(key, "only in the rebuilt adapter") for key in sorted(set(second) - set(first))]
    for key in sorted(set(first) & set(second)):
        a, b = first[key], second[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append((key, f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"))
        elif not (a == b).all():
            difference = (a.float() - b.float()).abs()
            found.append((key, f"max |diff| {difference.max().item():.3g}, {int((difference > 0).sum())} of "
                               f"{difference.numel()} values differ"))
    return found


def reproduce(uri: str, reference: ModelReference | str, out: Path, remote: Path,
              project: Path | None = None, verify_base: bool = True) -> Reproduction:
    """Retrain ``reference`` (a concept version) in ``out`` and compare with the recorded adapter."""
    from conceptflow import __version__
    from conceptflow.config import load_catalog
    from conceptflow.serving.base_model import resolve_base_model
    from conceptflow.stages.table import stage
    from conceptflow.stages.train import train

    if isinstance(reference, str):
        reference = parse_model_reference(reference)
    if not reference.name.startswith("concept."):
        raise ConceptflowError(f"reproduce retrains a concept (concept.<name>/<version>), not {reference.name}: "
                               "reproduce the concepts a combination fused (`conceptflow lineage` lists them)")
    name = reference.name[len("concept."):]
    entry = resolve_version(uri, reference)
    tags = entry["tags"]
    for key in ("dvc.images.md5", "dvc.masks.md5", "dvc.adapter.md5"):
        if not tags.get(key, "").endswith(".dir"):
            raise ConceptflowError(f"{reference} recorded no DVC folder md5 {key!r} ({tags.get(key)!r}): "
                                   "it cannot be pulled from the DVC remote")
    remote = Path(remote)
    if not remote.is_dir():
        raise ConceptflowError(f"DVC remote {remote} is not a folder: pass --dvc-remote PATH")
    config = recorded_config(tags, name, project)

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = config["base_model"]
    relative_base = ":" not in base and not Path(base).is_absolute()
    source = resolve_base_model(base, tags.get("base_model_hash"), base if relative_base else None, project,
                                verify=verify_base)
    if relative_base:  # the recorded id, relative to the new project: a link to the checkout's folder
        link = out / base
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source, target_is_directory=True)
    (out / "catalog.yaml").write_text(yaml.safe_dump(_catalog_yaml(name, config), sort_keys=False))
    for label in ("images", "masks"):
        pull_folder(remote, tags[f"dvc.{label}.md5"], out / "data" / "concepts" / name / label)
    recorded_dir = out / "recorded" / name
    recorded = pull_folder(remote, tags["dvc.adapter.md5"], recorded_dir)

    catalog = load_catalog(out / "catalog.yaml")
    rebuilt_hash = f"{stage('train').config_hash(catalog, name)}:{__version__}"
    manifest, _ = train(catalog, name, force=True)
    rebuilt = {file.relative_to(manifest.path).as_posix(): file_md5(file)
               for file in sorted(Path(manifest.path).rglob("*")) if file.is_file()}
    differing = sorted(path for path in set(recorded) | set(rebuilt)
                       if recorded.get(path) != rebuilt.get(path) and not path.startswith("."))
    result = Reproduction(name=reference.name, version=entry["version"], folder=Path(manifest.path),
                          recorded_md5=recorded.get(ADAPTER_FILE, "missing"),
                          rebuilt_md5=rebuilt.get(ADAPTER_FILE, "missing"),
                          config_hash_recorded=tags.get("config_hash", ""), config_hash_rebuilt=rebuilt_hash,
                          revision_recorded=tags.get("git_revision", "unknown"),
                          revision_running=(_git(project, "rev-parse", "HEAD") or "unknown").strip()
                          if project is not None else "unknown",
                          differing_files=differing)
    if not result.identical and ADAPTER_FILE in recorded and ADAPTER_FILE in rebuilt:
        result.differing_tensors = _differing_tensors(recorded_dir / ADAPTER_FILE, Path(manifest.path) / ADAPTER_FILE)
    return result
