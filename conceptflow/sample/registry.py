"""The samplers: one module or folder each, one registry row each (``SAMPLERS``).

A row names the sampler, its settings class (the catalog's ``generate.<name>``, None if it has
none), its default step count and its entry point, a ``"module:function"`` reference imported
on first use (so that reading a catalog does not import every sampler)::

    sample(core_or_pipeline, requests, concepts, resolution, settings, description) -> SamplingResult

``core_or_pipeline`` is a ``SamplingCore`` (or a loaded pipeline, wrapped in one), ``requests``
the ``SampleRequest``s, ``concepts`` the loaded concept names the prompts may reference,
``settings`` the catalog's ``GenerateConfig`` (``steps``, ``guidance_scale``, ``batch_size`` and
the sampler's own settings at ``getattr(settings, name)``), ``description`` a progress label.

Adding a sampler: write ``conceptflow/sample/<name>.py`` (or a folder like ``conceptflow_m/``)
with its ``sample`` and, if it has settings, a pydantic config class; add its row to
``_BUILT_IN``. The generate stage, the catalog's ``generate.sampler`` choices and the benchmarks
read this registry; nothing else names a sampler.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from conceptflow.errors import ConceptflowError
from conceptflow.sample.conceptflow_m.config import ConceptFlowMConfig
from conceptflow.sample.conductor.config import ConductorConfig
from conceptflow.sample.cones2_layout.config import Cones2LayoutConfig
from conceptflow.sample.loda.config import LodaConfig


@dataclass
class SamplingResult:
    """A sampler's images in request order and what it has beside them.

    ``attention_maps[i][concept]``: the concept's (H, W) map in image i, in [0, 1], for each
    concept its prompt names (None when the sampler records none); ``plain_images``: the same
    requests from the plain fused sampler, for comparison (None when the sampler is plain; a
    ``uses_adapters`` sampler has no fused model, so the generate stage replaces whatever it
    returns here with the fused model's plain images);
    ``masks[i][concept]``: the concept's region the sampler used in image i (Concept Conductor's
    refined masks; None when it has none).
    """

    images: list
    attention_maps: list[dict[str, Any]] | None = None
    plain_images: list | None = None
    masks: list[dict[str, Any]] | None = None  # masks[i][concept]: the (H, W) [0, 1] mask the sampler ended with


@dataclass(frozen=True)
class SamplerSpec:
    """One registry row: a sampler's name, settings class, default steps and entry point."""

    name: str
    config: type[BaseModel] | None
    default_steps: int
    entry_point: str  # "module:function", the function of the module docstring's signature
    summary: str = ""
    # True: the sampler keeps concepts apart; it gets the bare base and ``adapters`` {concept:
    # ConceptEffects} (each concept's own adapter) instead of the base with the fused model applied
    uses_adapters: bool = False
    # True: the entry point takes ``cache_dir=`` (a folder for what it computes once per input and
    # reuses, e.g. Concept Conductor's layout inversions); the generate stage passes one per sampler
    uses_cache: bool = False

    def sample(self, core_or_pipeline, requests, concepts, resolution: int, settings,
               description: str = "generate", adapters=None, cache_dir=None) -> SamplingResult:
        module_name, _, attribute = self.entry_point.partition(":")
        function: Callable[..., SamplingResult] = getattr(importlib.import_module(module_name), attribute)
        extra = {"cache_dir": cache_dir} if self.uses_cache else {}
        if self.uses_adapters:
            if adapters is None:
                raise ConceptflowError(f"sampler {self.name!r} samples separate concept adapters: pass adapters=")
            extra["adapters"] = adapters
        return function(core_or_pipeline, requests, concepts, resolution, settings, description, **extra)


_BUILT_IN = (
    SamplerSpec("fused", None, 20, "conceptflow.sample.fused:sample",
                "DPM-Solver++ with classifier-free guidance, no hook"),
    SamplerSpec("conceptflow_m", ConceptFlowMConfig, 50, "conceptflow.sample.conceptflow_m.pipeline:sample",
                "ConceptFlow-M: SAMA reference branches + layout-consistency guidance (50 steps, A.2.2)"),
    SamplerSpec("conductor", ConductorConfig, 50, "conceptflow.sample.conductor.pipeline:sample",
                "Concept Conductor: separate concept branches in one batched call, layout alignment, "
                "attention injection with refined masks", uses_adapters=True, uses_cache=True),
    SamplerSpec("cones2_layout", Cones2LayoutConfig, 50, "conceptflow.sample.cones2_layout.pipeline:sample",
                "Cones 2 layout guidance: cross-attention score bias inside each concept's box (50 steps, all guided)"),
    SamplerSpec("loda", LodaConfig, 50, "conceptflow.sample.loda.pipeline:sample",
                "ConceptSplit LODA: latent steps separating the concepts' cross-attention maps (first 10 steps)"),
)

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in _BUILT_IN}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ConceptflowError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[name]
