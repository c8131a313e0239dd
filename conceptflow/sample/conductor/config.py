"""Concept Conductor's settings (the catalog's ``generate.conductor``); defaults from the reference
``configs/sample_config.yaml`` (200 steps), step indices scaled to the configured step count."""

from __future__ import annotations

from pydantic import Field

from conceptflow.schema import StrictModel


class ConductorConfig(StrictModel):
    """Concept Conductor sampling. With ``alignment`` and ``injection`` both off every branch is
    plain sampling of its own prompt."""

    alignment: bool = Field(True, description="layout alignment: latents -= weight*grad of the self-attention key MSE")
    alignment_end_fraction: float = Field(60 / 200, ge=0, le=1, description="alignment up to and including step "
                                          "round(fraction x steps) (reference: step 60 of 200 included)")
    alignment_weight: float = Field(10.0, ge=0, description="latent step size of the alignment (reference: 10)")
    custom_loss_weight: float = Field(1.0, ge=0, description="loss = base + mean(custom) * this (reference: 1.0)")
    injection: bool = Field(True, description="fuse decoder attention outputs base*(1-sum M_i) + sum custom_i*M_i")
    refine_start_fraction: float = Field(50 / 200, ge=0, le=1, description="first mask refinement (reference 50/200)")
    refine_end_fraction: float = Field(80 / 200, ge=0, le=1, description="last mask refinement (reference 80/200)")
    refine_every_fraction: float = Field(5 / 200, gt=0, le=1, description="refinement period (reference 5/200)")
    kmeans_inits: int = Field(100, ge=1, description="k-means restarts (reference: 100)")
    overlap_threshold: float = Field(0.0, ge=0, le=1, description="IoU below which a refined mask falls back to the "
                                     "box (reference configs/sample_config.yaml: 0, i.e. the best cluster always)")
    lora_scale: float = Field(0.7, gt=0, description="adapter scale of the concept branches (reference lora_alpha 0.7)")
    alignment_layer: str = Field("up_blocks.1.attentions.0", description="attention block whose self-attention "
                                 "keys are aligned (reference: up_blocks.1.attentions.0 attn1)")
    mask_layer: str = Field("up_blocks.2.attentions.2", description="attention block whose self-attention rows are "
                            "clustered for the masks (reference: up_blocks.2.attentions.2 attn1); absent (a small "
                            "base): the decoder's last self-attention layer")
    masks_from_layout: bool = Field(True, description="initial masks: per concept the k-means cluster of the layout "
                                    "reference's mask-layer self-attention (inverted, at the last refinement step's "
                                    "timestep, as the reference) with the best IoU to its box; off: the boxes")
    inversion_substeps: int = Field(1, ge=1, description="DDIM inversion steps per sampling interval: 1 inverts on "
                                    "the sampling timesteps themselves (the reference inverts with 999 steps)")

    def step_indices(self, num_steps: int) -> tuple[int, list[int]]:
        """(alignment steps bound, exclusive; refinement steps), scaled from the 200-step reference.
        The reference aligns while ``i <= 60`` of 200, its end step included: so do we (61 of 200
        steps); a fraction of 0 aligns no step."""
        end = round(self.alignment_end_fraction * num_steps)
        end = min(num_steps, end + 1) if self.alignment_end_fraction > 0 else 0
        start, stop = round(self.refine_start_fraction * num_steps), round(self.refine_end_fraction * num_steps)
        every = max(1, round(self.refine_every_fraction * num_steps))
        return end, list(range(start, stop + 1, every))
