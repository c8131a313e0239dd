"""ConceptFlow-M's settings (the catalog's ``generate.conceptflow_m``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from conceptflow.schema import StrictModel


class ConceptFlowMConfig(StrictModel):
    """ConceptFlow-M sampling (§4.2, A.2.2, A.6). With ``sama`` and ``layout_guidance`` both off
    it is plain fused sampling (the same images as the fused sampler, bit for bit)."""

    sama: bool = Field(True, description="Subject-Adaptive Matching Attention: warp each concept's "
                       "reference-branch self-attention values into the target (Eq. 6-9)")
    sama_start_step: int = Field(4, ge=0, description="first (0-based) denoising step with SAMA (A.2.2: 4)")
    sama_mask_threshold: float = Field(
        0.5, gt=0, lt=1, description="a position belongs to concept k's mask M_k where its min-max-normalised "
        "cross-attention map exceeds this (the paper gives no value; masks are made disjoint)")
    reference_seed: int | None = Field(
        0, description="noise seed of every reference branch: one reference trajectory per concept, shared by "
        "all images of a batch; None: each image's own seed (one reference per concept and seed)")
    layout_guidance: bool = Field(True, description="layout-consistency guidance (Eq. 10-11)")
    layout_threshold: float = Field(0.55, description="tau of the map refinement (A.2.2)")
    layout_adjustment: float = Field(0.5, description="lambda of the map refinement (A.2.2)")
    layout_step_size: float = Field(10.0, description="phi at the first step, decaying linearly to 0 (Eq. 11, A.2.2)")
    layout_last_block: Literal["down_blocks", "mid_block", "up_blocks"] = Field(
        "mid_block", description="the loss reads the cross-attention maps of the UNet up to and including this "
        "block; its gradient pass stops there (the paper does not name the layers)")
