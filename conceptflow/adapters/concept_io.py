"""A trained concept is a folder: ``adapter.safetensors`` + ``concept.json``; never pickled.

``adapter.safetensors`` holds the concept's token embeddings (``embedding.<token>``) and its
adapter tensors, prefixed by the model they belong to (``unet.`` / ``text_encoder.``).
``concept.json`` says how to read them (method, hyper-parameters, tokens, class word, base
model and lineage). Fused models use the same layout with full weights (``weight.<model>.<path>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save

from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_path, write_json_atomic

ADAPTER_FILE = "adapter.safetensors"
CONCEPT_FILE = "concept.json"
EMBEDDING_PREFIX = "embedding."
WEIGHT_PREFIX = "weight."


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file whose bytes depend only on its content.

    safetensors writes ``__metadata__`` in a per-process hash order, so identical tensors could
    give files with other bytes (and md5s) from two processes; here the metadata keys are sorted.
    The header keeps its length (the same keys in another order), so the data offsets hold.
    """
    raw = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded = encoded + b" " * (header_length - len(encoded))
    if len(encoded) != header_length:
        raise ValueError("safetensors header changed length while sorting its metadata")
    return raw[:8] + encoded + raw[8 + header_length:]


def save_adapter(folder: Path, tensors: Mapping[str, torch.Tensor], meta: dict) -> Path:
    """Write ``adapter.safetensors`` then ``concept.json`` (the latter marks the folder complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_path(folder / ADAPTER_FILE) as temporary:
        temporary.write_bytes(safetensors_bytes(contiguous, {"format": "pt", "method": str(meta.get("method", ""))}))
    write_json_atomic(folder / CONCEPT_FILE, meta)
    return folder


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    meta_path, tensor_path = folder / CONCEPT_FILE, folder / ADAPTER_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise ConceptflowError(
            f"{folder} is not a trained concept (needs {ADAPTER_FILE} and {CONCEPT_FILE}); run `conceptflow train` for it"
        )
    return load_file(str(tensor_path)), json.loads(meta_path.read_text())


def split_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}


def get_linear(pipeline, qualified_path: str) -> torch.nn.Module:
    """``unet.<path>`` / ``text_encoder.<path>`` -> the module inside the pipeline."""
    model_name, _, path = qualified_path.partition(".")
    return getattr(pipeline, model_name).get_submodule(path)


def set_weights(pipeline, weights: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the weights of the given linear layers in place."""
    with torch.no_grad():
        for qualified_path, weight in weights.items():
            module = get_linear(pipeline, qualified_path)
            module.weight.copy_(weight.to(module.weight.dtype))
