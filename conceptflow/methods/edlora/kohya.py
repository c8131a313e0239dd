"""An ED-LoRA concept as a kohya LoRA file plus an embedding file (A1111, ComfyUI, diffusers).

``export_kohya(concept_folder, out_path)`` writes two files:

* ``out_path``: the UNet and text-encoder LoRA in kohya keys (``conceptflow.adapters.kohya_keys``):
  ``lora_unet_<path>`` / ``lora_te_<path>`` with ``.lora_down.weight`` = peft's ``lora_A``,
  ``.lora_up.weight`` = ``lora_B`` and ``.alpha`` = our alpha · rank, so that kohya's scale
  alpha / rank is our plain multiplier and every loader computes ΔW = alpha · B @ A, the update
  ``read_edlora`` merges (``tests/test_exports_kohya.py`` loads it with diffusers
  ``load_lora_weights`` on the tiny base and compares);
* ``out_path.parent / "embeddings" / "<name>.safetensors"``: the concept's two tokens in their
  single-embedding form (``conceptflow.adapters.embedding_files``), named after the concept as
  A1111/ComfyUI call embeddings by file name. The layer-wise tokens themselves have no place in
  these formats; what the single form costs is measured by ``benchmarks/single_embedding.py``.

In A1111: the LoRA into ``models/Lora``, the embedding into ``embeddings/``, prompt
``<lora:FILE:1> a <name>`` → write ``name`` (A1111 has no angle brackets); in diffusers:
``pipe.load_lora_weights(out_path)`` and ``pipe.load_textual_inversion(embedding, token="<name>")``
with prompts written as in the catalog (``a <name> ...``).
"""

from __future__ import annotations

from pathlib import Path


from conceptflow.adapters.concept_io import EMBEDDING_PREFIX, read_adapter, safetensors_bytes, split_prefix
from conceptflow.adapters.embedding_files import DEFAULT_FORM, export_concept_embedding
from conceptflow.adapters.kohya_keys import kohya_lora_tensors
from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_path
from conceptflow.methods.edlora.trainer import MODEL_NAMES

EMBEDDINGS_FOLDER = "embeddings"


def kohya_state_dict(tensors: dict, alpha: float) -> dict:
    """kohya tensors of a saved ED-LoRA's ``unet.<path>.lora_A.weight``-style tensors."""
    state = {}
    for model_name in MODEL_NAMES:
        part = split_prefix(tensors, f"{model_name}.")
        for key in sorted(part):
            if not key.endswith(".lora_A.weight"):
                continue
            path = key.removesuffix(".lora_A.weight")
            state.update(kohya_lora_tensors(model_name, path, part[key], part[f"{path}.lora_B.weight"], alpha))
    return state


def embedding_path(out_path: Path, concept_name: str) -> Path:
    """Where ``export_kohya`` writes the concept's embedding file beside its LoRA file."""
    return Path(out_path).parent / EMBEDDINGS_FOLDER / f"{concept_name}.safetensors"


def export_kohya(concept_folder: Path, out_path: Path, form: str = DEFAULT_FORM) -> Path:
    """Write the concept's LoRA as kohya ``out_path`` and its tokens as ``embeddings/<name>.safetensors``.

    Returns ``out_path``.
    """
    tensors, meta = read_adapter(Path(concept_folder))
    if meta.get("method") != "edlora":
        raise ConceptflowError(f"{concept_folder} was trained with method {meta.get('method')!r}, "
                               "not edlora; kohya LoRA export is for ED-LoRA concepts")
    adapter = {k: v for k, v in tensors.items() if not k.startswith(EMBEDDING_PREFIX)}
    state = kohya_state_dict(adapter, float(meta["alpha"]))
    if not state:
        raise ConceptflowError(f"{concept_folder} holds no LoRA tensors (unet.<path>.lora_A.weight ...)")
    name = str(meta["name"])
    out_path = Path(out_path)
    embedding = embedding_path(out_path, name)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(meta["rank"]),
                "ss_network_alpha": str(float(meta["alpha"]) * int(meta["rank"])), "ss_base_model_version": "sd_v1",
                "conceptflow_concept": name, "conceptflow_embedding": f"{EMBEDDINGS_FOLDER}/{embedding.name}"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as temporary:
        temporary.write_bytes(safetensors_bytes(state, metadata))
    export_concept_embedding(Path(concept_folder), embedding, form)
    return out_path
