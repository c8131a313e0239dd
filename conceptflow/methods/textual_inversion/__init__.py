"""Extended textual inversion (P+): layer-wise concept tokens, no weight update."""

from conceptflow.methods.base import MethodSpec
from conceptflow.methods.textual_inversion.config import TextualInversionTrainConfig

SPEC = MethodSpec(
    name="textual_inversion",
    config=TextualInversionTrainConfig,
    trainer="conceptflow.methods.textual_inversion.trainer:TextualInversionMethod",
    reader="conceptflow.methods.textual_inversion.reader:read_textual_inversion",
    summary="extended textual inversion (P+): layer-wise token embeddings only",
)
