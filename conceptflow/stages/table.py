"""The stage table: each pipeline stage once, with its fan-out, what it reads and where it writes.

A row (``Stage``) holds a stage's name, its fan-out (one run per ``concept``, per
``combination`` or one per ``catalog``), its upstream stages, its config slice (the catalog
settings its output depends on) and its output folder (a ``Layout`` method). What walks the
stage graph reads this table: the Prefect flow (``flows/catalog.py``), the in-process chain
(``stages/chain.py``), the registry's stage names (``registry.STAGES``, ``register.STAGE_OF``),
each stage's config hash and the upstream md5s it records (``upstream_md5s``). ``dvc.yaml`` is
written by hand for DVC; ``tests/test_stage_table.py`` checks it against this table (stages,
deps, params, outs).

A config slice is a tuple of ``Part``: the catalog.yaml key (what dvc.yaml lists under
``params``) and the value hashed into the stage's config hash. The parts keep the order the
stages have always hashed them in: the hash is the caching key of outputs already on disk, so
reordering parts would redo every stage once. A part without a key is not a catalog setting
(the base model's file fingerprint), and DVC does not see it.

No stage module is imported here (they import torch): a row names its function as
``module:function`` and ``Stage.call`` imports it on use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from conceptflow.config import Catalog, GenerateConfig, config_hash
from conceptflow.errors import ConceptflowError
from conceptflow.layout import Layout
from conceptflow.stages.base import read_manifest, require_manifest

FanOut = Literal["concept", "combination", "catalog"]


@dataclass(frozen=True)
class Part:
    """One input of a stage's config hash: its catalog.yaml key (None: not a catalog setting) and value."""

    key: str | None
    value: Any


@dataclass(frozen=True)
class Stage:
    name: str
    fan_out: FanOut
    upstream: tuple[str, ...]  # stages whose outputs this one reads (in the order its upstream md5s are listed)
    config: Callable[..., tuple[Part, ...]]  # (catalog, item, **options) -> the config slice
    layout: str  # the Layout method naming the output folder
    output: str  # what the folder holds, for "run ... first" messages
    function: str  # "module:function"; called as function(catalog, item, **options), catalog stages without item
    options: tuple[str, ...] = ()  # run-time options passed through by the flow and the chain (generate's sampler)
    sources: Callable[[Catalog, str], tuple[Path, ...]] | None = None  # inputs from outside the pipeline
    hashed: bool = True  # False: the single part is the config key as it is (the report's project name)

    def items(self, catalog: Catalog) -> tuple[str, ...]:
        """The names this stage runs for: concept names, combination names, or the project."""
        if self.fan_out == "concept":
            return tuple(concept.name for concept in catalog.concepts)
        if self.fan_out == "combination":
            return tuple(combination.name for combination in catalog.combinations)
        return (catalog.project,)

    def folder(self, catalog: Catalog, item: str | None = None) -> Path:
        where = getattr(Layout(catalog), self.layout)
        return where() if self.fan_out == "catalog" else where(item)

    def config_slice(self, catalog: Catalog, item: str | None = None, **options) -> tuple[Part, ...]:
        return self.config(catalog, item, **options)

    def config_hash(self, catalog: Catalog, item: str | None = None, **options) -> str:
        values = [part.value for part in self.config_slice(catalog, item, **options)]
        return config_hash(*values) if self.hashed else values[0]

    def params(self, catalog: Catalog, item: str | None = None) -> tuple[str, ...]:
        """The catalog.yaml keys of the config slice: dvc.yaml's ``params`` for this item."""
        return tuple(part.key for part in self.config_slice(catalog, item) if part.key is not None)

    def command(self, item: str | None = None) -> str:
        """The CLI command (after ``conceptflow``) that makes this item's output."""
        return self.name if self.fan_out == "catalog" else f"{self.name} --{self.fan_out} {item}"

    def call(self, catalog: Catalog, item: str | None = None, **options):
        """Run the stage for one item (it skips when up to date); returns (manifest, ran)."""
        module, name = self.function.split(":")
        run = getattr(importlib.import_module(module), name)
        passed = {key: value for key, value in options.items() if key in self.options}
        return run(catalog, **passed) if self.fan_out == "catalog" else run(catalog, item, **passed)


def generate_settings(catalog: Catalog, sampler: str | None = None) -> GenerateConfig:
    """The generate settings a run uses: the catalog's, or with ``sampler`` overridden (re-validated,
    so the new sampler's defaults apply, e.g. 50 steps for conceptflow_m)."""
    if sampler is None:
        return catalog.generate
    return GenerateConfig.model_validate({**catalog.generate.model_dump(exclude_unset=True), "sampler": sampler})


def _ingest(catalog: Catalog, concept: str) -> tuple[Part, ...]:
    # ingest: settings only when set (they decide which images are kept): default ones keep the old hash.
    settings = () if catalog.ingest.is_default() else (Part("ingest", catalog.ingest),)
    return (Part("resolution", catalog.resolution), *settings)


def _mask(catalog: Catalog, concept: str) -> tuple[Part, ...]:
    entry = catalog.concept(concept)
    parts = (Part("mask", catalog.mask), Part(f"concepts.{concept}.class_word", entry.class_word))
    if catalog.mask.backend == "ground_truth" and entry.masks is not None:
        from conceptflow.data.masks.ground_truth import masks_folder_md5

        parts += (Part(None, masks_folder_md5(catalog.path(entry.masks))),)  # the given masks' content
    return parts


def _train(catalog: Catalog, concept: str) -> tuple[Part, ...]:
    from conceptflow.models.loading import model_fingerprint  # loading imports torch

    entry = catalog.concept(concept)
    parts = (Part(f"concepts.{concept}.train", entry.train), Part(f"concepts.{concept}.class_word", entry.class_word),
             Part("base_model", catalog.base_model), Part(None, model_fingerprint(catalog.base_model_source)),
             Part("seed", catalog.seed), Part("resolution", catalog.resolution), Part("dtype", catalog.dtype))
    if entry.group is not None:  # one run learns the group: its members and their class words decide the result
        group = catalog.group(entry.group)
        parts += (Part(f"groups.{group.name}", group),
                  Part(None, [catalog.concept(member).class_word for member in group.concepts]))
    return parts


def _fuse(catalog: Catalog, combination: str) -> tuple[Part, ...]:
    return (Part("fuse", catalog.fuse), Part("base_model", catalog.base_model), Part("seed", catalog.seed),
            Part("resolution", catalog.resolution))


def _generate(catalog: Catalog, combination: str, sampler: str | None = None) -> tuple[Part, ...]:
    return (Part("generate", generate_settings(catalog, sampler)),
            Part(f"combinations.{combination}", catalog.combination(combination)),
            Part("resolution", catalog.resolution))


def _evaluate(catalog: Catalog, combination: str) -> tuple[Part, ...]:
    return (Part("evaluate", catalog.evaluate),)


def _report(catalog: Catalog, item: str | None = None) -> tuple[Part, ...]:
    return (Part("project", catalog.project),)


def _photos(catalog: Catalog, concept: str) -> tuple[Path, ...]:
    return (catalog.images_dir(catalog.concept(concept)),)


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "concept", (), _ingest, "images", "ingested images", "conceptflow.stages.ingest:ingest",
          sources=_photos),
    Stage("mask", "concept", ("ingest",), _mask, "masks", "masks", "conceptflow.stages.mask:mask"),
    Stage("train", "concept", ("ingest", "mask"), _train, "adapter", "trained adapter",
          "conceptflow.stages.train:train"),
    Stage("fuse", "combination", ("train",), _fuse, "fused", "fused model", "conceptflow.stages.fuse:fuse"),
    Stage("generate", "combination", ("fuse",), _generate, "generated", "generated images",
          "conceptflow.stages.generate:generate", options=("sampler",)),
    Stage("evaluate", "combination", ("generate", "ingest"), _evaluate, "metrics", "metrics",
          "conceptflow.stages.evaluate:evaluate"),
    # The report's key has always been the project name itself, not a hash of it: kept, so
    # reports already on disk stay up to date.
    Stage("report", "catalog", ("ingest", "mask", "train", "generate", "evaluate"), _report, "report", "report",
          "conceptflow.stages.report:report", hashed=False),
)
STAGE_NAMES: tuple[str, ...] = tuple(row.name for row in STAGES)
_BY_NAME = {row.name: row for row in STAGES}


def stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConceptflowError(f"no stage named {name!r}; the stages are {list(STAGE_NAMES)}") from None


def upstream_items(catalog: Catalog, row: Stage, upstream: Stage, item: str | None) -> tuple[str, ...]:
    """The items of ``upstream`` that ``row``'s ``item`` reads: the same item, a combination's
    concepts, or every item when ``row`` runs once for the catalog."""
    if row.fan_out == "catalog":
        return upstream.items(catalog)
    if upstream.fan_out == row.fan_out:
        if row.name == "train" and upstream.fan_out == "concept":
            return catalog.trained_with(item)  # a group's concept trains on every member's photos and masks
        return (item,)
    if (row.fan_out, upstream.fan_out) == ("combination", "concept"):
        return catalog.combination(item).concepts
    raise ValueError(f"stage table: {row.name} ({row.fan_out}) cannot read {upstream.name} ({upstream.fan_out})")


def upstream_folders(catalog: Catalog, name: str, item: str | None = None) -> Iterator[tuple[Stage, str, Path]]:
    """(upstream stage, its item, its output folder) for everything ``item`` of stage ``name`` reads."""
    row = stage(name)
    for upstream_name in row.upstream:
        upstream = stage(upstream_name)
        for upstream_item in upstream_items(catalog, row, upstream, item):
            yield upstream, upstream_item, upstream.folder(catalog, upstream_item)


def upstream_md5s(catalog: Catalog, name: str, item: str | None = None) -> dict[str, str]:
    """The content md5 of every upstream output, under the labels the stages have always used
    (they enter manifest keys and concept.json): the upstream's Layout name for the same item
    (``images``), ``<layout>.<concept>`` for a combination's concepts (``adapter.dog``), and for
    the catalog's report the folder under data/ (``concepts/dog/images``), where a missing
    output reads "missing" instead of stopping the stage."""
    row = stage(name)
    data = Layout(catalog).data
    md5s = {}
    for upstream, upstream_item, folder in upstream_folders(catalog, name, item):
        if row.fan_out == "catalog":
            manifest = read_manifest(folder)
            md5s[folder.relative_to(data).as_posix()] = manifest.md5 if manifest else "missing"
            continue
        manifest = require_manifest(folder, upstream.output, upstream.command(upstream_item))
        alone = upstream.fan_out == row.fan_out and upstream_items(catalog, row, upstream, item) == (item,)
        label = upstream.layout if alone else f"{upstream.layout}.{upstream_item}"
        md5s[label] = manifest.md5
    return md5s


def needed_for(name: str) -> tuple[Stage, ...]:
    """Stage ``name`` and every stage it reads from, directly or not, in table order."""
    wanted, pending = set(), [name]
    while pending:
        current = pending.pop()
        if current not in wanted:
            wanted.add(current)
            pending.extend(stage(current).upstream)
    return tuple(row for row in STAGES if row.name in wanted)


def plan(catalog: Catalog, rows: tuple[Stage, ...] = STAGES,
         combinations: tuple[str, ...] | None = None) -> list[tuple[Stage, str]]:
    """(stage, item) in run order: each concept through its concept stages, then each combination
    through its combination stages, then the catalog stages. ``combinations`` limits the run to
    those combinations and their concepts (default: the whole catalog)."""
    if combinations is None:
        concepts = tuple(concept.name for concept in catalog.concepts)
        combinations = tuple(combination.name for combination in catalog.combinations)
    else:
        concepts = tuple(dict.fromkeys(c for name in combinations for c in catalog.combination(name).concepts))
    # A group's concepts run together: each one's stages up to training, then their training
    # (which reads every member's masks); a concept alone runs through its stages as before.
    units = list(dict.fromkeys(catalog.trained_with(concept) for concept in concepts))
    concept_rows = [row for row in rows if row.fan_out == "concept"]
    jobs = []
    for unit in units:
        before = [row for row in concept_rows if row.name != "train"] if len(unit) > 1 else concept_rows
        jobs += [(row, concept) for concept in unit for row in before]
        if len(unit) > 1:
            jobs += [(row, concept) for row in concept_rows if row.name == "train" for concept in unit]
    jobs += [(row, combination) for combination in combinations for row in rows if row.fan_out == "combination"]
    jobs += [(row, catalog.project) for row in rows if row.fan_out == "catalog"]
    return jobs
