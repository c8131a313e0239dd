"""Textual Localization: several concepts learnt from photos that show them together."""

from conceptflow.methods.base import MethodSpec
from conceptflow.methods.textual_localization.config import TextualLocalizationTrainConfig

SPEC = MethodSpec(
    name="textual_localization",
    config=TextualLocalizationTrainConfig,
    trainer="conceptflow.methods.textual_localization.trainer:TextualLocalizationMethod",
    reader="conceptflow.methods.textual_localization.reader:read_textual_localization",
    summary="Textual Localization: tokens + cross-attention K/V learnt from group photos, each concept's "
            "attention pulled to its mask",
    trains_groups=True,
)
