"""Mix-of-Show gradient fusion on a pipeline: capture each concept's layer inputs, then solve.

For every adapted linear layer, W = argmin Σ_i ‖W X_i − (W0 + s·ΔW_i) X_i‖², with X_i the
layer's inputs *for concept i* (Mix-of-Show §3.3, ConceptFlow A.2.2), in Mix-of-Show's order:

1. text-encoder layers: token activations of "photo of a <c>" and "<c>" (every layer variant)
   through concept i's own text encoder;
2. cross-attention K/V: the *fused* text encoder's output at concept i's tokens and EOS, each
   cross-attention layer reading its own layer variant;
3. every other UNet layer: activations recorded while sampling 20 steps with concept i's own
   model, without classifier-free guidance (the sampling core's ``denoise`` with guidance off).

Only Gram matrices X Xᵀ are accumulated (``GramRecorder``); the solve is the exact closed form
anchored at W0 (or the L-BFGS reference, a setting).
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from conceptflow.adapters.branched import runtime_concepts
from conceptflow.adapters.concept_io import get_linear, set_weights
from conceptflow.adapters.effects import ConceptEffects
from conceptflow.adapters.tokens import expand_prompt, layer_token, prompt_words, write_embeddings
from conceptflow.attention.processor import attention_controller_of
from conceptflow.fuse.gram import GramRecorder
from conceptflow.fuse.solvers import (
    SPATIAL_ITERATIONS,
    TEXT_AND_KV_ITERATIONS,
    closed_form_fuse,
    fusion_objective,
    lbfgs_fuse,
)
from conceptflow.sample.core import SamplingCore

TEXT_PROMPTS = ("photo of a {}", "{}")
SAMPLING_PROMPTS = ("a photo of a {}", "a {} in a garden", "a close-up photo of a {}")
CAPTURE_STEPS = 20


def _load_concept_weights(pipeline, base: Mapping[str, torch.Tensor], concept: ConceptEffects | None,
                          scale: float, paths: Sequence[str]) -> None:
    """Set ``paths`` to W0 + s·ΔW of ``concept`` (W0 where it has none, or for None)."""
    updates = {}
    for path in paths:
        delta = concept.deltas.get(path) if concept is not None else None
        updates[path] = base[path].float() + scale * delta if delta is not None else base[path]
    set_weights(pipeline, updates)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, truncation=True).input_ids])


@torch.no_grad()
def capture_text_encoder(pipeline, concept_name: str, n_layers: int, paths: Sequence[str]) -> dict[str, torch.Tensor]:
    modules = {path: get_linear(pipeline, path) for path in paths}
    with GramRecorder(modules) as recorder:
        for layer in range(n_layers):
            for template in TEXT_PROMPTS:
                prompt = expand_prompt(template.format(f"<{concept_name}>"), layer, [concept_name],
                                       prompt_words(pipeline.tokenizer))
                pipeline.text_encoder(_ids(pipeline.tokenizer, prompt).to(pipeline.text_encoder.device))
    return recorder.grams


@torch.no_grad()
def capture_cross_attention_kv(pipeline, concept_name: str, paths: Sequence[str]) -> dict[str, torch.Tensor]:
    """Grams of the (fused) text encoder's output at the concept tokens and EOS, per cross layer."""
    controller = attention_controller_of(pipeline.unet)
    grams: dict[str, torch.Tensor] = {}
    wanted = set(paths)
    for layer in controller.cross_layers:
        targets = [p for p in (f"unet.{layer.name}.to_k", f"unet.{layer.name}.to_v") if p in wanted]
        if not targets:
            continue
        words = prompt_words(pipeline.tokenizer)  # a concept written as a word (Cones 2): its word's token
        token_ids = set(pipeline.tokenizer(words[concept_name], add_special_tokens=False).input_ids
                        if concept_name in words else pipeline.tokenizer.convert_tokens_to_ids(
                            [layer_token(concept_name, 1, layer.index), layer_token(concept_name, 2, layer.index)]))
        gram = None
        for template in TEXT_PROMPTS:
            ids = _ids(pipeline.tokenizer, expand_prompt(template.format(f"<{concept_name}>"), layer.index, [concept_name],
                                                         words))
            hidden = pipeline.text_encoder(ids.to(pipeline.text_encoder.device))[0][0].double()
            keep = [i for i, t in enumerate(ids[0].tolist()) if t in token_ids or t == pipeline.tokenizer.eos_token_id]
            selected = hidden[keep]
            gram = selected.T @ selected if gram is None else gram + selected.T @ selected
        for target in targets:
            grams[target] = gram
    return grams


@torch.no_grad()
def capture_unet(pipeline, concept_name: str, paths: Sequence[str], resolution: int, seed: int,
                 steps: int = CAPTURE_STEPS) -> dict[str, torch.Tensor]:
    """Grams of the UNet layers' inputs while sampling ``steps`` steps (no CFG) with the concept."""
    core = SamplingCore(pipeline)
    prompts = [template.format(f"<{concept_name}>") for template in SAMPLING_PROMPTS]
    text = core.encode(prompts, [concept_name])
    latents = core.initial_latents([seed + i for i in range(len(prompts))], resolution)
    modules = {path: get_linear(pipeline, path) for path in paths}
    with GramRecorder(modules) as recorder:
        core.denoise(latents, text, steps)
    return recorder.grams


def _solve(base: Mapping[str, torch.Tensor], concepts: Sequence[ConceptEffects], grams: Sequence[Mapping[str, torch.Tensor]],
           paths: Sequence[str], scale: float, solver: str, iterations: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    fused, objective_fused, objective_base = {}, 0.0, 0.0
    for path in paths:
        deltas = [scale * c.deltas[path] if path in c.deltas else None for c in concepts]
        layer_grams = [g.get(path) for g in grams]
        present = [(d, g) for d, g in zip(deltas, layer_grams) if g is not None]
        if not present:
            fused[path] = base[path]
            continue
        layer_deltas, layer_grams = [d for d, _ in present], [g for _, g in present]
        if solver == "lbfgs":
            weight = lbfgs_fuse(base[path], layer_deltas, layer_grams, iterations)
        else:
            weight = closed_form_fuse(base[path], layer_deltas, layer_grams)
        fused[path] = weight
        objective_fused += fusion_objective(weight, base[path], layer_deltas, layer_grams)
        objective_base += fusion_objective(base[path], base[path], layer_deltas, layer_grams)
    return fused, {"objective": objective_fused, "objective_at_base": objective_base}


def _runtime_channels(pipeline, concept: ConceptEffects, scale: float):
    """A concept's run-time channels applied while its inputs are captured, so they are captured
    as it samples: a ToVA token delta (scaled like the merged updates), a Cones 2 residual with its
    ``<name>`` written as its word (``meta["prompt_word"]``); nothing for a mergeable concept."""
    part = concept.runtime_part()
    return contextlib.nullcontext() if part is None else runtime_concepts(pipeline, [part], scale=scale)


def gradient_fuse(pipeline, catalog, combination, concepts: list[ConceptEffects],
                  base: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Fused weights for every layer any concept adapts, and the objectives reached."""
    scale, solver = catalog.fuse.adapter_scale, catalog.fuse.solver
    controller = attention_controller_of(pipeline.unet)
    n_layers = controller.n_cross_layers
    for concept in concepts:
        write_embeddings(pipeline.tokenizer, pipeline.text_encoder, concept.embeddings)
    names = [concept.meta["name"] for concept in concepts]
    paths = sorted(base)
    text_paths = [p for p in paths if p.startswith("text_encoder.")]
    cross_names = {layer.name for layer in controller.cross_layers}
    kv_paths = [p for p in paths if p.startswith("unet.") and p.rsplit(".", 1)[0].removeprefix("unet.") in cross_names
                and p.endswith((".to_k", ".to_v"))]
    rest_paths = [p for p in paths if p.startswith("unet.") and p not in kv_paths]
    metrics: dict[str, float] = {}
    fused: dict[str, torch.Tensor] = {}

    progress = tqdm(total=3 * len(concepts), desc=f"fuse {combination.name}", leave=False)
    text_grams = []
    for concept, name in zip(concepts, names):
        _load_concept_weights(pipeline, base, concept, scale, paths)
        with _runtime_channels(pipeline, concept, scale):
            text_grams.append(capture_text_encoder(pipeline, name, n_layers, text_paths))
        progress.update()
    text_fused, text_metrics = _solve(base, concepts, text_grams, text_paths, scale, solver, TEXT_AND_KV_ITERATIONS)
    fused.update(text_fused)

    _load_concept_weights(pipeline, base, None, scale, paths)
    set_weights(pipeline, text_fused)  # K/V inputs come from the fused text encoder
    kv_grams = []
    for concept, name in zip(concepts, names):
        with _runtime_channels(pipeline, concept, scale):
            kv_grams.append(capture_cross_attention_kv(pipeline, name, kv_paths))
        progress.update()
    kv_fused, kv_metrics = _solve(base, concepts, kv_grams, kv_paths, scale, solver, TEXT_AND_KV_ITERATIONS)
    fused.update(kv_fused)

    unet_grams = []
    for concept, name in zip(concepts, names):
        _load_concept_weights(pipeline, base, concept, scale, paths)
        with _runtime_channels(pipeline, concept, scale):
            unet_grams.append(capture_unet(pipeline, name, rest_paths, catalog.resolution, catalog.seed))
        progress.update()
    rest_fused, rest_metrics = _solve(base, concepts, unet_grams, rest_paths, scale, solver, SPATIAL_ITERATIONS)
    fused.update(rest_fused)
    progress.close()
    _load_concept_weights(pipeline, base, None, scale, paths)

    for group, values in (("text_encoder", text_metrics), ("cross_kv", kv_metrics), ("unet", rest_metrics)):
        metrics.update({f"{group}.{key}": value for key, value in values.items()})
    return fused, metrics
