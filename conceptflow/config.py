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

from conceptflow.errors import CatalogError, ConceptflowError
from conceptflow.methods import METHODS
from conceptflow.methods.conceptflow_s.config import ConceptFlowSTrainConfig
from conceptflow.methods.edlora.config import LoRATrainConfig
from conceptflow.sample import SAMPLERS
from conceptflow.sample.boxes import validate_box
from conceptflow.sample.conceptflow_m.config import ConceptFlowMConfig
from conceptflow.schema import COMBINATION_NAME, CONCEPT_NAME, CONCEPT_REFERENCE, PROJECT_NAME, StrictModel

__all__ = ["CONCEPT_NAME", "CONCEPT_REFERENCE", "Catalog", "Combination", "Concept", "ConceptFlowSTrainConfig",
           "IngestConfig", "LoRATrainConfig", "TrainConfig", "config_hash", "load_catalog"]

EMBEDDED_BASE = "embedded:tiny-sd"
SEED_MAX = 2**32 - 1  # numpy's and most samplers' seed range is 0 .. 2**32-1
# PIL's decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): above twice it PIL refuses to open a file.
PIL_PIXEL_LIMIT = 89_478_485


def _check_seed(seed: int, where: str) -> int:
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{where} {seed} is outside 0..{SEED_MAX} (2**32-1): use a seed in that range")
    return seed


def _each_once(concepts: tuple[str, ...]) -> tuple[str, ...]:
    repeated = sorted({name for name in concepts if concepts.count(name) > 1})
    if repeated:
        raise ValueError(f"concepts {repeated} are listed more than once: list each concept once")
    return concepts


def _train_config_union():
    """The discriminated union of every registered method's settings (``train.method`` picks one)."""
    configs = tuple(spec.config for spec in METHODS.values())
    return Annotated[Union[configs], Field(discriminator="method")] if len(configs) > 1 else configs[0]


TrainConfig = _train_config_union()


class Concept(StrictModel):
    name: str = Field(description="lower-case identifier; referenced in prompts as <name>")
    class_word: str = Field(description="the concept's class, e.g. 'dog'")
    images: Path = Field(description="folder of 3-5 photos of the concept (relative to the catalog); a group's "
                         "concept has none of its own: it reads the group's")
    train: TrainConfig = Field(default_factory=LoRATrainConfig, description="the training method and its settings; "
                               "method: one of conceptflow.methods.METHODS")
    # Left out of dumps when unset, so the config hashes of concepts without them stay the same.
    masks: Path | None = Field(None, exclude_if=lambda value: value is None,
                               description="folder of given masks, one per photo named as the photo (mask.backend "
                               "ground_truth); a group's concept: <group masks>/<name>")
    group: str | None = Field(None, exclude_if=lambda value: value is None,
                              description="set from `groups:` (do not write it): the group whose photos train it")

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
    name: str = Field("", description="defaults to the concept names joined by '+'; letters, digits, '_', '+' "
                      "and '-' (it names the folders data/*/<name> and the MLflow model combo.<name>)")
    concepts: tuple[str, ...] = Field(min_length=1, description="concept names, each at most once")
    prompts: tuple[str, ...] = Field(min_length=1, description="prompts using <name> references")
    seeds: tuple[int, ...] = Field((0, 1), description=f"distinct seeds in 0..{SEED_MAX}, at least one; one image "
                                   "per prompt and seed")
    # Left out of dumps when unset, so the config hashes of combinations without them stay the same.
    layout: dict[str, tuple[float, float, float, float]] | None = Field(
        None, exclude_if=lambda value: value is None,
        description="one box per concept, {<name>: [x0, y0, x1, y1]} in relative image coordinates (0..1, x0 < x1, "
        "y0 < y1); samplers that place concepts (cones2_layout, conductor) use it; unset: side-by-side boxes")
    layout_image: Path | None = Field(
        None, exclude_if=lambda value: value is None,
        description="an image (relative to the catalog) whose layout the conductor sampler follows; unset: one the "
        "base model draws from the base prompt")

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if not seeds:
            raise ValueError("no seeds: list at least one (e.g. `seeds: [0, 1]`), or leave `seeds:` out for 0 and 1")
        for seed in seeds:
            _check_seed(seed, "seed")
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"seeds {repeated} are listed more than once (the same seed gives the same image): "
                             "list each seed once")
        return seeds

    @field_validator("concepts")
    @classmethod
    def _concepts_once(cls, concepts: tuple[str, ...]) -> tuple[str, ...]:
        return _each_once(concepts)

    @field_validator("layout")
    @classmethod
    def _boxes_in_image(cls, layout):
        for name, box in (layout or {}).items():
            try:
                validate_box(name, box)
            except ConceptflowError as error:  # pydantic reports ValueErrors with the field's location
                raise ValueError(str(error)) from None
        return layout

    @model_validator(mode="after")
    def _layout_names_concepts(self) -> "Combination":
        if self.layout is not None:
            unknown = sorted(set(self.layout) - set(self.concepts))
            missing = sorted(set(self.concepts) - set(self.layout))
            if unknown or missing:
                raise ValueError(f"layout must give one box per concept of the combination {list(self.concepts)}; "
                                 + (f"unknown: {unknown} " if unknown else "") + (f"missing: {missing}" if missing else ""))
        return self

    @model_validator(mode="after")
    def _default_name(self) -> "Combination":
        if not self.name:
            object.__setattr__(self, "name", "+".join(self.concepts))
        if not COMBINATION_NAME.match(self.name):
            raise ValueError(
                f"combination name {self.name!r} must match {COMBINATION_NAME.pattern} (letters, digits, '_', '+', "
                "'-'; no '/', '.', '@' or spaces: it becomes a folder under data/ and an MLflow model name). "
                "Rename it, or set `name:` to such a name")
        return self


class Group(StrictModel):
    """Photos that each show several of the catalog's concepts together (Textual Localization).

    Each listed concept stays an entry of ``concepts:`` (its class word; prompts write it
    ``<name>``) without photos of its own; the group's photos, masks and ``train:`` settings are
    its. One training run learns them all; each gets its own concept folder.
    """

    name: str = Field(description="identifier (letters, digits, '_'; starts with a letter)")
    images: Path = Field(description="folder of photos each showing the group's concepts (relative to the catalog); "
                         "a caption beside a photo names them as <name>")
    concepts: tuple[str, ...] = Field(min_length=2, description="the catalog concepts the photos show, each once")
    masks: Path | None = Field(None, exclude_if=lambda value: value is None,
                               description="folder with one subfolder per concept of given masks named as the photos "
                               "(mask.backend ground_truth, e.g. the toy world's); unset: masks from mask.backend")
    train: TrainConfig = Field(default_factory=lambda: METHODS["textual_localization"].config(),
                               description="a method that learns groups (textual_localization) and its settings")

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, name: str) -> str:
        if not CONCEPT_NAME.match(name):
            raise ValueError(f"group name {name!r} must match {CONCEPT_NAME.pattern} (lower-case letters, digits, "
                             "underscores; starts with a letter)")
        return name

    @field_validator("concepts")
    @classmethod
    def _concepts_once(cls, concepts: tuple[str, ...]) -> tuple[str, ...]:
        return _each_once(concepts)

    @field_validator("train")
    @classmethod
    def _learns_groups(cls, train):
        if not METHODS[train.method].trains_groups:
            learners = sorted(name for name, spec in METHODS.items() if spec.trains_groups)
            raise ValueError(f"train.method {train.method!r} learns one concept from its own photos; a group needs "
                             f"a method that learns several from photos showing them together: {learners}")
        return train


def _named_entries(value):
    """A ``{name: spec}`` mapping or a list of specs as a list of dicts with ``name`` (None: neither)."""
    if isinstance(value, dict):
        if not all(spec is None or isinstance(spec, dict) for spec in value.values()):
            return None
        return [{"name": name, **(spec or {})} for name, spec in value.items()]
    if isinstance(value, (list, tuple)) and all(isinstance(spec, dict) for spec in value):
        return [dict(spec) for spec in value]
    return None


def expand_groups(data: dict) -> dict:
    """The catalog's raw data with each group's concepts given the group's photos, masks and
    training settings (``group`` set to the group's name). A member may write the group's
    ``images`` and ``train`` itself (dvc.yaml reads them per concept), and a group without
    ``train`` takes its members' (which must agree); a value that differs from the group's is a
    problem. Problems raise one ValueError."""
    groups, concepts = _named_entries(data.get("groups") or []), _named_entries(data.get("concepts") or [])
    if not groups or concepts is None:
        return data
    by_name = {concept.get("name"): concept for concept in concepts}
    problems, owner, expanded_groups = [], {}, []
    for group in groups:
        name = group.get("name")
        members = group.get("concepts")
        if not isinstance(members, (list, tuple)):
            expanded_groups.append(group)
            continue  # the Group model reports it
        given = [by_name[m]["train"] for m in members if m in by_name and "train" in by_name[m]]
        train = group.get("train", given[0] if given else {"method": "textual_localization"})
        group = {**group, "train": train}
        expanded_groups.append(group)
        for member in members:
            concept = by_name.get(member)
            if concept is None:
                problems.append(f"groups.{name}.concepts: {member!r} is not in concepts:; add it there with its "
                                "class_word")
                continue
            if member in owner:
                problems.append(f"groups.{name}.concepts: {member!r} is already in group {owner[member]!r}: a "
                                "concept is learnt in one group")
                continue
            owner[member] = name
            if "group" in concept:
                problems.append(f"concepts.{member}.group: set from groups: (list the concept in a group's "
                                "`concepts:`); remove it here")
            wanted = {"images": group.get("images"), "train": train}
            if group.get("masks") is not None:
                wanted["masks"] = (Path(str(group["masks"])) / member).as_posix()
            for key, value in wanted.items():
                if key in concept and str(concept[key]) != str(value) and concept[key] != value:
                    problems.append(
                        f"concepts.{member}.{key}: {concept[key]!r} differs from group {name!r}'s {value!r}: the "
                        f"group's concepts learn from its photos in one run; leave `{key}:` out here or make it equal")
            by_name[member] = {**concept, **wanted, "group": name}
    if problems:
        raise ValueError("\n".join(problems))
    return {**data, "concepts": [by_name[concept.get("name")] for concept in concepts], "groups": expanded_groups}


class MaskConfig(StrictModel):
    backend: Literal["auto", "saliency", "grounded_sam", "rmbg", "ground_truth"] = Field(
        "auto", description="auto: grounded_sam when its checkpoints are configured, else saliency; ground_truth: "
        "the masks given in each concept's (or group's) `masks:` folder"
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


class IngestConfig(StrictModel):
    """What ingest accepts (conceptflow.data.ingest): image size limits and symlinks."""

    max_pixels: int = Field(64_000_000, ge=1, le=PIL_PIXEL_LIMIT, description="an image with more pixels "
                            "(width x height, read from the file header before decoding) is refused")
    min_side_fraction: float = Field(0.5, ge=0, le=1, description="an image whose shorter side is below "
                                     "min_side_fraction x resolution is small (it would be upscaled more than 2x)")
    small_images: Literal["refuse", "skip"] = Field("refuse", description="refuse: a small image stops the "
                                                    "concept; skip: it is left out and listed in ingest.json")
    outside_symlinks: Literal["refuse", "follow"] = Field(
        "refuse", description="a file of the concept folder that is a symlink to a file outside the folder: "
        "refuse (default) or follow it; symlinks within the folder are always fine")

    def is_default(self) -> bool:
        return self == IngestConfig()


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
    attention_entropy: bool = Field(True, description="score attention_entropy_change (ConceptSplit Table 1): "
                                    "the concepts' cross-attention entropy change per step in a plain sampling run "
                                    "of the fused model (one more run per image)")


class Catalog(StrictModel):
    """A concept catalog: the unit a scheduled retraining runs on."""

    project: str = Field("conceptflow", description="the MLflow experiment name: letters, digits, '_', '.', '-'")
    base_model: str = Field(EMBEDDED_BASE, description="hub id, local diffusers folder, or embedded:tiny-sd")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    resolution: int = Field(64, ge=32, description="training/sampling resolution in pixels")
    seed: int = Field(0, description=f"training seed, 0..{SEED_MAX}")
    concepts: tuple[Concept, ...] = Field(min_length=1)
    combinations: tuple[Combination, ...] = ()
    groups: tuple[Group, ...] = Field((), description="photos showing several concepts together, learnt jointly "
                                      "(train.method textual_localization)")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    root: Path = Field(Path("."), description="folder the catalog lives in; relative paths start here")

    @model_validator(mode="before")
    @classmethod
    def _groups_to_concepts(cls, data):
        return expand_groups(data) if isinstance(data, dict) else data

    @field_validator("concepts", "combinations", "groups", mode="before")
    @classmethod
    def _mapping_form(cls, value):
        """Accept ``{name: spec}`` (the form dvc.yaml's foreach reads) as well as a list."""
        if isinstance(value, dict):
            wrong = [name for name, spec in value.items() if spec is not None and not isinstance(spec, dict)]
            if wrong:
                raise ValueError(f"{wrong[0]!r} must hold a mapping of its settings (e.g. `class_word: dog`, "
                                 f"`concepts: [a, b]`), not {type(value[wrong[0]]).__name__} {value[wrong[0]]!r}")
            return [{"name": name, **(spec or {})} for name, spec in value.items()]
        return value

    @field_validator("project")
    @classmethod
    def _project_name(cls, project: str) -> str:
        if not PROJECT_NAME.match(project):
            raise ValueError(f"project name {project!r} must match {PROJECT_NAME.pattern} (it is the MLflow "
                             "experiment name): use letters, digits, '_', '.' and '-'")
        return project

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        return _check_seed(seed, "seed")

    @model_validator(mode="after")
    def _references_resolve(self) -> "Catalog":
        """Every cross-reference problem at once (one ValueError, one problem per line)."""
        problems = []
        names = [c.name for c in self.concepts]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            problems.append(f"concept names must be unique; repeated: {sorted(duplicated)}")
        for concept in self.concepts:
            if METHODS[concept.train.method].trains_groups and concept.group is None:
                problems.append(f"concepts.{concept.name}.train.method {concept.train.method!r} learns concepts from "
                                "photos showing them together: list the concept in a `groups:` entry (with the "
                                "group's photos) instead of giving it a method here")
        group_names = [g.name for g in self.groups]
        if len(set(group_names)) != len(group_names):
            problems.append(f"group names must be unique; repeated: {sorted({n for n in group_names if group_names.count(n) > 1})}")
        clashes = sorted(set(group_names) & set(names))
        if clashes:
            problems.append(f"groups {clashes} share a name with a concept: give them other names")
        combination_names = [c.name for c in self.combinations]
        duplicated = {n for n in combination_names if combination_names.count(n) > 1}
        if duplicated:
            problems.append(f"combination names must be unique; repeated: {sorted(duplicated)} (a combination "
                            "without `name:` is named after its concepts): give each a distinct `name:`")
        for combination in self.combinations:
            unknown = set(combination.concepts) - set(names)
            if unknown:
                problems.append(
                    f"combination {combination.name!r} names unknown concepts {sorted(unknown)}; "
                    f"known: {names}"
                )
            as_word: dict[str, list[str]] = {}  # concepts written as their class word (Cones 2), by word
            for concept in self.concepts:
                if concept.name in combination.concepts and getattr(concept.train, "written_as_class_word", False):
                    as_word.setdefault(concept.class_word, []).append(concept.name)
            for word, clash in as_word.items():
                if len(clash) > 1:
                    problems.append(
                        f"combination {combination.name!r} has concepts {clash} that are all written as their "
                        f"class word {word!r} (train.method cones2: a residual at the class word): their residuals "
                        "would add at the same word; put them in different combinations or give one another class word")
            for prompt in combination.prompts:
                referenced = set(CONCEPT_REFERENCE.findall(prompt))
                if not referenced <= set(combination.concepts):
                    problems.append(
                        f"prompt {prompt!r} of combination {combination.name!r} references "
                        f"{sorted(referenced - set(combination.concepts))}, which the combination "
                        "does not list"
                    )
        if problems:
            raise ValueError("\n".join(problems))
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

    def path(self, value: Path) -> Path:
        """A path of the catalog (``images:``, ``layout_image:``) as given if absolute, else under ``root``."""
        return value if value.is_absolute() else self.root / value

    def images_dir(self, concept: Concept) -> Path:
        return self.path(concept.images)

    def group(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise CatalogError(f"no group named {name!r} in the catalog; known: {[g.name for g in self.groups]}")

    def trained_with(self, concept_name: str) -> tuple[str, ...]:
        """The concepts one training run learns together with ``concept_name``: its group's, in the
        group's order, or the concept alone."""
        group = self.concept(concept_name).group
        return self.group(group).concepts if group else (concept_name,)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of the catalog YAML holds one key twice; ``line`` is the second one's (1-based)."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a mapping holding one key twice is an error.

    (Plain PyYAML keeps the last value and drops the others silently.) Keys merged in with
    ``<<: *anchor`` may be overridden as YAML intends; only keys written twice are refused.
    """


def _construct_unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first_line:
                raise DuplicateKeyError(
                    f"the key {key!r} is written twice in one mapping (first on line {first_line[key] + 1}; "
                    "PyYAML would silently keep only the last): remove or rename one", key_node.start_mark.line + 1)
            first_line[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: construct_mapping reports it
            pass
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _field_name(loc: tuple, raw: dict) -> str:
    """A pydantic error location as a catalog path, items named as the user wrote them
    (``combinations.dog+cat.seeds.0``, not ``combinations.0.seeds.0``)."""
    parts = [str(part) for part in loc]
    if len(loc) >= 2 and loc[0] in ("concepts", "combinations", "groups") and isinstance(loc[1], int):
        entries = raw.get(loc[0])
        if isinstance(entries, dict) and loc[1] < len(entries):
            parts[1] = str(list(entries)[loc[1]])
        elif isinstance(entries, list) and loc[1] < len(entries) and isinstance(entries[loc[1]], dict):
            parts[1] = str(entries[loc[1]].get("name", loc[1]))
    return ".".join(parts) or "<top>"


def format_problems(path: Path, problems: list[str]) -> str:
    """One message for the CLI: the file, then one problem per line (``field: what is wrong and the fix``)."""
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    return f"{path}: {len(problems)} problems:\n" + "\n".join(f"  - {problem}" for problem in problems)


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog YAML; errors name the file and the offending field, every problem at once.

    Keys written twice in one mapping are refused (``UniqueKeyLoader``). What needs the disk,
    torch or the base model's tokenizer (base folder, device, prompt length, evaluator folder)
    is checked by ``conceptflow.validation.validate_catalog``, which ``conceptflow run`` and
    ``conceptflow validate`` call before any stage.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file {path} not found: pass --catalog PATH or create catalog.yaml")
    try:
        with path.open(encoding="utf-8") as handle:  # a stream: YAML's messages name the file
            raw = yaml.load(handle, Loader=UniqueKeyLoader)
    except UnicodeDecodeError as error:
        raise CatalogError(f"{path} is not UTF-8 text ({error}): save it as UTF-8") from error
    except DuplicateKeyError as error:
        raise CatalogError(f"{path}: line {error.line}: {error}") from error
    except yaml.YAMLError as error:
        raise CatalogError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise CatalogError(f"{path} must hold a mapping with at least 'concepts:'")
    raw.setdefault("root", str(path.resolve().parent))
    try:
        return Catalog.model_validate(raw)
    except ValidationError as error:
        problems = []
        for entry in error.errors():
            message = entry["msg"].removeprefix("Value error, ")
            field = _field_name(entry["loc"], raw)
            problems += [f"{field}: {line}" for line in message.split("\n")]
        raise CatalogError(format_problems(path, problems)) from error


def config_hash(*parts: BaseModel | dict | str | int | float | None) -> str:
    """A stable short hash of configuration objects (pydantic models, dicts, scalars)."""
    payload = [p.model_dump(mode="json", exclude={"root"}) if isinstance(p, BaseModel) else p for p in parts]
    encoded = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]
