"""ConceptFlow-S settings (ConceptFlow A.2.2 defaults)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from conceptflow.methods.base import ConceptTrainConfig


class ConceptFlowSTrainConfig(ConceptTrainConfig):
    """ConceptFlow-S: KronA-WED adapter, disentangled learning, attention regularisation."""

    method: Literal["conceptflow_s"] = "conceptflow_s"
    kron_factor: int = Field(16, ge=1, description="LyCORIS factorization(dim, factor)")
    # Left out of dumps (hence of config hashes and concept.json's config) while "rows", the only
    # axis before this setting existed: absent means "rows", so existing concepts keep their hash.
    # Default "rows": benchmarks/wd_axis.py measured no toy-identity difference between the axes.
    weight_decompose: Literal["rows", "columns"] = Field(
        "rows", exclude_if=lambda value: value == "rows",
        description="KronA-WED's weight-decomposition axis: 'rows' = norm and m per output row (LyCORIS "
        "wd_on_output=True; exports exactly only as full 'diff' keys), 'columns' = per input column "
        "(wd_on_output=False, dora_scale (1, in): the LoKr form ComfyUI and A1111 compute exactly)")
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
