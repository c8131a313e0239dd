"""A ConceptFlow-S concept as its merged update in full-weight ``diff`` keys (either axis, exact).

One key per adapted UNet linear at path ``p`` (``n`` = ``lora_unet_`` + ``p`` with dots
replaced by underscores, as in ``lycoris.py``):

    n.diff    ΔW = W' − W0 (out × in, float32), the update the reader (``reader.py``) computes

ComfyUI (``comfy/lora.py: load_lora`` → a ``("diff", ...)`` patch, added to the weight in
``calculate_weight``) and AUTOMATIC1111 (``extensions-builtin/Lora/network_full.py``, scale 1
with no ``alpha``) both read such a key as "add this to the weight", so they compute W0 + ΔW
whatever KronA-WED's norm axis is: this is the exact UI export of row-norm concepts, which
their LoKr code computes wrongly. The price is size: every adapted weight is stored in full
(float32, 4 bytes per weight) instead of as Kronecker factors. For the 128 attention linears
of SD 1.5's UNet that is 93.5 M weights, a 374 MB file (its LoKr file: 2.1 MB, see
``benchmarks/interop.py``); for the toy base (assets/toy-base, 80 linears) 0.59 M weights, 2.4 MB.

Writing ΔW needs W0, so :func:`export_diff_concept` loads the concept's base model (its
``base_model`` in concept.json, checked against ``base_model_hash``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from conceptflow.adapters.concept_io import read_adapter, safetensors_bytes
from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_path
from conceptflow.methods.conceptflow_s.lycoris import lycoris_name
from conceptflow.methods.conceptflow_s.reader import krona_wed_deltas, weight_decompose_of
from conceptflow.methods.conceptflow_s.trainer import UNET_PREFIX

DIFF_SUFFIX = "diff"


def diff_state_dict(deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"lora_unet_<path>.diff": ΔW}`` (float32, contiguous) from ``{"<path>" | "unet.<path>": ΔW}``."""
    return {f"{lycoris_name(path.removeprefix(UNET_PREFIX))}.{DIFF_SUFFIX}": delta.detach().float().contiguous()
            for path, delta in sorted(deltas.items())}


def export_diff(deltas: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
                ) -> Path:
    """Write merged updates ``{"<path>" | "unet.<path>": ΔW}`` as a full-``diff`` safetensors file."""
    path = Path(path)
    tensors = diff_state_dict(deltas)
    if not tensors:
        raise ConceptflowError(f"no merged updates to write to {path}")
    with atomic_path(path) as temporary:
        temporary.write_bytes(safetensors_bytes(tensors, {"conceptflow_format": "diff", **(metadata or {})}))
    return path


def export_diff_concept(concept_folder: Path, out_path: Path, base_model: str | None = None) -> Path:
    """A ConceptFlow-S concept folder (rows or columns) as full-weight ``diff`` keys (ΔW = W' − W0).

    Loads exactly in ComfyUI (LoraLoader: ``comfy/lora.py`` "diff" patches) and AUTOMATIC1111
    (``extensions-builtin/Lora/network_full.py``): both add ΔW to the base weight
    (``benchmarks/interop.py`` measures it). 374 MB for an SD-1.5 concept (module docstring).
    ``base_model`` overrides concept.json's; without it a catalog-relative folder is looked for
    under the current directory and the concept folder's parents. Its weights must be the ones
    the concept was trained on (concept.json's ``base_model_hash``).
    """
    from conceptflow.models.loading import load_base_pipeline, model_fingerprint

    concept_folder = Path(concept_folder)
    tensors, meta = read_adapter(concept_folder)
    if meta.get("method") != "conceptflow_s":
        raise ConceptflowError(f"{concept_folder} was trained with method {meta.get('method')!r}; this diff "
                               "export is ConceptFlow-S's (KronA-WED) own")
    source = base_model or meta.get("base_model")
    if not source:
        raise ConceptflowError(f"{concept_folder}/concept.json names no base_model; pass base_model=")
    expected_hash = meta.get("base_model_hash")
    if base_model is None and expected_hash and not Path(source).is_absolute():
        # a catalog-relative folder (concept.json keeps the catalog's spelling): the first of the
        # current directory and the concept folder's parents under which it is that model
        for root in (Path.cwd(), *concept_folder.resolve().parents):
            if (root / source).is_dir() and model_fingerprint(str(root / source)) == expected_hash:
                source = str(root / source)
                break
    if expected_hash and model_fingerprint(source) != expected_hash:
        raise ConceptflowError(
            f"base model {source!r} is not the one {concept_folder} was trained on (its weights' hash differs "
            "from concept.json's base_model_hash); ΔW = W' − W0 needs that W0, pass base_model= its folder.")
    pipeline = load_base_pipeline(source)
    deltas = krona_wed_deltas(tensors, meta, pipeline)
    metadata = {"conceptflow_adapter": "krona_wed", "conceptflow_weight_decompose": weight_decompose_of(meta),
                "conceptflow_concept": json.dumps({"name": meta.get("name"), "base_model": meta.get("base_model")})}
    return export_diff(deltas, Path(out_path), metadata)
