"""What Concept Conductor does inside the UNet, for whatever rows a UNet call carries.

A call's rows are (image, branch) pairs (``Row``): branch 0 is the image's base branch (base
prompt, no adapter), branch j >= 1 its j-th concept's branch (that concept's adapter). All
branches of an image see the same latents. ``ConductorHooks`` reads and edits the rows of the
call under way, ``rows`` (one classifier-free-guidance half; a call of ``h * len(rows)``
samples holds h halves, unconditional first):

- alignment pass: records the keys of the alignment layer for every row, with their graph, and
  stops the UNet there (``StopForward``);
- injection: a forward hook on ``to_out[0]`` of every decoder attention layer stores the
  concept rows' outputs and replaces each base row's by ``fuse(base, customs, masks)`` (the
  output projection included, as the reference fuses ``to_out[0]``'s output: with per-branch
  adapters on ``to_out`` fusing before it would not be the same). Outputs are stored before base
  rows are fused, so the same hook serves one batched call of all rows and separate calls per
  branch (concept branches first), the reference's strategy;
- mask refinement steps: head-mean self-attention probabilities of the mask layer, conditional
  half, per row;
- attention maps: head-mean cross-attention of each concept row at its concept's tokens in the
  mask block's cross-attention layer, summed over steps.

The fusion hooks must be registered after ``branched_concepts`` is entered (torch runs forward
hooks in registration order, and the branch's adapter update of ``to_out[0]`` is one of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from conceptflow.attention.processor import AttentionHook, AttentionLayer, StopForward
from conceptflow.sample.conductor.fusion import fuse, resize_mask


@dataclass(frozen=True)
class Row:
    image: int
    branch: int  # 0 base, j >= 1 the image's j-th concept
    adapter: int  # index into the branched_concepts branches (0: no adapter)


def block_layer(layers: Sequence[AttentionLayer], block: str, cross: bool) -> str | None:
    """The layer of attention block ``block`` (e.g. "up_blocks.1.attentions.0") of the given kind."""
    suffix = "attn2" if cross else "attn1"
    for layer in layers:
        if layer.name.startswith(block + ".") and layer.name.endswith(suffix):
            return layer.name
    return None


def resolve_layers(layers: Sequence[AttentionLayer], alignment_block: str, mask_block: str) -> tuple[str, str, str]:
    """(alignment self-attention, mask self-attention, map cross-attention) layer names. An absent
    block (a base smaller than SD 1.x) falls back to the decoder's last attention block."""
    decoder = [layer for layer in layers if layer.block == "up_blocks"]
    if not decoder:
        raise ValueError("Concept Conductor needs attention layers in the UNet's decoder (up_blocks)")
    last_block = decoder[-1].name.rsplit(".transformer_blocks", 1)[0]

    def pick(block: str, cross: bool) -> str:
        return block_layer(layers, block, cross) or block_layer(layers, last_block, cross)

    mask = pick(mask_block, False)
    mask_parent = mask.rsplit(".transformer_blocks", 1)[0]
    return pick(alignment_block, False), mask, block_layer(layers, mask_parent, True) or pick(last_block, True)


class ConductorHooks(AttentionHook):
    def __init__(self, layers: Sequence[AttentionLayer], alignment_layer: str, mask_layer: str, map_layer: str):
        self.fusion_layers = [layer.name for layer in layers if layer.block == "up_blocks"]
        self.alignment_layer, self.mask_layer, self.map_layer = alignment_layer, mask_layer, map_layer
        self.rows: list[Row] = []
        # switches for the call under way
        self.aligning = False
        self.fusing = False
        self.refining = False
        self.mapping = False
        # per image: {side: (K, side*side)} fusion masks at each layer resolution (the reference keeps
        # one per resolution and resolves overlaps at each)
        self.masks: dict[int, dict[int, torch.Tensor]] = {}
        self.keys: dict[tuple[int, int], torch.Tensor] = {}
        self.probs: dict[tuple[int, int], torch.Tensor] = {}
        self.token_positions: dict[tuple[int, int], torch.Tensor] = {}  # concept rows' token positions
        self.map_sum: dict[tuple[int, int], torch.Tensor] = {}
        self._store: dict[tuple, torch.Tensor] = {}

    # ---------------------------------------------------------------- state
    def set_masks(self, image: int, masks: torch.Tensor, sides) -> None:
        """(K, h, w) masks resized (``resize_mask``: bilinear, antialiased, > 0.5) to every side in ``sides``."""
        self.masks[image] = {int(side): resize_mask(masks, int(side)) for side in sides}

    def layer_masks(self, image: int, length: int) -> torch.Tensor:
        """(K, length) masks of ``image`` at a layer of ``length`` positions (a square map)."""
        return self.masks[image][int(round(length ** 0.5))]

    def begin_call(self, rows: Sequence[Row]) -> None:
        self.rows = list(rows)

    def clear_step(self) -> None:
        self._store.clear()
        self.keys.clear()
        self.probs.clear()

    def _halves(self, batch: int) -> int:
        if not self.rows or batch % len(self.rows):
            raise ValueError(f"a UNet call of batch {batch} does not hold whole halves of {len(self.rows)} rows")
        return batch // len(self.rows)

    # ---------------------------------------------------------------- attention hook
    def edit_key_value(self, layer, query, key, value, context):
        if self.aligning and layer.name == self.alignment_layer:
            halves = self._halves(key.shape[0])
            offset = (halves - 1) * len(self.rows)  # the conditional half
            for r, row in enumerate(self.rows):
                self.keys[(row.image, row.branch)] = key[offset + r]
            raise StopForward
        return key, value

    def wants_probs(self, layer):
        return ((self.refining and layer.name == self.mask_layer)
                or (self.mapping and layer.name == self.map_layer))

    def on_probs(self, layer, probs):
        halves = self._halves(probs.shape[0])
        offset = (halves - 1) * len(self.rows)
        if self.refining and layer.name == self.mask_layer:
            for r, row in enumerate(self.rows):
                self.probs[(row.image, row.branch)] = probs[offset + r].mean(0).detach().float()
        if self.mapping and layer.name == self.map_layer:
            for r, row in enumerate(self.rows):
                if row.branch == 0 or (row.image, row.branch) not in self.token_positions:
                    continue
                positions = self.token_positions[(row.image, row.branch)].to(probs.device)
                concept_map = probs[offset + r].mean(0)[:, positions].mean(-1).detach().float().cpu()
                key = (row.image, row.branch)
                self.map_sum[key] = self.map_sum.get(key, 0) + concept_map

    # ---------------------------------------------------------------- fusion (forward hooks on to_out[0])
    def install(self, unet) -> list:
        """Register the fusion hooks on ``unet``'s decoder attention output projections; returns the handles."""
        return [unet.get_submodule(name).to_out[0].register_forward_hook(self._fusion_hook(name))
                for name in self.fusion_layers]

    def _fusion_hook(self, name: str):
        def hook(module, inputs, output):
            if not self.fusing:
                return output
            n_rows = len(self.rows)
            halves = self._halves(output.shape[0])
            fused_rows = {}
            for half in range(halves):
                for r, row in enumerate(self.rows):
                    if row.branch:
                        self._store[(name, half, row.image, row.branch)] = output[half * n_rows + r]
                for r, row in enumerate(self.rows):
                    if row.branch or row.image not in self.masks:
                        continue
                    masks = self.layer_masks(row.image, output.shape[1]).to(output.device)
                    if not len(masks):
                        continue
                    customs = torch.stack([self._store[(name, half, row.image, j)] for j in range(1, len(masks) + 1)])
                    index = half * n_rows + r
                    fused_rows[index] = fuse(output[index][None], customs[:, None], masks)[0]
            if not fused_rows:
                return output
            output = output.clone()
            for index, value in fused_rows.items():
                output[index] = value
            return output

        return hook
