"""Weight fusion baseline (Mix-of-Show's "weight fusion"): W = W0 + Σ_i w_i ΔW_i, Σ w_i = 1 over the
concepts that have merged updates.

Cheap and correct as a baseline; each concept's update is diluted by the others', which is
what gradient fusion fixes.
"""

from __future__ import annotations

import torch

from conceptflow.adapters.effects import ConceptEffects


def average_fuse(base: dict[str, torch.Tensor], concepts: list[ConceptEffects], scale: float) -> dict[str, torch.Tensor]:
    """Fused weights for every layer any concept adapts."""
    paths = sorted({path for concept in concepts for path in concept.deltas})
    # the weights w_i = 1/n are over the concepts with merged updates: one that acts only through
    # tokens or at run time (textual inversion, ToVA, Cones 2) does not dilute the others
    n_merged = sum(1 for concept in concepts if concept.deltas)
    fused = {}
    for path in paths:
        updates = [concept.deltas[path] for concept in concepts if path in concept.deltas]
        fused[path] = base[path].float() + scale * torch.stack(updates).sum(0) / n_merged
    return fused
