"""Read trained concepts and fused models into a base pipeline.

Every method's adapter reduces, per adapted linear layer, to a merged update ΔW (what fusion
works on); a fused model stores the full new weights. Both are applied by writing weights in
place and adding the concepts' token embeddings to the tokenizer and text encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

from conceptflow.adapters.concept_io import (
    EMBEDDING_PREFIX,
    WEIGHT_PREFIX,
    ConceptWeights,
    get_linear,
    read_adapter,
    set_weights,
    split_prefix,
)
from conceptflow.adapters.tokens import write_embeddings
from conceptflow.errors import ConceptflowError

# method -> f(adapter tensors, concept.json, base pipeline) -> {"unet.<path>": ΔW, ...}
DeltaReader = Callable[[dict[str, torch.Tensor], dict, object], dict[str, torch.Tensor]]


def _edlora(tensors, meta, pipeline):
    from conceptflow.train.edlora import edlora_deltas

    return edlora_deltas(tensors, meta)


def _krona_wed(tensors, meta, pipeline):
    from conceptflow.train.conceptflow_s import krona_wed_deltas

    return krona_wed_deltas(tensors, meta, pipeline)


DELTA_READERS: dict[str, DeltaReader] = {"edlora": _edlora, "conceptflow_s": _krona_wed}


def load_concept(folder: Path, pipeline) -> ConceptWeights:
    """Embeddings and merged updates of a trained concept (or the full weights of a fused model)."""
    tensors, meta = read_adapter(folder)
    embeddings = split_prefix(tensors, EMBEDDING_PREFIX)
    if meta.get("kind") == "fused":
        return ConceptWeights(meta, embeddings, weights=split_prefix(tensors, WEIGHT_PREFIX))
    method = meta.get("method")
    if method not in DELTA_READERS:
        raise ConceptflowError(f"{folder}/concept.json names unknown method {method!r}; known: {sorted(DELTA_READERS)}")
    adapter_tensors = {k: v for k, v in tensors.items() if not k.startswith(EMBEDDING_PREFIX)}
    return ConceptWeights(meta, embeddings, deltas=DELTA_READERS[method](adapter_tensors, meta, pipeline))


def base_weights(pipeline, paths) -> dict[str, torch.Tensor]:
    return {path: get_linear(pipeline, path).weight.detach().clone() for path in paths}


def apply_concepts(pipeline, concepts: list[ConceptWeights], scale: float = 1.0) -> None:
    """Load concepts into ``pipeline``: tokens, and W0 + scale * ΣΔW (or a fused model's weights)."""
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


def merged_embeddings(concepts: list[ConceptWeights]) -> dict[str, torch.Tensor]:
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
