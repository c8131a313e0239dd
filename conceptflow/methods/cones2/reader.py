"""A saved Cones 2 concept: one residual added at run time wherever its class word stands."""

from __future__ import annotations

import torch

from conceptflow.adapters.effects import ConceptEffects, TextResidual
from conceptflow.errors import ConceptflowError
from conceptflow.methods.cones2.trainer import RESIDUAL_KEY


def read_cones2(tensors: dict[str, torch.Tensor], meta: dict, pipeline) -> ConceptEffects:
    del pipeline  # the residual does not depend on the base weights (branched checks its width)
    unexpected = sorted(set(tensors) - {RESIDUAL_KEY})
    if RESIDUAL_KEY not in tensors or unexpected:
        raise ConceptflowError(f"a cones2 concept holds one tensor {RESIDUAL_KEY!r}; found {sorted(tensors)[:4]}")
    return ConceptEffects(meta, text_residuals=[TextResidual(meta["prompt_word"], tensors[RESIDUAL_KEY])])
