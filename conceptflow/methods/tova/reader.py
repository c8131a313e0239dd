"""A saved ToVA concept as token deltas: ΔW = alpha · B @ A per adapted projection, at its tokens.

The update cannot be merged into the weights (it must not act at other tokens), so it is a
run-time channel (``ConceptEffects.token_deltas``), applied by ``adapters.branched``.
"""

from __future__ import annotations

import torch

from conceptflow.adapters.effects import ConceptEffects, TokenDelta
from conceptflow.errors import ConceptflowError
from conceptflow.methods.edlora.lora import lora_deltas


def read_tova(tensors: dict[str, torch.Tensor], meta: dict, pipeline) -> ConceptEffects:
    del pipeline  # the update does not depend on the base weights
    deltas = lora_deltas(tensors, meta["alpha"])
    if sorted(deltas) != sorted(meta["token_paths"]):
        raise ConceptflowError(f"ToVA concept {meta.get('name')!r}: tensors adapt {sorted(deltas)[:2]}..., "
                               f"concept.json names {sorted(meta['token_paths'])[:2]}...")
    tokens = tuple(meta["at_tokens"])
    return ConceptEffects(meta, token_deltas={path: TokenDelta(delta, tokens) for path, delta in deltas.items()})
