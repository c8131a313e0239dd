"""Sample a registered version by itself: its folder applied to its base, one sampler call.

``ServedModel`` loads the base (a resolved source, ``serving.base_model``), reads the folder
with ``conceptflow.methods.read_concept`` and applies it: merged into the weights with
``adapters.merge.apply_concepts`` when every channel can be (fused models, ED-LoRA, ...), or
at run time with ``adapters.branched.runtime_concepts`` around each sampling call when it has
token-position updates or text residuals. A concept samples at full strength (scale 1), a
fused model as the generate stage applies it. Sampling is the generate stage's: the sampler's
registry row (``conceptflow.sample.SAMPLERS``) called on a ``SamplingCore``, requests
prompt-major (every seed of the first prompt, then the next prompt).

Same model, prompts, seeds, sampler, steps, guidance and batch size as the generate stage
give the same images; images are drawn from per-seed noise, but a different batching of the
requests (another request list, or batch size) may change low-order bits of the float math.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

from conceptflow.adapters.branched import runtime_concepts
from conceptflow.adapters.merge import apply_concepts
from conceptflow.config import GenerateConfig
from conceptflow.fileio import atomic_directory, write_json_atomic
from conceptflow.methods import read_concept
from conceptflow.models.loading import load_base_pipeline
from conceptflow.sample import SamplingResult, get_sampler
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.serving.spec import ServingSpec


def sample_requests(prompts: Sequence[str], seeds: Sequence[int]) -> list[SampleRequest]:
    """Prompt-major requests, as the generate stage orders them."""
    return [SampleRequest(prompt, int(seed)) for prompt in prompts for seed in seeds]


class ServedModel:
    """A base pipeline with one registered concept or fused model applied."""

    def __init__(self, folder: Path, spec: ServingSpec, base_source: str, device: str = "cpu"):
        self.spec = spec
        pipeline = load_base_pipeline(base_source, device, spec.dtype)
        effects = read_concept(Path(folder), pipeline)
        self.runtime = [] if effects.mergeable else [effects]
        if not self.runtime:
            apply_concepts(pipeline, [effects])
        self.core = SamplingCore(pipeline)

    def sample(self, requests: Sequence[SampleRequest], settings: GenerateConfig) -> SamplingResult:
        applied = runtime_concepts(self.core.pipeline, self.runtime) if self.runtime else contextlib.nullcontext()
        with applied:
            return get_sampler(settings.sampler).sample(self.core, list(requests), self.spec.concepts,
                                                        self.spec.resolution, settings, f"sample {self.spec.name}")


def write_images(out: Path, requests: Sequence[SampleRequest], result: SamplingResult, settings: GenerateConfig,
                 header: dict) -> Path:
    """``out/000.png`` ... and ``out/images.json`` ({header..., "sampler", "settings", "images":
    [{"file", "prompt", "seed", "plain_file"?}]}, the generate stage's rows); ``out`` is replaced."""
    with atomic_directory(Path(out)) as staging:
        rows = []
        for index, (request, image) in enumerate(zip(requests, result.images)):
            row = {"file": f"{index:03d}.png", "prompt": request.prompt, "seed": request.seed}
            image.save(staging / row["file"])
            if result.plain_images is not None:  # ConceptFlow-M keeps the plain fused image beside
                row["plain_file"] = f"plain/{index:03d}.png"
                (staging / "plain").mkdir(exist_ok=True)
                result.plain_images[index].save(staging / row["plain_file"])
            rows.append(row)
        write_json_atomic(staging / "images.json", {**header, "sampler": settings.sampler,
                                                    "settings": settings.model_dump(mode="json"), "images": rows})
    return Path(out)
