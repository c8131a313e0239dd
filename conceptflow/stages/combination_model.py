"""What a combination's images are sampled from, for the generate stage and the leaderboard.

Most samplers sample the combination's fused model: it is loaded onto the base and the sampler
gets the base with the fused weights applied. A sampler whose registry row says
``uses_adapters`` (Concept Conductor) keeps the concepts apart: it gets the bare base and each
concept's own adapter (the ones the fused model was fused from, checked by md5), and the plain
fused images with the same seeds are sampled here beside its images, so every sampler's images
sit next to the same comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

from conceptflow.adapters.branched import runtime_concepts
from conceptflow.adapters.merge import apply_concepts
from conceptflow.config import Catalog, GenerateConfig
from conceptflow.errors import ConceptflowError
from conceptflow.layout import Layout
from conceptflow.methods import read_concept
from conceptflow.models.loading import load_base_pipeline
from conceptflow.sample import get_sampler
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.fused import sample_images
from conceptflow.sample.registry import SamplingResult
from conceptflow.stages.base import read_manifest


def fused_sources(catalog: Catalog, combination_name: str, fused_meta: dict) -> dict:
    """{concept: adapter folder} of the adapters the combination's fused model was fused from;
    refuses an adapter that was retrained since (its md5 is not the one the fused model records)."""
    layout = Layout(catalog)
    recorded = fused_meta.get("concepts", {})
    folders = {}
    for name in catalog.combination(combination_name).concepts:
        folder = layout.adapter(name)
        manifest = read_manifest(folder)
        want = recorded.get(name, {}).get("md5")
        if manifest is None or manifest.md5 != want:
            raise ConceptflowError(
                f"{folder} is not the adapter that {layout.fused(combination_name)} was fused from (md5 "
                f"{manifest.md5 if manifest else 'missing'}, the fused model records {want}): run "
                f"`conceptflow fuse --combination {combination_name}` first")
        folders[name] = folder
    return folders


class CombinationModel:
    """A base loaded once for one combination and one sampler: the fused model written into it,
    or (``uses_adapters`` samplers) the bare base beside the concepts' own adapters, where the
    plain fused comparison applies the fused model at run time and leaves the base bare."""

    def __init__(self, catalog: Catalog, combination_name: str, sampler: str):
        self.catalog, self.combination = catalog, catalog.combination(combination_name)
        self.spec = get_sampler(sampler)
        self.cache_dir = Layout(catalog).sampler_cache(sampler) if self.spec.uses_cache else None
        pipeline = load_base_pipeline(catalog.base_model_source, catalog.device, catalog.dtype)
        self.fused_model = read_concept(Layout(catalog).fused(combination_name), pipeline)
        self.adapters = None
        if self.spec.uses_adapters:
            self.adapters = {name: read_concept(folder, pipeline)
                             for name, folder in fused_sources(catalog, combination_name, self.fused_model.meta).items()}
            self._parts = contextlib.nullcontext
        else:  # weights and tokens written in; its concepts' run-time parts apply around each sampling call
            apply_concepts(pipeline, [dataclasses.replace(self.fused_model, parts=[])])
            parts = self.fused_model.parts
            self._parts = (lambda: runtime_concepts(pipeline, parts)) if parts else contextlib.nullcontext
        self.core = SamplingCore(pipeline)

    def runtime(self):
        """The context in which the fused model's run-time parts apply (nothing for the bare base)."""
        return self._parts()

    def sample(self, settings: GenerateConfig, requests: Sequence[SampleRequest], description: str = "generate",
               plain: bool = True) -> SamplingResult:
        """``settings.sampler``'s images of ``requests``; for a ``uses_adapters`` sampler with
        ``plain``, the plain fused images of the same requests beside them."""
        if settings.sampler != self.spec.name:
            raise ValueError(f"this model was loaded for sampler {self.spec.name!r}, not {settings.sampler!r}")
        concepts, resolution = self.combination.concepts, self.catalog.resolution
        if self.adapters is None:
            with self._parts():
                return self.spec.sample(self.core, list(requests), concepts, resolution, settings, description,
                                        cache_dir=self.cache_dir)
        result = self.spec.sample(self.core, list(requests), concepts, resolution, settings, description,
                                  adapters=self.adapters, cache_dir=self.cache_dir)
        if plain:
            with runtime_concepts(self.core.pipeline, [self.fused_model]):
                result.plain_images = sample_images(self.core, list(requests), concepts, resolution, settings.steps,
                                                    settings.guidance_scale, settings.batch_size,
                                                    f"{description} (plain fused)")
        return result


def sample_combination(catalog: Catalog, combination_name: str, settings: GenerateConfig,
                       requests: Sequence[SampleRequest], description: str = "generate") -> SamplingResult:
    """Sample ``requests`` of the combination with ``settings.sampler`` from a freshly loaded base."""
    return CombinationModel(catalog, combination_name, settings.sampler).sample(settings, requests, description)
