"""Cones 2 settings (reference ali-vilab/Cones-V2 ``train_cones2.py``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from conceptflow.methods.base import ConceptTrainConfig


class Cones2TrainConfig(ConceptTrainConfig):
    """Fine-tune the whole text encoder on the class word alone; keep only the residual at the word.

    The concept has no tokens of its own: prompts write it ``<name>`` like every concept and it
    becomes its class word in the text (``written_as_class_word``), where its residual is added.
    """

    # read by the catalog check (two such concepts of one class word cannot share a combination)
    written_as_class_word: ClassVar[bool] = True

    method: Literal["cones2"] = "cones2"
    steps: int = Field(4000, ge=1, description="optimisation steps (reference README: 4000)")
    batch_size: int = Field(1, ge=1, description="reference README: batch 1 (its regulariser is right only at "
                            "batch 1; here the prompt is the same for every image, so it is exact at any batch)")
    lr_text_encoder: float = Field(5e-6, description="learning rate of every text-encoder parameter (reference: 5e-6, "
                                   "constant, no warm-up)")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay of the text encoder (reference: 1e-2)")
    bos_weight: float = Field(5e-3, ge=0, description="r1: weight of ||e0 - e0*||, the BOS output's drift from the "
                              "base (reference script default 5e-3; its README runs 1e-2)")
    rest_weight: float = Field(5e-4, ge=0, description="r2: weight of ||e_rest - e*_rest||, the drift of the outputs "
                               "after the class word (EOS, padding) (reference default 5e-4; README 1e-3)")
    masked_loss: bool = Field(False, description="restrict the denoising loss to the foreground mask "
                              "(reference: plain MSE over the image)")
    pad_prompts: bool = Field(
        False, description="seed project's prompt-length padding: tokenize the training prompt to its own length "
        "(BOS, word, EOS) instead of the tokenizer's 77, so the UNet attends to no padding and e_rest is the EOS "
        "alone (the residual does not change, to float rounding: CLIP's causal attention makes the word's output padding-blind)")
