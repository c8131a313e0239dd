"""Subject-Adaptive Matching Attention (ConceptFlow §4.2.1, Eq. 6-9; A.6).

For each concept named in the target prompt a reference branch ("a photo of a <c>") runs in
the same batched UNet call. In the self-attention of the mid block and of the first decoder
block that has attention (A.6), the target's values inside each concept's foreground mask are
replaced by the reference's values, warped by a correspondence found on the previous step's
decoder features (Eq. 6-8); attention then runs with the target's queries and keys (Eq. 9).
DreamMatcher (Nam et al., 2024) is the single-concept ancestor; unlike it we keep no cycle-
consistency filter (ConceptFlow's Eq. 7 masks with M_k only).

Row layout of the UNet batch (CFG halves first, as the sampling core's ``denoise`` builds it)::

    [uncond: references (R) | targets (B)] [text: references (R) | targets (B)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from conceptflow.attention.processor import AttentionHook, AttentionLayer, CrossAttentionMapRecorder

EPS = 1e-8


# ---------------------------------------------------------------- the equations, as pure functions
def masked_cost_volume(target_features: torch.Tensor, reference_features: torch.Tensor,
                       target_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6: cosine similarity between masked target and reference descriptors.

    ``target_features`` (..., Q, C), ``reference_features`` (..., P, C), ``target_mask``
    (..., Q). Returns (..., Q, P); rows where the mask is 0 are 0 (the 0/0 of Eq. 6 is read as 0).
    """
    masked = target_features * target_mask.unsqueeze(-1)
    numerator = masked @ reference_features.transpose(-1, -2)
    norms = masked.norm(dim=-1, keepdim=True) * reference_features.norm(dim=-1).unsqueeze(-2)
    return numerator / norms.clamp_min(EPS)


def correspondence(cost: torch.Tensor) -> torch.Tensor:
    """F^{ref->trg}: for each target position, the reference position of highest cost (argmax)."""
    return cost.argmax(dim=-1)


def warp_values(reference_values: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """W(V_ref; F) of Eq. 7: target position q takes the reference value at ``flow[..., q]``.

    ``reference_values`` (..., heads, P, d), ``flow`` (..., Q) with the same leading dims.
    Returns (..., heads, Q, d). An argmax correspondence lands on grid points, so DreamMatcher's
    bilinear ``grid_sample`` reduces to this gather.
    """
    heads, _, dim = reference_values.shape[-3:]
    index = flow.unsqueeze(-2).unsqueeze(-1).expand(*flow.shape[:-1], heads, flow.shape[-1], dim)
    return reference_values.gather(-2, index)


def combine_values(target_values: torch.Tensor, warped_values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Eq. 7-8: V^W = sum_k W(V_k^ref) * M_k + V^trg * (1 - sum_k M_k).

    ``target_values`` (B, heads, Q, d), ``warped_values`` (B, K, heads, Q, d), ``masks`` (B, K, Q)
    (disjoint, so the weights stay a partition of unity).
    """
    weights = masks.unsqueeze(2).unsqueeze(-1).to(target_values.dtype)  # (B, K, 1, Q, 1)
    return (warped_values * weights).sum(dim=1) + target_values * (1 - weights.sum(dim=1))


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map over its spatial dims (..., H, W) to [0, 1] (as DreamMatcher)."""
    flat = maps.flatten(-2)
    low, high = flat.min(dim=-1, keepdim=True).values, flat.max(dim=-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(EPS)).view_as(maps)


def foreground_masks(maps: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """M_k from concept cross-attention maps (B, K, H, W): threshold, then make disjoint.

    A position above ``threshold`` in several normalised maps goes to the concept whose map
    is highest there, so that sum_k M_k <= 1 in Eq. 8. Returns (B, K, H*W) of 0/1.
    """
    normalised = normalize_maps(maps).flatten(-2) * valid.unsqueeze(-1)
    above = (normalised > threshold) & valid.unsqueeze(-1)
    winner = F.one_hot(normalised.argmax(dim=1), maps.shape[1]).permute(0, 2, 1).bool()
    return (above & winner).to(maps.dtype)


def mean_concept_maps(layer_maps: Sequence[torch.Tensor], n_concepts: int, size: int) -> torch.Tensor:
    """Average recorded cross-attention maps over layers and over each concept's two tokens.

    ``layer_maps``: per layer (rows, Q, 2K), as ``CrossAttentionMapRecorder.maps`` holds them
    (tokens ordered concept by concept). Returns (rows, K, size, size).
    """
    resized = []
    for token_maps in layer_maps:
        rows, queries, _ = token_maps.shape
        side = int(round(queries**0.5))
        grid = token_maps.transpose(1, 2).reshape(rows, n_concepts, 2, side, side).mean(dim=2)
        resized.append(grid if side == size else F.interpolate(grid, size=(size, size), mode="bilinear",
                                                               align_corners=False))
    return torch.stack(resized).mean(dim=0)


def resize_tokens(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(rows, Q, C) token features on a square grid -> (rows, side*side, C)."""
    rows, queries, channels = tokens.shape
    own = int(round(queries**0.5))
    if own == side:
        return tokens
    grid = tokens.transpose(1, 2).reshape(rows, channels, own, own)
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------- where it acts
def sama_layer_names(layers: Sequence[AttentionLayer]) -> tuple[set[str], set[str]]:
    """(SAMA layers, descriptor layers) per A.6.

    SAMA acts in the self-attention of the mid block and of the first decoder block that has
    attention (SD-1.5: mid_block + up_blocks.1; the tiny base: mid_block + up_blocks.0). The
    feature descriptors are that decoder block's self-attention queries ("early decoder
    layers", §4.2.1).
    """
    self_layers = [layer for layer in layers if not layer.is_cross]
    decoder_blocks = sorted({layer.block_index for layer in self_layers if layer.block == "up_blocks"})
    first = decoder_blocks[0] if decoder_blocks else None
    descriptor = {layer.name for layer in self_layers if layer.block == "up_blocks" and layer.block_index == first}
    mid = {layer.name for layer in self_layers if layer.block == "mid_block"}
    return mid | descriptor, descriptor


@dataclass
class BranchLayout:
    """Which UNet rows are references and targets, and which reference serves which concept.

    ``reference_index`` (B, K): row among the R references of concept k for target i (0 where
    ``valid`` is False, i.e. the prompt does not name concept k).
    """

    n_references: int
    n_targets: int
    reference_index: torch.Tensor
    valid: torch.Tensor

    @property
    def n_rows(self) -> int:
        return self.n_references + self.n_targets

    def target_rows(self, half: int) -> slice:
        start = half * self.n_rows + self.n_references
        return slice(start, start + self.n_targets)

    def reference_rows(self, half: int) -> torch.Tensor:
        return half * self.n_rows + self.reference_index


class SamaHook(AttentionHook):
    """Eq. 6-9 inside the UNet's self-attention, through the project's attention hooks.

    ``recorder`` records, in the same UNet call, the cross-attention maps of every concept's
    two tokens (rows of the whole batch, tokens ordered concept by concept); the masks M_k come
    from the target's text-conditioned rows among the layers recorded so far in the call (the
    masks are "at the current timestep", §4.2.1). Call ``begin_step(i)`` before each step's call.
    """

    def __init__(self, layout: BranchLayout, layers: Sequence[AttentionLayer], recorder: CrossAttentionMapRecorder,
                 start_step: int = 4, mask_threshold: float = 0.5):
        self.layout = layout
        self.sama_layers, self.descriptor_layers = sama_layer_names(layers)
        self.recorder = recorder
        self.start_step = start_step
        self.mask_threshold = mask_threshold
        self.step_index = -1
        self._current: dict[str, torch.Tensor] = {}
        self._previous: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

    def begin_step(self, step_index: int) -> None:
        self.step_index = step_index
        self._previous, self._current = self._current, {}
        self._cache.clear()

    @property
    def applies(self) -> bool:
        return self.step_index >= self.start_step and bool(self._previous)

    def edit_key_value(self, layer, query, key, value, context):
        if layer.is_cross:
            return key, value
        if layer.name in self.descriptor_layers and self.step_index >= self.start_step - 1:
            self._current[layer.name] = query.detach().transpose(1, 2).flatten(2)  # (rows, Q, heads*d)
        if layer.name not in self.sama_layers or not self.applies:
            return key, value
        side = int(round(value.shape[-2] ** 0.5))
        masks = self._masks(side)
        edited = value.clone()
        for half in (0, 1):
            flow = self._flow(side, half, masks)  # (B, K, Q)
            references = value[self.layout.reference_rows(half)]  # (B, K, heads, P, d)
            rows = self.layout.target_rows(half)
            edited[rows] = combine_values(value[rows], warp_values(references, flow), masks)
        return key, edited

    def _masks(self, side: int) -> torch.Tensor:
        recorded = list(self.recorder.maps.values())
        if not recorded:
            raise RuntimeError("SAMA needs cross-attention maps recorded before its first layer in the same UNet call")
        key = ("masks", side, len(recorded))
        if key not in self._cache:
            rows = self.layout.target_rows(1)
            n_concepts = self.layout.valid.shape[1]
            maps = mean_concept_maps([layer_maps[rows] for layer_maps in recorded], n_concepts, side)
            self._cache[key] = foreground_masks(maps, self.layout.valid.to(maps.device), self.mask_threshold)
        return self._cache[key]

    def _descriptors(self, side: int) -> torch.Tensor:
        key = ("descriptors", side)
        if key not in self._cache:
            parts = [resize_tokens(self._previous[name], side) for name in sorted(self._previous)]
            self._cache[key] = torch.cat(parts, dim=-1)  # (rows, side*side, C)
        return self._cache[key]

    def _flow(self, side: int, half: int, masks: torch.Tensor) -> torch.Tensor:
        key = ("flow", side, half, len(self.recorder.maps))
        if key not in self._cache:
            descriptors = self._descriptors(side)
            target = descriptors[self.layout.target_rows(half)].unsqueeze(1)  # (B, 1, Q, C)
            reference = descriptors[self.layout.reference_rows(half)]  # (B, K, P, C)
            # Centre both on the reference's mean descriptor: removes the component all positions
            # share (DreamMatcher centres before PCA) without letting target features outside M_k in.
            centre = reference.mean(dim=-2, keepdim=True)
            cost = masked_cost_volume(target - centre, reference - centre, masks)
            self._cache[key] = correspondence(cost)
        return self._cache[key]
