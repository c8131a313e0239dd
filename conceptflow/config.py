"""The catalog: which concepts to learn, how, and which combinations to generate.

Everything a run does is decided by one YAML file validated by these pydantic models; the
hash of the relevant part of it is part of every artifact's cache key and lineage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from conceptflow.errors import CatalogError
from conceptflow.methods import METHODS
from conceptflow.methods.conceptflow_s.config import ConceptFlowSTrainConfig
from conceptflow.methods.edlora.config import LoRATrainConfig
from conceptflow.sample import SAMPLERS
from conceptflow.sample.conceptflow_m.config import ConceptFlowMConfig
from conceptflow.schema import CONCEPT_NAME, CONCEPT_REFERENCE, StrictModel

__all__ = ["CONCEPT_NAME", "CONCEPT_REFERENCE", "Catalog", "Combination", "Concept", "ConceptFlowSTrainConfig",
           "LoRATrainConfig", "TrainConfig", "config_hash", "load_catalog"]

EMBEDDED_BASE = "embedded:tiny-sd"


def _train_config_union():
    """The discriminated union of every registered method's settings (``train.method`` picks one)."""
    configs = tuple(spec.config for spec in METHODS.values())
    return Annotated[Union[configs], Field(discriminator="method")] if len(configs) > 1 else configs[0]


TrainConfig = _train_config_union()


class Concept(StrictModel):
    name: str = Field(description="lower-case identifier; referenced in prompts as <name>")
    class_word: str = Field(description="the concept's class, e.g. 'dog'")
    images: Path = Field(description="folder of 3-5 photos of the concept (relative to the catalog)")
    train: TrainConfig = Field(default_factory=LoRATrainConfig, description="the training method and its settings; "
                               "method: one of conceptflow.methods.METHODS")

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, name: str) -> str:
        if not CONCEPT_NAME.match(name):
            raise ValueError(
                f"concept name {name!r} must match {CONCEPT_NAME.pattern} "
                "(lower-case letters, digits, underscores; starts with a letter)"
            )
        return name

    @property
    def tokens(self) -> tuple[str, str]:
        """The two new tokens that stand for this concept (ED-LoRA writes a concept as two)."""
        return (f"<{self.name}1>", f"<{self.name}2>")


class Combination(StrictModel):
    name: str = Field("", description="defaults to the concept names joined by '+'")
    concepts: tuple[str, ...] = Field(min_length=1)
    prompts: tuple[str, ...] = Field(min_length=1, description="prompts using <name> references")
    seeds: tuple[int, ...] = (0, 1)

    @model_validator(mode="after")
    def _default_name(self) -> "Combination":
        if not self.name:
            object.__setattr__(self, "name", "+".join(self.concepts))
        return self


class MaskConfig(StrictModel):
    backend: Literal["auto", "saliency", "grounded_sam", "rmbg"] = Field(
        "auto", description="auto: grounded_sam when its checkpoints are configured, else saliency"
    )
    groundingdino_config: str | None = None
    groundingdino_checkpoint: str | None = None
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"
    rmbg_model: str = "briaai/RMBG-1.4"
    trust_remote_code: bool = Field(
        False, description="required opt-in for RMBG-1.4, whose hub code runs on load"
    )
    box_threshold: float = 0.35
    text_threshold: float = 0.25


class _GenerateSettings(StrictModel):
    sampler: Literal[tuple(SAMPLERS)] = Field("fused", description="one of conceptflow.sample.SAMPLERS")
    steps: int = Field(20, ge=1, description="DPM-Solver steps; when unset, the sampler's default "
                       "(SamplerSpec.default_steps: 20 for fused, 50 for conceptflow_m as in A.2.2)")
    guidance_scale: float = 7.5
    batch_size: int = Field(4, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _sampler_default_steps(cls, data):
        if isinstance(data, dict) and "steps" not in data and data.get("sampler") in SAMPLERS:
            data = {**data, "steps": SAMPLERS[data["sampler"]].default_steps}
        return data


# Each sampler with settings gets its field (``generate.conceptflow_m: {...}``) from the registry.
GenerateConfig = create_model(
    "GenerateConfig", __base__=_GenerateSettings, __doc__="How the generate stage samples (see conceptflow.sample).",
    **{name: (spec.config, Field(default_factory=spec.config, description=spec.summary))
       for name, spec in SAMPLERS.items() if spec.config is not None})


class FuseConfig(StrictModel):
    method: Literal["average", "gradient"] = Field(
        "average", description="average: mean of the concepts' weight updates; gradient: Mix-of-Show fusion"
    )
    solver: Literal["closed_form", "lbfgs"] = "closed_form"
    adapter_scale: float = Field(0.7, description="strength of each concept's update (Mix-of-Show samples at 0.7)")


class EvaluateConfig(StrictModel):
    clip_model: str = "embedded:tiny-clip"
    dino_model: str = "embedded:tiny-dino"
    toy_evaluators: str | None = Field(
        None, description="folder of the toy world's recogniser/ and identity/ (relative to the catalog); "
        "when set they stand in for CLIP (prompt alignment) and DINO (identity)")


class Catalog(StrictModel):
    """A concept catalog: the unit a scheduled retraining runs on."""

    project: str = "conceptflow"
    base_model: str = Field(EMBEDDED_BASE, description="hub id, local diffusers folder, or embedded:tiny-sd")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    resolution: int = Field(64, ge=32, description="training/sampling resolution in pixels")
    seed: int = 0
    concepts: tuple[Concept, ...] = Field(min_length=1)
    combinations: tuple[Combination, ...] = ()
    mask: MaskConfig = Field(default_factory=MaskConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    root: Path = Field(Path("."), description="folder the catalog lives in; relative paths start here")

    @field_validator("concepts", "combinations", mode="before")
    @classmethod
    def _mapping_form(cls, value):
        """Accept ``{name: spec}`` (the form dvc.yaml's foreach reads) as well as a list."""
        if isinstance(value, dict):
            return [{"name": name, **(spec or {})} for name, spec in value.items()]
        return value

    @model_validator(mode="after")
    def _references_resolve(self) -> "Catalog":
        names = [c.name for c in self.concepts]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ValueError(f"concept names must be unique; repeated: {sorted(duplicated)}")
        for combination in self.combinations:
            unknown = set(combination.concepts) - set(names)
            if unknown:
                raise ValueError(
                    f"combination {combination.name!r} names unknown concepts {sorted(unknown)}; "
                    f"known: {names}"
                )
            for prompt in combination.prompts:
                referenced = set(CONCEPT_REFERENCE.findall(prompt))
                if not referenced <= set(combination.concepts):
                    raise ValueError(
                        f"prompt {prompt!r} of combination {combination.name!r} references "
                        f"{sorted(referenced - set(combination.concepts))}, which the combination "
                        "does not list"
                    )
        return self

    def combination(self, name: str) -> Combination:
        for combination in self.combinations:
            if combination.name == name:
                return combination
        raise CatalogError(
            f"no combination named {name!r} in the catalog; known: {[c.name for c in self.combinations]}"
        )

    def concept(self, name: str) -> Concept:
        for concept in self.concepts:
            if concept.name == name:
                return concept
        raise CatalogError(f"no concept named {name!r} in the catalog; known: {[c.name for c in self.concepts]}")

    def resolve_path(self, value: str) -> str:
        """A catalog-relative path made absolute when it exists; anything else (ids) unchanged."""
        if ":" not in value and (self.root / value).exists():
            return str((self.root / value).resolve())
        return value

    @property
    def base_model_source(self) -> str:
        """What to load: ``base_model`` with a catalog-relative folder resolved."""
        return self.resolve_path(self.base_model)

    def images_dir(self, concept: Concept) -> Path:
        return concept.images if concept.images.is_absolute() else self.root / concept.images

    @property
    def data_dir(self) -> Path:
        return self.root / "data"


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog YAML; errors name the file and the offending field."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file {path} not found: pass --catalog PATH or create catalog.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CatalogError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise CatalogError(f"{path} must hold a mapping with at least 'concepts:'")
    raw.setdefault("root", str(path.resolve().parent))
    try:
        return Catalog.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in error.errors()
        )
        raise CatalogError(f"{path}: {problems}") from error


def config_hash(*parts: BaseModel | dict | str | int | float | None) -> str:
    """A stable short hash of configuration objects (pydantic models, dicts, scalars)."""
    payload = [p.model_dump(mode="json", exclude={"root"}) if isinstance(p, BaseModel) else p for p in parts]
    encoded = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]
