"""Cones 2 layout guidance's settings (the catalog's ``generate.cones2_layout``); defaults read in the
reference ``ali-vilab/Cones-V2`` (``layout_guidance_sampling``: guidance_weight 0.05, weight_negative -1e8;
``guidance_config_example.json``: subject weight 2.5, guidance on all 50 steps)."""

from __future__ import annotations

from pydantic import Field

from conceptflow.schema import StrictModel


class Cones2LayoutConfig(StrictModel):
    """Cones 2 layout guidance: a bias on the concept tokens' cross-attention scores, positive inside each
    concept's box and ``outside_weight`` elsewhere. With ``guidance_weight`` 0 and the three switches off it is
    plain fused sampling (the same images as the fused sampler, bit for bit)."""

    guidance_weight: float = Field(0.05, ge=0, description="scale of the bias guidance_weight * w * log(1 + sigma^2) "
                                   "* std(QK) (reference default 0.05; its example config uses 0.08); 0: no bias")
    inside_weight: float = Field(2.5, description="w at the positions inside the concept's box, on the concept's "
                                 "token columns (reference: 2.5)")
    outside_weight: float = Field(-1e8, description="w at the positions outside the concept's box, on the concept's "
                                  "token columns (reference weight_negative -1e8: the concept's tokens get no "
                                  "attention there); 0: only the inside boost")
    high_resolution_only: bool = Field(
        False, description="seed project improvement 1: bias only the cross-attention layers of the higher half of "
        "the UNet's attention resolutions (SD 1.x/2.x at 512: the 64x64 and 32x32 layers, not 16x16 and 8x8; the toy "
        "base: its 16x16 layers, not 8x8); off: every cross-attention layer, as the reference")
    sigma_aware_cfg: bool = Field(
        False, description="seed project improvement 2 ('CFG++'): classifier-free guidance scale tied to the step's "
        "noise level, s_t = 1 + (s - 1) * (f + (1 - f) * log(1 + sigma_t^2) / log(1 + sigma_0^2)) with f = "
        "sigma_cfg_floor (full scale at the first step, falling with sigma); off: the constant scale")
    sigma_cfg_floor: float = Field(0.5, ge=0, le=1, description="f of sigma_aware_cfg: the fraction of (s - 1) kept "
                                   "as sigma goes to 0 (our choice; the seed project gives no formula)")
    pad_prompts: bool = Field(
        False, description="seed project improvement 3: the text is as long as the prompt (BOS, its tokens, EOS) "
        "instead of padded to 77: the padding keys are masked out of every cross-attention softmax (conditional and "
        "unconditional halves), which equals encoding without padding (CLIP's text encoder is causal); off: 77 "
        "tokens, as the reference")
