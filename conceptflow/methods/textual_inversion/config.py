"""Extended textual inversion settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from conceptflow.methods.base import ConceptTrainConfig


class TextualInversionTrainConfig(ConceptTrainConfig):
    """Layer-wise tokens only (P+ / extended textual inversion, Voynov et al. 2023): no weights change."""

    method: Literal["textual_inversion"] = "textual_inversion"
    lr_embeddings: float = Field(5e-3, description="learning rate of the token embeddings (diffusers' script: 5e-4 "
                                 "x batch, scaled)")
    embedding_norm_limit: float = Field(
        1e6, description="textual inversion does not stop at a norm (1e6: no limit; ED-LoRA stops at 0.55)")
