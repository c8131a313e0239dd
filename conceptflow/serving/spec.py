"""What a registered version needs to sample by itself: ``ServingSpec``, written at registration.

Registration stores it as the pyfunc model's ``model_config`` (the ``MLmodel`` file), beside
the version's adapter folder (``artifacts/adapter``); ``conceptflow sample`` and the pyfunc
model both read it from there. No catalog is needed afterwards:

* ``kind`` (``concept`` | ``combo``), ``name`` (the catalog's concept or combination name) and
  ``concepts``: the concept names prompts may reference as ``<name>`` (a combination's concepts
  in catalog order, as the generate stage passes them; a concept is its own list);
* the base model: ``base_model`` (the catalog's id), ``base_model_hash`` (its content hash) and
  ``base_model_path`` (project-relative folder, or None); see ``serving.base_model``;
* how the generate stage sampled: ``resolution``, ``dtype`` and ``generate`` (the catalog's
  generate settings as written, so a sampler override gets that sampler's defaults);
* the adapter's identity: ``artifact_md5`` (the DVC md5 from dvc.lock, the version's
  ``artifact.md5`` tag) and ``content_md5`` (``fileio.content_md5`` of the files logged,
  hidden files aside), which the fetched copy must match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from conceptflow.adapters.concept_io import read_adapter
from conceptflow.config import Catalog, GenerateConfig
from conceptflow.errors import ConceptflowError
from conceptflow.fileio import content_md5
from conceptflow.serving.base_model import git_toplevel, project_relative_path


@dataclass(frozen=True)
class ServingSpec:
    kind: str
    name: str
    concepts: list[str]
    base_model: str
    base_model_hash: str
    base_model_path: str | None
    resolution: int
    dtype: str
    artifact_md5: str
    content_md5: str
    generate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ServingSpec":
        known = {f.name for f in fields(cls)}
        missing = known - set(data) - {"generate"}
        if missing:
            raise ConceptflowError(f"the model's serving config lacks {sorted(missing)}: re-register it "
                                   "with `conceptflow register`")
        return cls(**{key: value for key, value in data.items() if key in known})

    def settings(self, sampler: str | None = None, steps: int | None = None, guidance_scale: float | None = None,
                 batch_size: int | None = None) -> GenerateConfig:
        """The generate settings recorded at registration with the given overrides (a new sampler
        gets its own default steps unless the catalog set steps or ``steps`` is given)."""
        raw = dict(self.generate)
        overrides = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "batch_size": batch_size}
        raw.update({key: value for key, value in overrides.items() if value is not None})
        try:
            return GenerateConfig.model_validate(raw)
        except ValueError as error:
            raise ConceptflowError(f"sampling settings {overrides}: {error}") from None


def spec_for(kind: str, folder: Path, catalog: Catalog, lineage: dict) -> ServingSpec:
    """The spec of a concept's adapter folder or a combination's fused folder at registration."""
    meta = read_adapter(folder)[1]
    concepts = list(meta["concepts"]) if kind == "combo" else [meta.get("name", "")]
    root = git_toplevel(catalog.root) or catalog.root
    return ServingSpec(
        kind=kind, name=str(meta.get("name", "")), concepts=concepts,
        base_model=catalog.base_model, base_model_hash=str(lineage.get("base_model_hash", "")),
        base_model_path=project_relative_path(catalog.base_model_source, root),
        resolution=catalog.resolution, dtype=catalog.dtype,
        artifact_md5=str(lineage.get("artifact.md5", "")), content_md5=content_md5(folder),
        generate=catalog.generate.model_dump(mode="json", exclude_unset=True),
    )
