"""A saved Textual Localization concept: its tokens and the group's K/V updates, as deltas."""

from __future__ import annotations

import torch

from conceptflow.adapters.effects import ConceptEffects
from conceptflow.errors import ConceptflowError


def read_textual_localization(tensors: dict[str, torch.Tensor], meta: dict, pipeline) -> ConceptEffects:
    del pipeline  # ΔW does not depend on the base weights
    wrong = sorted(key for key in tensors if not key.startswith("unet.") or not key.endswith((".to_k", ".to_v")))
    if wrong:
        raise ConceptflowError(f"a textual_localization concept holds cross-attention K/V deltas only; found {wrong[:3]}")
    return ConceptEffects(meta, deltas={key: value.float() for key, value in tensors.items()})
