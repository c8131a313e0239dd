"""ED-LoRA settings (Mix-of-Show defaults)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from conceptflow.methods.base import ConceptTrainConfig


class LoRATrainConfig(ConceptTrainConfig):
    """ED-LoRA (Mix-of-Show): layer-wise concept tokens + LoRA on text encoder and UNet attention."""

    method: Literal["edlora"] = "edlora"
    rank: int = Field(4, ge=1, description="LoRA rank (Mix-of-Show: 4)")
    alpha: float = Field(1.0, description="LoRA output multiplier: out = Wx + alpha*up(down(x))")
    lr_text_encoder: float = 1e-5
    lr_unet: float = 1e-4
    train_text_encoder: bool = True
