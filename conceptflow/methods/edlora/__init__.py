"""ED-LoRA (Mix-of-Show §3): layer-wise concept tokens + LoRA, merged as ΔW = alpha · B @ A."""

from conceptflow.methods.base import MethodSpec
from conceptflow.methods.edlora.config import LoRATrainConfig

SPEC = MethodSpec(
    name="edlora",
    config=LoRATrainConfig,
    trainer="conceptflow.methods.edlora.trainer:EDLoRAMethod",
    reader="conceptflow.methods.edlora.reader:read_edlora",
    exporters={"kohya": "conceptflow.methods.edlora.kohya:export_kohya",
               "embedding": "conceptflow.adapters.embedding_files:export_concept_embedding"},
    summary="Mix-of-Show ED-LoRA: layer-wise tokens, LoRA on text-encoder and UNet attention",
)
