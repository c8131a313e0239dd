"""Closed-form gradient fusion vs the Mix-of-Show L-BFGS reference on the same captured inputs.

    HF_HUB_OFFLINE=1 python benchmarks/fusion.py [--model embedded:tiny-sd] [--concepts 3]

Every text-encoder q/k/v/out_proj and every UNet attention to_q/k/v/out.0 gets a random
rank-4 update per concept (stand-ins for trained LoRAs). Each concept's input Grams are
captured with its own merged weights, as Mix-of-Show does: the text encoder on the concept's
prompts, then the UNet for a few denoising steps from random latents on the concept's text
embeddings (the sampling core's ``denoise`` without guidance, as gradient fusion captures). Both solvers then fuse every layer from those Grams; L-BFGS gets Mix-of-Show's
budgets (500 iterations for text-encoder and cross-attention K/V layers, 50 for the rest).

To benchmark real concepts, replace ``capture_random_concepts`` by a function with the same
result: per concept, ``{layer name: ΔW}`` and ``{layer name: (Gram, token count)}``.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
from torch import nn

from conceptflow.fuse.gram import GramRecorder
from conceptflow.fuse.solvers import (
    SPATIAL_ITERATIONS,
    TEXT_AND_KV_ITERATIONS,
    closed_form_fuse,
    fusion_objective,
    lbfgs_fuse,
)
from conceptflow.models.loading import load_base_pipeline
from conceptflow.sample.core import SamplingCore

TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
CROSS_KV = ("attn2.to_k", "attn2.to_v")
# Mix-of-Show's capture prompts (gradient_fusion.py TEMPLATE_SIMPLE and the bare concept name).
PROMPT_TEMPLATES = ("photo of a {}", "{}")
CONCEPT_WORDS = ("dog", "teapot", "cat")


def adapted_linears(pipeline) -> dict[str, nn.Linear]:
    """The layers gradient fusion rewrites, as ``{"text_encoder.<path>" | "unet.<path>": module}``."""
    layers = {}
    for prefix, model, suffixes in (("text_encoder", pipeline.text_encoder, TEXT_LINEARS),
                                    ("unet", pipeline.unet, UNET_LINEARS)):
        for path, module in model.named_modules():
            if isinstance(module, nn.Linear) and path.endswith(suffixes):
                layers[f"{prefix}.{path}"] = module
    return layers


def lbfgs_iterations(layer_name: str) -> int:
    is_text_fed = layer_name.startswith("text_encoder.") or layer_name.endswith(CROSS_KV)
    return TEXT_AND_KV_ITERATIONS if is_text_fed else SPATIAL_ITERATIONS


def random_lora_delta(weight: torch.Tensor, generator: torch.Generator, rank: int = 4, relative_norm: float = 0.1):
    """up @ down of the given rank, scaled to ``relative_norm`` of ‖W0‖ (a trained LoRA's order)."""
    up = torch.randn(weight.shape[0], rank, generator=generator)
    down = torch.randn(rank, weight.shape[1], generator=generator)
    delta = up @ down
    return delta * (relative_norm * weight.norm() / delta.norm())


@contextmanager
def merged_weights(layers: dict[str, nn.Linear], deltas: dict[str, torch.Tensor]):
    """Temporarily set every layer to W0 + ΔW (one concept's own model)."""
    originals = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight += deltas[name].to(layer.weight)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.copy_(originals[name])


@torch.no_grad()
def record_concept_inputs(pipeline, layers, word: str, denoising_steps: int, generator: torch.Generator):
    """Grams of every layer's inputs while the (already merged) model runs on one concept."""
    text_layers = {name: layer for name, layer in layers.items() if name.startswith("text_encoder.")}
    unet_layers = {name: layer for name, layer in layers.items() if name.startswith("unet.")}
    prompts = [template.format(word) for template in PROMPT_TEMPLATES]
    with GramRecorder(text_layers) as text_recorder:
        for prompt in prompts:  # unpadded, as Mix-of-Show captures text-encoder inputs
            ids = pipeline.tokenizer(prompt, return_tensors="pt").input_ids
            pipeline.text_encoder(ids)
    padded = pipeline.tokenizer(prompts[:1], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
    embeddings = pipeline.text_encoder(padded)[0]

    unet = pipeline.unet
    size = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=generator)
    with GramRecorder(unet_layers) as unet_recorder:
        SamplingCore(pipeline).denoise(latents, embeddings, denoising_steps)
    recorders = (text_recorder, unet_recorder)
    return {name: (recorder.grams[name], recorder.counts[name]) for recorder in recorders for name in recorder.grams}


def capture_random_concepts(pipeline, layers, num_concepts: int, denoising_steps: int, seed: int):
    """Per concept: random rank-4 deltas for every layer and the Grams captured under them."""
    generator = torch.Generator().manual_seed(seed)
    concept_deltas, concept_grams = [], []
    for word in CONCEPT_WORDS[:num_concepts]:
        deltas = {name: random_lora_delta(layer.weight.detach(), generator) for name, layer in layers.items()}
        with merged_weights(layers, deltas):
            concept_grams.append(record_concept_inputs(pipeline, layers, word, denoising_steps, generator))
        concept_deltas.append(deltas)
    return concept_deltas, concept_grams


def fuse_every_layer(layers, concept_deltas, concept_grams):
    """Both solvers on every layer; per layer: (name, objective and seconds of each, objective at W0)."""
    rows = []
    for name, layer in layers.items():
        base = layer.weight.detach()
        deltas = [deltas[name] for deltas in concept_deltas]
        grams = [grams[name][0] for grams in concept_grams]
        counts = [grams[name][1] for grams in concept_grams]
        start = time.perf_counter()
        closed = closed_form_fuse(base, deltas, grams)
        closed_seconds = time.perf_counter() - start
        start = time.perf_counter()
        iterative = lbfgs_fuse(base, deltas, grams, lbfgs_iterations(name), token_counts=counts)
        lbfgs_seconds = time.perf_counter() - start
        rows.append(dict(name=name,
                         closed=fusion_objective(closed, base, deltas, grams), closed_seconds=closed_seconds,
                         lbfgs=fusion_objective(iterative, base, deltas, grams), lbfgs_seconds=lbfgs_seconds,
                         start=fusion_objective(base, base, deltas, grams)))
    return rows


def layer_group(name: str) -> str:
    if name.startswith("text_encoder."):
        return "text encoder"
    return "cross-attn K/V" if name.endswith(CROSS_KV) else "other UNet"


def report(rows) -> None:
    for group in ("text encoder", "cross-attn K/V", "other UNet"):
        members = [row for row in rows if layer_group(row["name"]) == group]
        closed, lbfgs, start = (sum(row[key] for row in members) for key in ("closed", "lbfgs", "start"))
        # Per layer, relative to the objective at W0, so layers solved to ~0 do not give 0/0.
        worst = max((row["closed"] - row["lbfgs"]) / row["start"] for row in members)
        print(f"{group:15s} {len(members):2d} layers  objective at W0 {start:.4e}  closed form {closed:.4e}  "
              f"L-BFGS {lbfgs:.4e}  worst per-layer (closed-lbfgs)/f(W0) {worst:+.1e}")
    closed_seconds = sum(row["closed_seconds"] for row in rows)
    lbfgs_seconds = sum(row["lbfgs_seconds"] for row in rows)
    print(f"time closed_form {closed_seconds:.3f} s  lbfgs {lbfgs_seconds:.3f} s")
    total_closed, total_lbfgs = sum(row["closed"] for row in rows), sum(row["lbfgs"] for row in rows)
    print(f"objective closed_form/lbfgs = {total_closed / total_lbfgs:.6f}")
    print(f"speedup closed_form vs lbfgs = {lbfgs_seconds / closed_seconds:.1f}")


def warm_up_solvers() -> None:
    """Pay one-time costs (LAPACK and optimizer first calls, seconds for L-BFGS) before timing."""
    base, gram = torch.randn(2, 2), torch.eye(2, dtype=torch.float64)
    closed_form_fuse(base, [None], [gram])
    lbfgs_fuse(base, [None], [gram], iterations=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:tiny-sd")
    parser.add_argument("--concepts", type=int, default=3, choices=(2, 3))
    parser.add_argument("--denoising-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on tiny layers more threads only add overhead (use more for SD 1.5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipeline = load_base_pipeline(args.model)
    layers = adapted_linears(pipeline)
    concept_deltas, concept_grams = capture_random_concepts(pipeline, layers, args.concepts, args.denoising_steps,
                                                            args.seed)
    warm_up_solvers()
    report(fuse_every_layer(layers, concept_deltas, concept_grams))


if __name__ == "__main__":
    main()
