"""KronA-WED as LyCORIS LoKr with ``dora_wd=True``: safetensors export and import.

A KronA-WED layer at UNet path ``p`` is, in LyCORIS/kohya keys (``n`` = ``lora_unet_`` + ``p``
with dots replaced by underscores, the names ComfyUI and A1111 read):

    n.lokr_w1     A (a1 × a2), full
    n.lokr_w2     B (b1 × b2), full
    n.alpha       1.0; LyCORIS applies scale 1 when both halves are full, whatever alpha says
    n.dora_scale  m as an (out, 1) column, i.e. row norms (LyCORIS's ``wd_on_output=True``)

LyCORIS computes W' = dora_scale · (W0 + kron(w1, w2)) / ‖W0 + kron(w1, w2)‖ per output row
(``modules/lokr.py``, ``functional/general.py: weight_decompose``), which is KronA-WED's
Eq. 2 term for term, so ``lycoris.kohya.create_network_from_weights`` on such a file gives
the same UNet as ours (``tests/test_lycoris_interop.py`` checks it on the tiny base).

Import also accepts LoKr files whose halves are low-rank (``lokr_w1_a/_b``, ``lokr_w2_a/_b``):
each half is multiplied out and LyCORIS's scale alpha / rank is folded into B, which gives the
same W'. Files without ``dora_scale`` (plain LoKr), with column-wise ``dora_scale``
(LyCORIS < 3.2 default) or with other algorithms cannot be expressed as KronA-WED and are
refused with a message naming the key.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conceptflow.methods.conceptflow_s.krona_wed import (
    STATE_SUFFIXES,
    KronaWEDLinear,
    krona_wed_state_dict,
    load_krona_wed_state_dict,
)
from conceptflow.adapters.concept_io import read_adapter, split_prefix
from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_path

UNET_PREFIX = "lora_unet"  # kohya's LORA_PREFIX_UNET
READ_PREFIXES = ("lora_unet", "lycoris")  # lycoris.wrapper's networks use "lycoris"
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha", "dora_scale")


def lycoris_name(module_path: str, prefix: str = UNET_PREFIX) -> str:
    """``down_blocks.0.attentions.0....to_q`` → ``lora_unet_down_blocks_0_attentions_0_..._to_q``."""
    return f"{prefix}_{module_path}".replace(".", "_")


def to_lycoris_state_dict(modules_or_state: Mapping[str, KronaWEDLinear] | Mapping[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """LyCORIS/kohya tensors (float32, contiguous) from KronA-WED modules or their state dict."""
    state = _as_krona_state(modules_or_state)
    lycoris_state = {}
    for path in sorted({key.rsplit(".", 1)[0] for key in state}):
        name = lycoris_name(path)
        magnitude = state[f"{path}.magnitude"].detach().float().reshape(-1, 1)
        lycoris_state[f"{name}.lokr_w1"] = state[f"{path}.kron_a"].detach().float().contiguous()
        lycoris_state[f"{name}.lokr_w2"] = state[f"{path}.kron_b"].detach().float().contiguous()
        lycoris_state[f"{name}.alpha"] = torch.tensor(1.0)
        lycoris_state[f"{name}.dora_scale"] = magnitude.contiguous()
    return lycoris_state


def export_lycoris(modules_or_state: Mapping[str, KronaWEDLinear] | Mapping[str, torch.Tensor],
                   path: str | Path) -> Path:
    """Write KronA-WED weights as a LyCORIS LoKr (``dora_wd``, full matrices) safetensors file.

    The metadata follows kohya's training scripts (``ss_network_module``, ``ss_network_args``)
    so that tools which read it see a LyCORIS LoKr network. Returns the written path.
    """
    path = Path(path)
    network_args = {"algo": "lokr", "dora_wd": "True", "full_matrix": "True", "wd_on_output": "True"}
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(network_args),
                "conceptflow_adapter": "krona_wed"}
    with atomic_path(path) as temporary:
        save_file(to_lycoris_state_dict(modules_or_state), str(temporary), metadata=metadata)
    return path


def load_lycoris_file(unet: nn.Module, path: str | Path, forward_mode: str = "auto") -> dict[str, KronaWEDLinear]:
    """Load a LyCORIS LoKr + ``dora_wd`` safetensors file onto ``unet`` as KronA-WED layers.

    Returns ``{module path: KronaWEDLinear}``. Raises ``ConceptflowError`` (naming the file and
    key) for entries that are not weight-decomposed LoKr on a linear layer of this UNet.
    """
    path = Path(path)
    if not path.is_file():
        raise ConceptflowError(f"LyCORIS file {path} does not exist; check the adapter path.")
    tensors = load_file(str(path))
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        groups[name][suffix] = tensor

    linear_paths = _linear_paths_by_lycoris_name(unet)
    state = {}
    for name, group in groups.items():
        if name not in linear_paths:
            raise ConceptflowError(
                f"{path}: '{name}' is not a linear layer of this UNet (text-encoder or other-model "
                "weights?); export a UNet-only LoKr for the same base model.")
        module_path = linear_paths[name]
        kron_a, kron_b, magnitude = _krona_tensors(group, f"{path}: {name}")
        state.update({f"{module_path}.kron_a": kron_a, f"{module_path}.kron_b": kron_b,
                      f"{module_path}.magnitude": magnitude})
    return load_krona_wed_state_dict(unet, state, forward_mode=forward_mode)


def _as_krona_state(modules_or_state) -> dict[str, torch.Tensor]:
    values = list(modules_or_state.values())
    if values and all(isinstance(value, KronaWEDLinear) for value in values):
        return krona_wed_state_dict(modules_or_state)
    state = {key: value for key, value in modules_or_state.items() if key.rsplit(".", 1)[-1] in STATE_SUFFIXES}
    if not state:
        raise ValueError("expected KronA-WED modules or a state dict with .kron_a/.kron_b/.magnitude keys")
    return state


def _linear_paths_by_lycoris_name(unet: nn.Module) -> dict[str, str]:
    """LyCORIS names (every accepted prefix) of the UNet's linear layers → module paths."""
    names = {}
    for module_path, module in unet.named_modules():
        is_linear = isinstance(module, KronaWEDLinear) or (
            isinstance(module, nn.Linear) and not module_path.endswith("base_layer"))
        if is_linear:
            for prefix in READ_PREFIXES:
                names[lycoris_name(module_path, prefix)] = module_path
    return names


def _krona_tensors(group: Mapping[str, torch.Tensor], where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, m) of one LoKr + dora_wd entry, LyCORIS's alpha / rank scale folded into B."""
    unknown = sorted(set(group) - set(LOKR_KEYS))
    if unknown or not ({"lokr_w1", "lokr_w1_a"} & set(group)):
        raise ConceptflowError(f"{where} holds {unknown or sorted(group)}, not LoKr weights; "
                               "only LyCORIS LoKr with dora_wd (KronA-WED) loads here.")
    if "dora_scale" not in group:
        raise ConceptflowError(f"{where} has no dora_scale: a plain LoKr is not KronA-WED; "
                               "train or export it with dora_wd=True.")
    kron_a = group["lokr_w1"] if "lokr_w1" in group else group["lokr_w1_a"] @ group["lokr_w1_b"]
    kron_b = group["lokr_w2"] if "lokr_w2" in group else group["lokr_w2_a"] @ group["lokr_w2_b"]
    low_rank = group.get("lokr_w1_b", group.get("lokr_w2_b"))
    if low_rank is not None and "alpha" in group:
        # LyCORIS: scale = alpha / rank unless both halves are full (then 1).
        kron_b = kron_b * (float(group["alpha"]) / low_rank.shape[0])
    dora_scale = group["dora_scale"]
    if dora_scale.dim() != 2 or dora_scale.shape[1] != 1:
        raise ConceptflowError(
            f"{where}: dora_scale of shape {tuple(dora_scale.shape)} holds column norms (LyCORIS "
            "wd_on_output=False); KronA-WED normalises output rows, re-train with wd_on_output=True.")
    return kron_a.float(), kron_b.float(), dora_scale.float().reshape(-1)


def export_concept_folder(concept_folder: Path, path: Path) -> Path:
    """Export a trained ConceptFlow-S concept folder's KronA-WED tensors as a LyCORIS file.

    Only the UNet adapter goes into the file (LyCORIS has no slot for the layer-wise token
    embeddings or the image adapter); load the embeddings from ``adapter.safetensors``.
    """
    tensors, meta = read_adapter(Path(concept_folder))
    if meta.get("method") != "conceptflow_s":
        raise ConceptflowError(
            f"{concept_folder} was trained with method {meta.get('method')!r}; only conceptflow_s (KronA-WED) "
            "concepts export to LyCORIS LoKr files"
        )
    return export_lycoris(split_prefix(tensors, "unet."), Path(path))
