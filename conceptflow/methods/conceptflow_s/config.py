"""ConceptFlow-S settings (ConceptFlow A.2.2 defaults)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from conceptflow.methods.base import ConceptTrainConfig


class ConceptFlowSTrainConfig(ConceptTrainConfig):
    """ConceptFlow-S: KronA-WED adapter, disentangled learning, attention regularisation."""

    method: Literal["conceptflow_s"] = "conceptflow_s"
    kron_factor: int = Field(16, ge=1, description="LyCORIS factorization(dim, factor)")
    lr_adapter: float = 5e-4
    lr_image_adapter: float = 1e-3
    weight_text_only: float = Field(0.001, description="weight of L_denoise(text only)")
    weight_disentangle: float = Field(0.001, description="weight of cos(text, image) features")
    weight_attention: float = Field(0.001, description="lambda_attn of Eq. 5")
    attention_loss_reduction: Literal["mean", "sum"] = Field(
        "mean", description="Eq. 5 norms: 'sum' = squared Frobenius norm as written; 'mean' = per-pixel MSE "
        "(Break-a-Scene/Mix-of-Show), so lambda_attn does not scale with the latent size")
    image_encoder: str = Field(
        "embedded:tiny-clip", description="CLIP vision encoder: hub id, local folder, or embedded:"
    )
