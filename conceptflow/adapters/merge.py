"""Write concepts' mergeable effects into a base pipeline, and build a fused model's tensors.

A concept's merged updates ΔW (what fusion works on) and a fused model's full weights are
applied by writing weights in place, its token embeddings by adding rows to the tokenizer and
the text encoder. Reading a concept folder is ``conceptflow.methods.read_concept``; run-time
channels (token-position updates, text residuals) are ``conceptflow.adapters.branched``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from conceptflow.adapters.concept_io import EMBEDDING_PREFIX, WEIGHT_PREFIX, get_linear, set_weights
from conceptflow.adapters.effects import ConceptEffects
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


def fused_tensors(weights: Mapping[str, torch.Tensor], embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {f"{WEIGHT_PREFIX}{path}": w for path, w in weights.items()}
    tensors.update({f"{EMBEDDING_PREFIX}{token}": e for token, e in embeddings.items()})
    return tensors
