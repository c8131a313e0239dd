"""ConceptSplit ToVA: a cross-attention value LoRA applied only at the concept token's positions."""

from conceptflow.methods.base import MethodSpec
from conceptflow.methods.tova.config import ToVATrainConfig

SPEC = MethodSpec(
    name="tova",
    config=ToVATrainConfig,
    trainer="conceptflow.methods.tova.trainer:ToVAMethod",
    reader="conceptflow.methods.tova.reader:read_tova",
    summary="ConceptSplit ToVA: value LoRA of cross-attention at the concept token only (run-time token deltas)",
)
