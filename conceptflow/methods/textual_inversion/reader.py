"""A textual-inversion concept changes no weights: its effect is its token embeddings alone."""

from __future__ import annotations

import torch

from conceptflow.adapters.effects import ConceptEffects


def read_textual_inversion(tensors: dict[str, torch.Tensor], meta: dict, pipeline) -> ConceptEffects:
    del tensors, pipeline  # the shared loader adds the embedding rows
    return ConceptEffects(meta)
