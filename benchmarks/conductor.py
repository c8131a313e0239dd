"""Concept Conductor: our batched branches vs the reference's deep-copy strategy, same images.

    HF_HUB_OFFLINE=1 python benchmarks/conductor.py [--model built:160,320,640,640] [--resolution 64]
                                                    [--steps 10] [--images 2] [--repeats 2] [--kmeans-inits 10]

Both strategies run the same sampler (``conceptflow.sample.conductor.pipeline.ConductorBatch``:
layout alignment, injection, mask refinement, same seeds, layout references and cached
inversions); only the UNet calls differ (``ConductorBatch._unet``):

- batched (ours): one UNet call per pass holds every row (each image's base branch and its K
  concept branches, both guidance halves), the concept adapters applied per sample by
  ``conceptflow.adapters.branched``;
- deepcopy (the reference's strategy, ``pipeline_concept_conductor.py`` l.645-651, 749-755,
  written out here as ``DeepcopyBatch``): in every pass of every step, for every concept
  branch, ``copy.deepcopy`` of the base UNet, the branch's adapter merged as the reference's
  ``merge_lora_into_weight`` does (a deep copy of the state dict with W0 + scale * ΔW,
  ``load_state_dict``), one call for that branch's rows, the copy freed with ``gc.collect()``
  where the reference calls it; then the base rows on the base UNet. As the reference, each merge
  forms ΔW = up @ down from the concept's LoRA factors (``merge_lora_into_weight``; ours forms it
  once when the concept is read); its alignment passes run the whole UNet (l.660-690: the concept
  branches with gradients, then the base; ours stops each pass at the alignment layer, where the keys
  are read: ``FullForwardHooks`` here records the same keys and lets the pass go on); and every
  alignment step runs a no-grad base-UNet pass on the reference latent to read its keys (l.700-712,
  the whole UNet; ours reads them from the inversion cache): here on a stand-in latent of its shape,
  its keys discarded, so both strategies read the same cached keys and give the same images. Not
  counted: its deep copies of the attention processors. The concept branches' text is encoded once
  per batch by both (shared here). The speedup is printed with and without those two reference-only
  costs (timed apart).

Concepts are random rank-4 LoRA factors on every UNet attention linear (q, k, v, out, as ED-LoRA
adapts) and random ΔW on the text encoder's attention, with random layer-wise tokens. Time is this process's CPU time on one
thread (``time.process_time``); the strategies run interleaved ``--repeats`` times and the fastest
of each is kept. Mask refinement (k-means, the same code and inputs for both) is timed apart and
reported; the speedups are of the whole ``run`` (refinement included). Images: max abs difference
of the final latents and of the decoded 8-bit images (tolerance: latents 1e-3, images 2 levels;
the strategies differ by float32 rounding, W0x + ΔWx against (W0 + ΔW)x).

The last line is ``speedup batched vs deepcopy = <x>`` at K = 2.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conceptflow.adapters.concept_io import get_linear  # noqa: E402
from conceptflow.adapters.effects import ConceptEffects  # noqa: E402
from conceptflow.adapters.tokens import concept_token_strings  # noqa: E402
from conceptflow.config import GenerateConfig  # noqa: E402
from conceptflow.models.loading import load_base_pipeline  # noqa: E402
from conceptflow.attention.processor import StopForward  # noqa: E402
from conceptflow.sample.conductor.hooks import ConductorHooks  # noqa: E402
from conceptflow.sample.conductor.inversion import KeyRecorder  # noqa: E402
from conceptflow.sample.conductor.pipeline import ConductorBatch  # noqa: E402
from conceptflow.sample.core import SampleRequest, SamplingCore  # noqa: E402

NAMES = (("dog", "dog"), ("cat", "cat"), ("owl", "bird"))
PROMPTS = {2: "a <dog> and a <cat> on the beach", 3: "a <dog>, a <cat> and an <owl> on the beach"}
LATENT_TOLERANCE, IMAGE_TOLERANCE = 1e-3, 2
RANK = 4  # ED-LoRA's rank


def load_model(model: str):
    """``embedded:...`` or a hub id as the project loads it, or ``built:c1,c2,c3,c4``: an SD-1.x-shaped
    UNet (4 levels, 2 layers per block, 8 heads, cross-attention at every level) of those widths
    with the tiny base's text encoder and VAE, random seeded weights, built in memory."""
    if not model.startswith("built:"):
        return load_base_pipeline(model)
    from transformers import CLIPTokenizer

    from conceptflow.models.embedded import TinySDSize, build_tiny_sd_pipeline, embedded_model_path

    channels = tuple(int(c) for c in model.removeprefix("built:").split(","))
    tokenizer = CLIPTokenizer.from_pretrained(embedded_model_path("embedded:tiny-sd") / "tokenizer")
    pipeline = build_tiny_sd_pipeline(tokenizer, TinySDSize(unet_channels=channels, unet_layers_per_block=2))
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.eval().requires_grad_(False)
    return pipeline


def random_concept(pipeline, n_layers: int, name: str, class_word: str, seed: int) -> ConceptEffects:
    generator = torch.Generator().manual_seed(seed)
    paths = [f"unet.{n}" for n, m in pipeline.unet.named_modules() if isinstance(m, torch.nn.Linear)
             and ".attn" in n and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")]
    paths += [f"text_encoder.{n}" for n, m in pipeline.text_encoder.named_modules()
              if isinstance(m, torch.nn.Linear) and "self_attn" in n]
    deltas, factors = {}, {}
    for path in paths:
        weight = get_linear(pipeline, path).weight.detach()
        if path.startswith("unet."):  # LoRA factors, as a saved ED-LoRA holds them; ΔW = up @ down
            scale = (0.3 * weight.std() / RANK ** 0.5) ** 0.5
            up = scale * torch.randn(weight.shape[0], RANK, generator=generator)
            down = scale * torch.randn(RANK, weight.shape[1], generator=generator)
            factors[path] = (up, down)
            deltas[path] = up @ down
        else:
            deltas[path] = 0.3 * weight.std() * torch.randn(weight.shape, generator=generator)
    width = pipeline.text_encoder.get_input_embeddings().weight.shape[1]
    embeddings = {t: torch.randn(width, generator=generator) for t in concept_token_strings(name, n_layers)}
    return ConceptEffects({"name": name, "class_word": class_word, "lora_factors": factors}, embeddings=embeddings,
                          deltas=deltas)


def bare_copy(unet):
    """A deep copy of ``unet`` without the hooks active on its attention controller."""
    controller = unet.attention_controller
    hooks, controller.hooks = controller.hooks, []
    try:
        return copy.deepcopy(unet)
    finally:
        controller.hooks = hooks


def merge_into(unet, concepts, scale: float) -> float:
    """The reference's merge (``merge_lora_into_weight``): a deep copy of the UNet's state dict with
    W0 + scale * (up @ down) at the adapted weights, loaded back with ``load_state_dict``. Returns
    the process seconds spent forming up @ down (a reference-only cost: ours forms ΔW once)."""
    state = copy.deepcopy(unet.state_dict())
    product_seconds = 0.0
    for concept in concepts:
        for path, (up, down) in concept.meta["lora_factors"].items():
            key = path.removeprefix("unet.") + ".weight"
            start = time.process_time()
            delta = up @ down
            product_seconds += time.process_time() - start
            state[key] = state[key] + scale * delta.to(state[key].dtype)
    unet.load_state_dict(state)
    return product_seconds


class FullForwardHooks(ConductorHooks):
    """The reference's alignment pass: the keys read at the alignment layer, the UNet run to its end."""

    def edit_key_value(self, layer, query, key, value, context):
        try:
            return super().edit_key_value(layer, query, key, value, context)
        except StopForward:
            return key, value


class DeepcopyBatch(ConductorBatch):
    """The reference's strategy: per pass, per concept branch, a deep copy of the base UNet with
    that branch's adapter merged; concept branches first, then the base rows on the base UNet."""

    def __init__(self, *args, template=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hooks = FullForwardHooks(self.core.controller.layers, self.alignment_layer, self.mask_layer,
                                      self.map_layer)
        self.template = template  # the base UNet without the batched strategy's hooks
        self.copy_seconds = 0.0  # process time in deep copies, merges and the reference's gc.collect() calls
        self.gc_seconds = 0.0  # of which gc.collect()
        self.reference_only_seconds = 0.0  # the reference's per-alignment-step key pass and its up @ down products

    def _collect(self) -> None:
        start = time.process_time()
        gc.collect()
        self.gc_seconds += time.process_time() - start

    def _run_on(self, unet, sample, timestep, conditioning, rows):
        unet.attention_controller.hooks = self.core.controller.hooks
        handles = self.hooks.install(unet)
        self.hooks.begin_call(rows)
        try:  # FullForwardHooks: every pass runs to the end, as the reference's do
            return unet(sample, timestep, encoder_hidden_states=conditioning).sample
        finally:
            for handle in handles:
                handle.remove()
            unet.attention_controller.hooks = []

    @torch.no_grad()
    def _reference_key_pass(self, sample, timestep, conditioning) -> None:
        """The reference's no-grad base pass on the reference latent at each alignment step, the whole
        UNet (a stand-in latent of its shape; the keys are discarded)."""
        start = time.process_time()
        self.template.attention_controller.hooks = [KeyRecorder(self.alignment_layer)]
        try:
            self.template(sample.detach(), timestep, encoder_hidden_states=conditioning.detach())
        finally:
            self.template.attention_controller.hooks = []
        self.reference_only_seconds += time.process_time() - start

    def _unet(self, sample, timestep, conditioning, rows):
        n_rows, halves = len(rows), sample.shape[0] // len(rows)
        out: list = [None] * sample.shape[0]
        for adapter in sorted({row.adapter for row in rows}, key=lambda a: (a == 0, a)):
            picked = [r for r, row in enumerate(rows) if row.adapter == adapter]
            index = torch.tensor([h * n_rows + r for h in range(halves) for r in picked])
            if adapter:
                start = time.process_time()
                unet = bare_copy(self.template)
                self.reference_only_seconds += merge_into(unet, self.branches[adapter], self.config.lora_scale)
                if self.hooks.aligning:  # the reference collects garbage here in its guidance pass
                    self._collect()
                self.copy_seconds += time.process_time() - start
            else:
                unet = self.template
                if self.hooks.aligning:
                    self._reference_key_pass(sample[index], timestep, conditioning[index])
            result = self._run_on(unet, sample[index], timestep, conditioning[index], [rows[r] for r in picked])
            if adapter:
                start = time.process_time()
                del unet
                self._collect()  # the reference frees each copy (del, gc.collect, cuda.empty_cache) after its call
                self.copy_seconds += time.process_time() - start
            for k, i in enumerate(index.tolist()):
                out[i] = result[k]
        return torch.stack(out)


class Timed:
    """Accumulates the process time a batch spends in mask refinement."""

    def __init__(self, batch):
        self.seconds = 0.0
        original = batch.refine

        def refine():
            start = time.process_time()
            original()
            self.seconds += time.process_time() - start

        batch.refine = refine


def run_once(core, cls, requests, adapters, resolution, settings, layouts, **extra):
    batch = cls(core, requests, adapters, resolution, settings, want_maps=False, layout_images=layouts, **extra)
    timer = Timed(batch)
    start = time.process_time()
    latents = batch.run()
    return (time.process_time() - start, timer.seconds,
            (getattr(batch, "copy_seconds", 0.0), getattr(batch, "gc_seconds", 0.0),
             getattr(batch, "reference_only_seconds", 0.0)), latents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="built:160,320,640,640",
                        help="embedded:tiny-sd, or built:<widths> (default: SD 1.5's UNet layout at half width, 252 M)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=2, help="images per batch (seeds 0..n-1)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kmeans-inits", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)

    pipeline = load_model(args.model)
    core = SamplingCore(pipeline)
    resolution = args.resolution or pipeline.unet.config.sample_size * 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    concepts = {name: random_concept(pipeline, core.n_layers, name, word, seed)
                for seed, (name, word) in enumerate(NAMES, start=1)}
    template = bare_copy(pipeline.unet)
    settings = GenerateConfig(sampler="conductor", steps=args.steps, batch_size=args.images,
                              conductor={"kmeans_inits": args.kmeans_inits})
    params = sum(p.numel() for p in pipeline.unet.parameters()) / 1e6
    print(f"model {args.model} (UNet {params:.0f} M parameters), {resolution} px, {args.steps} steps, {args.images} images per batch, "
          f"kmeans inits {args.kmeans_inits}, torch threads {torch.get_num_threads()}, load {os.getloadavg()}")
    speedups = {}
    for k in (2, 3):
        adapters = {name: concepts[name] for name, _ in NAMES[:k]}
        requests = [SampleRequest(PROMPTS[k], seed) for seed in range(args.images)]
        probe = ConductorBatch(core, requests, adapters, resolution, settings)
        layouts = core.decode(probe.plain_base())  # the base's drawings; their inversions are cached below
        run_once(core, ConductorBatch, requests, adapters, resolution, settings, layouts)  # warm-up + inversion
        best = {"batched": (np.inf, 0.0, (0.0, 0.0, 0.0)), "deepcopy": (np.inf, 0.0, (0.0, 0.0, 0.0))}
        results = {}
        for _ in range(args.repeats):
            for name, cls, extra in (("batched", ConductorBatch, {}), ("deepcopy", DeepcopyBatch, {"template": template})):
                seconds, refine_seconds, copy_seconds, latents = run_once(core, cls, requests, adapters, resolution,
                                                                          settings, layouts, **extra)
                if seconds < best[name][0]:
                    best[name] = (seconds, refine_seconds, copy_seconds)
                results[name] = latents
        latent_diff = (results["batched"] - results["deepcopy"]).abs().max().item()
        images = [np.stack([np.asarray(im, dtype=np.int16) for im in core.decode(results[n])]) for n in results]
        image_diff = int(np.abs(images[0] - images[1]).max())
        same = latent_diff <= LATENT_TOLERANCE and image_diff <= IMAGE_TOLERANCE
        speedups[k] = best["deepcopy"][0] / best["batched"][0]
        excluding = (best["deepcopy"][0] - best["deepcopy"][1]) / (best["batched"][0] - best["batched"][1])
        reference_only = best["deepcopy"][2][2]
        without_reference_only = (best["deepcopy"][0] - reference_only) / best["batched"][0]
        print(f"K={k}: batched {best['batched'][0]:.2f} s (refinement {best['batched'][1]:.2f} s), deepcopy "
              f"{best['deepcopy'][0]:.2f} s (refinement {best['deepcopy'][1]:.2f} s, copies, merges and gc "
              f"{best['deepcopy'][2][0]:.2f} s, of which gc.collect {best['deepcopy'][2][1]:.2f} s); speedup {speedups[k]:.2f}x, "
              f"{excluding:.2f}x without refinement, {without_reference_only:.2f}x without the reference-only key passes and "
              f"up @ down products ({reference_only:.2f} s); max abs diff latents {latent_diff:.2e}, images {image_diff} "
              f"(8-bit levels) -> {'same within tolerance' if same else 'DIFFERENT'}")
    print(f"load {os.getloadavg()}")
    print(f"speedup batched vs deepcopy = {speedups[2]:.2f}")


if __name__ == "__main__":
    main()
