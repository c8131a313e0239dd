"""Cones 2 residual embeddings: a fine-tuned text encoder stored as one vector at the class word."""

from conceptflow.methods.base import MethodSpec
from conceptflow.methods.cones2.config import Cones2TrainConfig

SPEC = MethodSpec(
    name="cones2",
    config=Cones2TrainConfig,
    trainer="conceptflow.methods.cones2.trainer:Cones2Method",
    reader="conceptflow.methods.cones2.reader:read_cones2",
    summary="Cones 2: text encoder fine-tuned, kept as the mean residual at the class word (a few KB)",
)
