"""Write concepts' mergeable effects into a base pipeline, and build a fused model's tensors.

A concept's merged updates ΔW (what fusion works on) and a fused model's full weights are
applied by writing weights in place, its token embeddings by adding rows to the tokenizer and
the text encoder. Reading a concept folder is ``conceptflow.methods.read_concept``; run-time
channels (token-position updates, text residuals) are ``conceptflow.adapters.branched``.

A fused model's file holds ``weight.<path>`` (full fused weights), ``embedding.<token>`` and,
for the concepts with run-time channels, ``runtime.<k>.token_delta.<path>`` and
``runtime.<k>.text_residual.<j>`` with their tokens in ``concept.json``'s ``runtime_parts[k]``
(``fused_runtime_tensors`` / ``read_fused``): gradient fusion cannot merge an update that acts
only at some tokens, so the fused model carries it to run time unchanged (scaled by the
fusion's adapter scale, as the merged updates are).
"""

from __future__ import annotations

from typing import Mapping

import torch

from conceptflow.adapters.concept_io import EMBEDDING_PREFIX, WEIGHT_PREFIX, get_linear, set_weights
from conceptflow.adapters.effects import ConceptEffects, TextResidual, TokenDelta
from conceptflow.adapters.tokens import write_embeddings
from conceptflow.errors import ConceptflowError


def base_weights(pipeline, paths) -> dict[str, torch.Tensor]:
    return {path: get_linear(pipeline, path).weight.detach().clone() for path in paths}


def apply_concepts(pipeline, concepts: list[ConceptEffects], scale: float = 1.0) -> None:
    """Load concepts into ``pipeline``: tokens, and W0 + scale * ΣΔW (or a fused model's weights)."""
    runtime_only = [concept.name for concept in concepts if not concept.mergeable]
    if runtime_only:
        raise ConceptflowError(
            f"concepts {runtime_only} act at run time (token-position updates or text residuals) and cannot be "
            "merged into the weights; apply them with conceptflow.adapters.branched instead")
    for concept in concepts:
        write_embeddings(pipeline.tokenizer, pipeline.text_encoder, concept.embeddings)
    summed: dict[str, torch.Tensor] = {}
    for concept in concepts:
        for path, delta in concept.deltas.items():
            summed[path] = summed.get(path, 0) + scale * delta
    updated = {path: get_linear(pipeline, path).weight.detach().float() + delta for path, delta in summed.items()}
    for concept in concepts:
        updated.update(concept.weights)
    set_weights(pipeline, updated)


def merged_embeddings(concepts: list[ConceptEffects]) -> dict[str, torch.Tensor]:
    embeddings: dict[str, torch.Tensor] = {}
    for concept in concepts:
        clash = set(embeddings) & set(concept.embeddings)
        if clash:
            raise ConceptflowError(f"two concepts define the same tokens {sorted(clash)[:2]}: rename one concept")
        embeddings.update(concept.embeddings)
    return embeddings


RUNTIME_PREFIX = "runtime."


def fused_runtime_tensors(concepts: list[ConceptEffects], scale: float) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The run-time channels of ``concepts`` as a fused model stores them: (tensors, the
    ``runtime_parts`` list of concept.json), token deltas scaled by ``scale``."""
    tensors: dict[str, torch.Tensor] = {}
    parts: list[dict] = []
    for concept in concepts:
        part = concept.runtime_part()
        if part is None:
            continue
        k = len(parts)
        for path, token_delta in part.token_deltas.items():
            tensors[f"{RUNTIME_PREFIX}{k}.token_delta.{path}"] = scale * token_delta.delta.float()
        for j, residual in enumerate(part.text_residuals):
            tensors[f"{RUNTIME_PREFIX}{k}.text_residual.{j}"] = residual.vector.float()
        parts.append({"name": part.name, "method": part.meta.get("method"),
                      "token_deltas": {path: list(td.tokens) for path, td in part.token_deltas.items()},
                      "text_residuals": [residual.token for residual in part.text_residuals]})
        if part.meta.get("prompt_word"):
            parts[-1]["prompt_word"] = part.meta["prompt_word"]
    return tensors, parts


def read_fused(tensors: Mapping[str, torch.Tensor], meta: dict) -> ConceptEffects:
    """A fused model's effects: its full weights and token rows, its concepts' run-time parts."""
    embeddings = {key.removeprefix(EMBEDDING_PREFIX): v for key, v in tensors.items() if key.startswith(EMBEDDING_PREFIX)}
    weights = {key.removeprefix(WEIGHT_PREFIX): v for key, v in tensors.items() if key.startswith(WEIGHT_PREFIX)}
    parts = []
    for k, part in enumerate(meta.get("runtime_parts", [])):
        prefix = f"{RUNTIME_PREFIX}{k}."
        token_deltas = {path: TokenDelta(tensors[f"{prefix}token_delta.{path}"], tuple(tokens))
                        for path, tokens in part["token_deltas"].items()}
        residuals = [TextResidual(token, tensors[f"{prefix}text_residual.{j}"])
                     for j, token in enumerate(part["text_residuals"])]
        part_meta = {"name": part["name"], "method": part.get("method")}
        if part.get("prompt_word"):
            part_meta["prompt_word"] = part["prompt_word"]
        parts.append(ConceptEffects(part_meta, token_deltas=token_deltas, text_residuals=residuals))
    return ConceptEffects(meta, embeddings, weights=weights, parts=parts)


def fused_tensors(weights: Mapping[str, torch.Tensor], embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {f"{WEIGHT_PREFIX}{path}": w for path, w in weights.items()}
    tensors.update({f"{EMBEDDING_PREFIX}{token}": e for token, e in embeddings.items()})
    return tensors
