"""A saved ED-LoRA adapter as merged updates: ΔW = alpha · B @ A per adapted linear."""

from __future__ import annotations

import torch

from conceptflow.adapters.concept_io import split_prefix
from conceptflow.adapters.effects import ConceptEffects
from conceptflow.methods.edlora.lora import lora_deltas
from conceptflow.methods.edlora.trainer import MODEL_NAMES


def edlora_deltas(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Merged updates ``{"unet.<path>" | "text_encoder.<path>": alpha * B @ A}`` of a saved ED-LoRA."""
    deltas = {}
    for model_name in MODEL_NAMES:
        part = split_prefix(tensors, f"{model_name}.")
        deltas.update({f"{model_name}.{path}": delta for path, delta in lora_deltas(part, meta["alpha"]).items()})
    return deltas


def read_edlora(tensors: dict[str, torch.Tensor], meta: dict, pipeline) -> ConceptEffects:
    del pipeline  # the update does not depend on the base weights
    return ConceptEffects(meta, deltas=edlora_deltas(tensors, meta))
