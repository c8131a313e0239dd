"""A saved ConceptFlow-S adapter as merged updates: ΔW = W' − W0 per adapted UNet linear."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from conceptflow.adapters.concept_io import get_linear
from conceptflow.adapters.effects import ConceptEffects
from conceptflow.errors import ConceptflowError
from conceptflow.methods.conceptflow_s.krona_wed import KronaWEDLinear, krona_tensors_by_path
from conceptflow.methods.conceptflow_s.trainer import UNET_PREFIX

LEGACY_WEIGHT_DECOMPOSE = "rows"  # concept.json files written before the axis was a setting


def weight_decompose_of(meta: dict) -> str:
    """The KronA-WED axis a saved concept was trained with (concept.json's ``weight_decompose``)."""
    return meta.get("weight_decompose", LEGACY_WEIGHT_DECOMPOSE)


def krona_wed_deltas(tensors: Mapping[str, torch.Tensor], meta: dict, pipeline) -> dict[str, torch.Tensor]:
    """Merged updates ``{"unet.<path>": ΔW = W' − W0}`` of a saved ConceptFlow-S adapter.

    W0 is read from ``pipeline`` (its base weights; a layer already wrapped by KronA-WED gives
    its frozen base layer), W' = m ⊙ (W0 + A⊗B) / ‖W0 + A⊗B‖ is computed by a KronA-WED layer
    built around a float32 copy of W0, so the pipeline is left untouched. Tensors without the
    ``unet.`` prefix (embeddings, image adapter) are ignored. The norm's axis comes from
    ``meta["weight_decompose"]`` (absent: "rows"); A's shape (hence the factor) from the tensors.
    """
    axis = weight_decompose_of(meta)
    deltas = {}
    for path, (kron_a, kron_b, magnitude) in krona_tensors_by_path(tensors, UNET_PREFIX).items():
        try:
            base_weight = get_linear(pipeline, f"{UNET_PREFIX}{path}").weight.detach()
        except AttributeError as error:
            raise ConceptflowError(
                f"adapter tensors name 'unet.{path}', which is not a layer of this base model's UNet; "
                "use the base model the concept was trained on.") from error
        # Building layers draws initial values (all overwritten); keep the caller's RNG stream intact.
        with torch.random.fork_rng(devices=[]):
            base = nn.Linear(base_weight.shape[1], base_weight.shape[0], bias=False, device=base_weight.device)
            with torch.no_grad():
                base.weight.copy_(base_weight.float())
            layer = KronaWEDLinear(base, a_shape=tuple(kron_a.shape), weight_decompose=axis)
        if magnitude.numel() != layer.magnitude.numel():
            raise ConceptflowError(
                f"adapter tensor 'unet.{path}.magnitude' holds {magnitude.numel()} values; a {axis} "
                f"decomposition of this layer has {layer.magnitude.numel()}: concept.json's weight_decompose "
                "does not match the tensors, or the base model is not the one it was trained on.")
        with torch.no_grad():
            layer.kron_a.copy_(kron_a)
            layer.kron_b.copy_(kron_b)
            layer.magnitude.copy_(magnitude.reshape(-1))
            deltas[f"{UNET_PREFIX}{path}"] = layer.delta_weight().detach()
    return deltas


def read_conceptflow_s(tensors: dict[str, torch.Tensor], meta: dict, pipeline) -> ConceptEffects:
    return ConceptEffects(meta, deltas=krona_wed_deltas(tensors, meta, pipeline))
