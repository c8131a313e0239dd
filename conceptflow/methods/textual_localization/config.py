"""Textual Localization settings (reference junjie-shentu/Textual-Localization,
``textual_localization/model/multi_concept/textual_localization_{hard,soft}_guidance.py``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from conceptflow.methods.base import ConceptTrainConfig


class TextualLocalizationTrainConfig(ConceptTrainConfig):
    """New tokens + Custom-Diffusion K/V of cross-attention, learnt from photos showing several
    concepts together, each concept's cross-attention map pulled towards its mask.

    A concept trained this way belongs to a catalog ``groups:`` entry; the group's photos and
    settings train all its concepts in one run.
    """

    # read by the catalog and the train stage: the method learns a group's concepts together
    trains_groups: ClassVar[bool] = True

    method: Literal["textual_localization"] = "textual_localization"
    steps: int = Field(800, ge=1, description="optimisation steps (reference: 800 at 512 px)")
    batch_size: int = Field(1, ge=1, description="group photos per step; each comes with one class-prior image "
                            "per concept (reference: batch 3 = 1 photo + 2 prior images)")
    lr_kv: float = Field(1e-5, gt=0, description="learning rate of the cross-attention K/V weights (reference 1e-5)")
    scale_lr: bool = Field(True, description="reference scale_lr: lr x batch size (x2 with prior preservation)")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay of the K/V weights (reference 1e-2)")
    guidance: Literal["hard", "soft"] = Field(
        "hard", description="hard: MSE between each concept's attention map and its mask everywhere; soft: only "
        "where the mask is 0 (the map is free inside the object)")
    attention_weight: float = Field(1.0, ge=0, description="weight of the attention loss (reference 1)")
    attention_scales: tuple[int, ...] = Field(
        (2, 4, 8), min_length=1, description="cross-attention layers whose side is the latent side divided by one of "
        "these are averaged (the reference's 32/16/8 of SD's 64x64 latents)")
    map_fraction: float = Field(0.5, gt=0, le=1, description="maps and masks are compared at this fraction of "
                                "the image resolution (reference: 256 of 512)")
    prior_images: int = Field(200, ge=0, description="class-prior images the base draws per class word (reference "
                              "200; cached in .cache/class_images); 0 turns prior preservation off")
    prior_weight: float = Field(1.0, ge=0, description="weight of the class-prior denoising loss (reference 1)")
    prior_steps: int = Field(25, ge=1, description="sampling steps of the class-prior images")
