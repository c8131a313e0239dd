"""ConceptSplit ToVA settings (reference KU-VGI/ConceptSplit ``train_dreambooth_lora_sd_ToVA.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from conceptflow.methods.base import ConceptTrainConfig

# Projections of a cross-attention layer whose input rows are the prompt's text tokens: the only
# ones a token-position update can act on.
TOKEN_TARGETS = ("to_v", "to_k")


class ToVATrainConfig(ConceptTrainConfig):
    """Token-wise value adaptation: a LoRA on cross-attention projections, added only at the
    concept token's positions."""

    method: Literal["tova"] = "tova"
    steps: int = Field(300, ge=1, description="optimisation steps (reference and paper: 300 iterations)")
    batch_size: int = Field(1, ge=1, description="paper: batch 1 (the reference finds the token index from the "
                            "batch's first prompt, right only at batch 1; here every prompt's own positions)")
    rank: int = Field(32, ge=1, description="LoRA rank (reference default 32; paper 64)")
    alpha: float = Field(1.0, description="LoRA output multiplier: out = Wx + alpha*B(Ax) at the token's rows "
                         "(the reference's peft lora_alpha = rank is multiplier 1)")
    lr_lora: float = Field(5e-4, description="learning rate of the LoRA (reference default 5e-4; paper 1e-4)")
    targets: tuple[Literal["to_v", "to_k"], ...] = Field(
        ("to_v",), min_length=1,
        description="cross-attention projections adapted at the token (paper's ToVA: values only; the "
        "reference's wider default list also names to_q/to_out.0, whose inputs are not text tokens)")
    prompt_regularisation: bool = Field(
        True, description="a different prompt per step from ConceptSplit's ~200-prompt style list "
        "(conceptflow.methods.tova.prompts; Cones 2's prompt regularisation); off: the 6 shared templates")
    train_embeddings: bool = Field(
        False, description="also learn the concept's token embeddings (off as in the reference: the "
        "tokens keep the class word's embedding, so the keys, and the attention maps, stay the base's)")
    masked_loss: bool = Field(False, description="restrict the denoising loss to the foreground mask "
                              "(reference: plain MSE over the image)")

    @field_validator("targets")
    @classmethod
    def _distinct(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets {list(targets)} name a projection twice")
        return tuple(sorted(targets, key=TOKEN_TARGETS.index))
