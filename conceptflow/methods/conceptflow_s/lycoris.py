"""KronA-WED as LyCORIS LoKr with ``dora_wd=True``: safetensors export and import.

A KronA-WED layer at UNet path ``p`` is, in LyCORIS/kohya keys (``n`` = ``lora_unet_`` + ``p``
with dots replaced by underscores, the names ComfyUI and A1111 read):

    n.lokr_w1     A (a1 × a2), full
    n.lokr_w2     B (b1 × b2), full
    n.alpha       1.0; LyCORIS, ComfyUI and A1111 apply scale 1 when both halves are full
    n.dora_scale  m: shaped (1, in) for column norms (``weight_decompose="columns"``, LyCORIS
                  ``wd_on_output=False``), (out, 1) for row norms ("rows", ``wd_on_output=True``)

All three compute W' = dora_scale · (W0 + kron(w1, w2)) / ‖W0 + kron(w1, w2)‖, which is
KronA-WED's Eq. 2 term for term, but only the column form is computed that way by the UIs:
AUTOMATIC1111 (v1.10, ``extensions-builtin/Lora/network.py: apply_weight_decompose``) always
takes column norms and broadcasts an (out, 1) scale against them without an error, and
ComfyUI's output-axis branch (``comfy/weight_adapter/base.py: weight_decompose``) divides by
the norm of W0 instead of the merged weight. Hence the exporters of a concept folder:

* ``lycoris`` (:func:`export_lycoris_concept`): column-norm concepts only, the form the UIs
  compute exactly (``benchmarks/interop.py`` runs their code on it);
* ``lycoris-rows`` (:func:`export_lycoris_rows_concept`): row-norm concepts as row-form LoKr,
  exact only in the ``lycoris-lora`` library (``tests/test_lycoris_interop.py``), *not* in the UIs;
* ``diff`` (``full_diff.py``): either axis as the merged update, exact in both UIs.

Import (:func:`load_lycoris_file`) takes both forms (the axis read from ``dora_scale``'s shape)
and LoKr files whose halves are low-rank (``lokr_w1_a/_b``, ``lokr_w2_a/_b``): each half is
multiplied out and LyCORIS's scale alpha / rank is folded into B, which gives the same W'.
Files without ``dora_scale`` (plain LoKr) or with other algorithms cannot be expressed as
KronA-WED and are refused with a message naming the key.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from conceptflow.adapters.concept_io import read_adapter, safetensors_bytes, split_prefix
from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_path
from conceptflow.methods.conceptflow_s.krona_wed import (
    STATE_SUFFIXES,
    WEIGHT_DECOMPOSE_AXES,
    KronaWEDLinear,
    krona_wed_state_dict,
    load_krona_wed_state_dict,
)
from conceptflow.methods.conceptflow_s.reader import weight_decompose_of

UNET_PREFIX = "lora_unet"  # kohya's LORA_PREFIX_UNET
READ_PREFIXES = ("lora_unet", "lycoris")  # lycoris.wrapper's networks use "lycoris"
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha", "dora_scale")


def lycoris_name(module_path: str, prefix: str = UNET_PREFIX) -> str:
    """``down_blocks.0.attentions.0....to_q`` → ``lora_unet_down_blocks_0_attentions_0_..._to_q``."""
    return f"{prefix}_{module_path}".replace(".", "_")


def to_lycoris_state_dict(modules_or_state: Mapping[str, KronaWEDLinear] | Mapping[str, torch.Tensor],
                          weight_decompose: str | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS/kohya tensors (float32, contiguous) from KronA-WED modules or their state dict.

    The axis is the modules' own; a state dict does not hold it, so ``weight_decompose`` says
    which (None: "rows"). ``dora_scale`` is m as (out, 1) for rows, (1, in) for columns.
    """
    state, axis = _as_krona_state(modules_or_state, weight_decompose)
    lycoris_state = {}
    for path in sorted({key.rsplit(".", 1)[0] for key in state}):
        name = lycoris_name(path)
        magnitude = state[f"{path}.magnitude"].detach().float()
        lycoris_state[f"{name}.lokr_w1"] = state[f"{path}.kron_a"].detach().float().contiguous()
        lycoris_state[f"{name}.lokr_w2"] = state[f"{path}.kron_b"].detach().float().contiguous()
        lycoris_state[f"{name}.alpha"] = torch.tensor(1.0)
        shape = (-1, 1) if axis == "rows" else (1, -1)
        lycoris_state[f"{name}.dora_scale"] = magnitude.reshape(shape).contiguous()
    return lycoris_state


def export_lycoris(modules_or_state: Mapping[str, KronaWEDLinear] | Mapping[str, torch.Tensor],
                   path: str | Path, weight_decompose: str | None = None) -> Path:
    """Write KronA-WED weights as a LyCORIS LoKr (``dora_wd``, full matrices) safetensors file.

    The metadata follows kohya's training scripts (``ss_network_module``, ``ss_network_args``
    with ``wd_on_output`` True for rows, False for columns) so that tools which read it see a
    LyCORIS LoKr network. ``weight_decompose`` as in :func:`to_lycoris_state_dict`. Only the
    column form is computed exactly by ComfyUI and A1111 (module docstring). Returns the path.
    """
    path = Path(path)
    _, axis = _as_krona_state(modules_or_state, weight_decompose)
    network_args = {"algo": "lokr", "dora_wd": "True", "full_matrix": "True",
                    "wd_on_output": str(axis == "rows")}
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(network_args),
                "conceptflow_adapter": "krona_wed", "conceptflow_weight_decompose": axis}
    with atomic_path(path) as temporary:
        temporary.write_bytes(safetensors_bytes(to_lycoris_state_dict(modules_or_state, axis), metadata))
    return path


def load_lycoris_file(unet: nn.Module, path: str | Path, forward_mode: str = "auto") -> dict[str, KronaWEDLinear]:
    """Load a LyCORIS LoKr + ``dora_wd`` safetensors file onto ``unet`` as KronA-WED layers.

    The axis comes from ``dora_scale``: (out, 1) row norms, (1, in) column norms; one file
    holds one axis (as one LyCORIS network does). Returns ``{module path: KronaWEDLinear}``.
    Raises ``ConceptflowError`` (naming the file and key) for entries that are not
    weight-decomposed LoKr on a linear layer of this UNet.
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
    state, axes = {}, set()
    for name, group in groups.items():
        if name not in linear_paths:
            raise ConceptflowError(
                f"{path}: '{name}' is not a linear layer of this UNet (text-encoder or other-model "
                "weights?); export a UNet-only LoKr for the same base model.")
        module_path = linear_paths[name]
        kron_a, kron_b, magnitude, axis = _krona_tensors(group, f"{path}: {name}")
        axes.add(axis)
        state.update({f"{module_path}.kron_a": kron_a, f"{module_path}.kron_b": kron_b,
                      f"{module_path}.magnitude": magnitude})
    if len(axes) > 1:
        raise ConceptflowError(f"{path} mixes row-wise (out, 1) and column-wise (1, in) dora_scale entries; "
                               "KronA-WED uses one axis per adapter.")
    return load_krona_wed_state_dict(unet, state, forward_mode=forward_mode,
                                     weight_decompose=axes.pop() if axes else "rows")


def export_lycoris_concept(concept_folder: Path, out_path: Path) -> Path:
    """A column-norm ConceptFlow-S concept folder as a LyCORIS LoKr file (``dora_scale`` (1, in),
    ``wd_on_output: False``).

    Loads in ComfyUI (LoraLoader: ``comfy/lora.py`` → ``comfy/weight_adapter/lokr.py``) and
    AUTOMATIC1111 (``extensions-builtin/Lora``: ``network_lokr.py`` + ``network.py``'s
    ``apply_weight_decompose``), both computing our W' (``benchmarks/interop.py`` measures it),
    and in the ``lycoris-lora`` library through a network created with ``dora_wd=True,
    wd_on_output=False`` and ``load_weights``. Only the UNet adapter goes into the file (LyCORIS
    has no slot for the layer-wise token embeddings or the image adapter). A row-norm concept
    is refused: the UIs compute its LoKr form wrongly; export it as ``diff`` instead.
    """
    tensors, meta = _krona_concept(concept_folder)
    if weight_decompose_of(meta) != "columns":
        raise ConceptflowError(
            f"{concept_folder} normalises output rows (weight_decompose: rows), which ComfyUI and AUTOMATIC1111 "
            "do not compute correctly as LoKr; export it with format 'diff' (exact in both UIs) or "
            "'lycoris-rows' (exact in the lycoris-lora library only), or train with weight_decompose: columns.")
    return export_lycoris(split_prefix(tensors, "unet."), Path(out_path), "columns")


def export_lycoris_rows_concept(concept_folder: Path, out_path: Path) -> Path:
    """A row-norm ConceptFlow-S concept folder as row-form LyCORIS LoKr (``dora_scale`` (out, 1),
    ``wd_on_output: True``).

    Loads exactly in the ``lycoris-lora`` library (``lycoris.kohya.create_network_from_weights``)
    and back into ConceptFlow (:func:`load_lycoris_file`). NOT UI-compatible: AUTOMATIC1111 and
    ComfyUI load the keys but compute a different weight (module docstring); for them use
    ``diff``. Column-norm concepts are refused here (use ``lycoris``).
    """
    tensors, meta = _krona_concept(concept_folder)
    if weight_decompose_of(meta) != "rows":
        raise ConceptflowError(f"{concept_folder} normalises input columns (weight_decompose: columns); "
                               "export it with format 'lycoris'.")
    return export_lycoris(split_prefix(tensors, "unet."), Path(out_path), "rows")


def _krona_concept(concept_folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = read_adapter(Path(concept_folder))
    if meta.get("method") != "conceptflow_s":
        raise ConceptflowError(
            f"{concept_folder} was trained with method {meta.get('method')!r}; only conceptflow_s (KronA-WED) "
            "concepts export to LyCORIS LoKr files"
        )
    return tensors, meta


def _as_krona_state(modules_or_state, weight_decompose: str | None) -> tuple[dict[str, torch.Tensor], str]:
    values = list(modules_or_state.values())
    if values and all(isinstance(value, KronaWEDLinear) for value in values):
        axes = {module.weight_decompose for module in values}
        if len(axes) > 1 or (weight_decompose is not None and axes != {weight_decompose}):
            raise ValueError(f"the modules use weight_decompose {sorted(axes)}, not one axis "
                             f"{'' if weight_decompose is None else repr(weight_decompose)}")
        return krona_wed_state_dict(modules_or_state), axes.pop()
    axis = "rows" if weight_decompose is None else weight_decompose
    if axis not in WEIGHT_DECOMPOSE_AXES:
        raise ValueError(f"weight_decompose must be one of {WEIGHT_DECOMPOSE_AXES}, not {axis!r}")
    state = {key: value for key, value in modules_or_state.items() if key.rsplit(".", 1)[-1] in STATE_SUFFIXES}
    if not state:
        raise ValueError("expected KronA-WED modules or a state dict with .kron_a/.kron_b/.magnitude keys")
    return state, axis


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


def _krona_tensors(group: Mapping[str, torch.Tensor], where: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(A, B, m, axis) of one LoKr + dora_wd entry, LyCORIS's alpha / rank scale folded into B."""
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
    out_features, in_features = kron_a.shape[0] * kron_b.shape[0], kron_a.shape[1] * kron_b.shape[1]
    dora_scale = group["dora_scale"]
    if tuple(dora_scale.shape) == (out_features, 1):
        axis = "rows"
    elif tuple(dora_scale.shape) == (1, in_features):
        axis = "columns"
    else:
        raise ConceptflowError(
            f"{where}: dora_scale of shape {tuple(dora_scale.shape)} fits neither row norms ({out_features}, 1) "
            f"nor column norms (1, {in_features}) of this {out_features}×{in_features} LoKr.")
    return kron_a.float(), kron_b.float(), dora_scale.float().reshape(-1), axis
