"""Cones 2 layout guidance as an attention hook: a bias on the concept tokens' cross-attention scores.

Reference (ali-vilab/Cones-V2, ``layout_guidance.py`` l.82 and 197-221, ``attention_control.py`` l.38-68):
in every cross-attention layer of the conditional UNet call,

    scores = (QK^T + guidance_weight * w * log(1 + sigma^2) * std(QK^T)) * scale

where ``w[q, t]`` is +2.5 when token t is one of subject k's tokens and position q lies inside k's region,
-1e8 when t is one of k's tokens and q lies outside it, and 0 for every other token (BOS, the other words,
the padding); the unconditional call gets no bias. Since std is linear in the scale, adding
``guidance_weight * w * log(1 + sigma^2) * std(S)`` to the already scaled scores S = QK^T * scale (what
``AttentionHook.edit_scores`` receives) is the same equation.

Our batch is the sampling core's ``[uncond, cond]`` UNet call: rows 0..N-1 are the images' unconditional
halves, rows N..2N-1 their conditional ones. std is taken per image over its conditional scores (heads,
positions, tokens), which is the reference's std over its batch of one.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from conceptflow.attention.processor import AttentionHook, AttentionLayer
from conceptflow.sample.boxes import Box, box_masks


def noise_factor(sigma: float) -> float:
    """log(1 + sigma^2): the reference's noise-level factor of the bias (large early, ~0 at the end)."""
    return math.log1p(float(sigma) ** 2)


def token_weights(masks: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, n_tokens: int,
                  inside: float, outside: float) -> torch.Tensor:
    """w (N, Q, T): ``inside`` where position q is in concept k's box and t is one of k's two tokens,
    ``outside`` where q is outside the box and t is one of k's tokens, 0 for every other token.

    ``masks`` (N, K, Q) box masks, ``positions`` (N, 2K) the concepts' token positions (concept k's
    tokens at 2k and 2k+1), ``valid`` (N, K) which concepts each prompt names (others get no weight).
    """
    n, k, q = masks.shape
    value = torch.where(masks > 0, torch.tensor(float(inside)), torch.tensor(float(outside)))  # (N, K, Q)
    value = value * valid.to(value.dtype).unsqueeze(-1)
    per_token = value.repeat_interleave(2, dim=1)  # (N, 2K, Q): concept k's value for both its tokens
    weights = torch.zeros(n, q, n_tokens, dtype=value.dtype)
    index = positions.to(torch.long).unsqueeze(1).expand(-1, q, -1)
    return weights.scatter_add_(2, index, per_token.transpose(1, 2))


def score_std(scores: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
    """(N,) unbiased std of each image's scores (N, heads, Q, T) over all of them, or, with ``lengths``,
    over its first ``lengths[i]`` token columns (the prompt's own tokens when the padding is masked)."""
    if lengths is None:
        return scores.float().flatten(1).std(dim=1)
    return torch.stack([scores[i, ..., :length].float().std() for i, length in enumerate(lengths)])


def layout_bias(scores: torch.Tensor, weights: torch.Tensor, sigma: float, guidance_weight: float,
                lengths: Sequence[int] | None = None) -> torch.Tensor:
    """guidance_weight * w * log(1 + sigma^2) * std(scores): (N, heads, Q, T) from the conditional
    ``scores`` (N, heads, Q, T) and ``weights`` w (N, Q, T), in float32."""
    std = score_std(scores, lengths).to(weights.device)
    return (guidance_weight * noise_factor(sigma) * std)[:, None, None, None] * weights.unsqueeze(1)


def padding_mask(lengths: Sequence[int], n_tokens: int) -> torch.Tensor:
    """(N, T) bool: True at the token columns past each prompt's own length (its padding)."""
    return torch.arange(n_tokens)[None, :] >= torch.tensor(list(lengths))[:, None]


def block_depths(unet) -> dict[str, int]:
    """Each UNet block's resolution level ("down_blocks.0", "mid_block", "up_blocks.1", ...): how many
    times its input was downsampled (0: the latent's size)."""
    depths, depth = {}, 0
    for i, block in enumerate(unet.down_blocks):
        depths[f"down_blocks.{i}"] = depth
        depth += 1 if getattr(block, "downsamplers", None) else 0
    depths["mid_block"] = depth
    for i, block in enumerate(unet.up_blocks):
        depths[f"up_blocks.{i}"] = depth
        depth -= 1 if getattr(block, "upsamplers", None) else 0
    return depths


def layer_block(layer: AttentionLayer) -> str:
    return "mid_block" if layer.block == "mid_block" else f"{layer.block}.{layer.block_index}"


def high_resolution_layers(unet, layers: Sequence[AttentionLayer]) -> set[str]:
    """The cross-attention layers at the higher half of the UNet's attention resolutions (the seed
    project's "higher intermediate resolution" layers): with levels 0..L-1 present, levels < ceil(L/2)."""
    depths = block_depths(unet)
    cross = [layer for layer in layers if layer.is_cross]
    levels = sorted({depths[layer_block(layer)] for layer in cross})
    kept = set(levels[: math.ceil(len(levels) / 2)])
    return {layer.name for layer in cross if depths[layer_block(layer)] in kept}


def sigma_cfg_scale(scale: float, sigma: float, first_sigma: float, floor: float) -> float:
    """Sigma-aware classifier-free guidance: 1 + (s - 1) * (f + (1 - f) * log(1 + sigma^2) / log(1 + sigma_0^2)).

    The full scale s at the first step (sigma = sigma_0), falling with the noise level to 1 + f (s - 1)."""
    return 1.0 + (scale - 1.0) * (floor + (1.0 - floor) * noise_factor(sigma) / noise_factor(first_sigma))


class LayoutBiasHook(AttentionHook):
    """The bias (and, with ``lengths``, the prompt-length key mask) in the ``[uncond, cond]`` UNet call.

    ``boxes[i]``: image i's {concept: box} for the concepts its prompt names; ``positions`` (N, 2K) and
    ``valid`` (N, K) as ``conceptflow_m.pipeline.concept_token_positions`` / ``named_concepts`` give them
    for ``concepts``; ``bias_layers``: the cross-attention layers that get the bias; ``lengths``: each
    prompt's token count (BOS..EOS) to mask the padding keys past it in both halves (None: no mask).
    ``sigma`` must be set to the current step's noise level before each UNet call.
    """

    def __init__(self, boxes: Sequence[Mapping[str, Box]], concepts: Sequence[str], positions: torch.Tensor,
                 valid: torch.Tensor, guidance_weight: float, inside: float, outside: float,
                 bias_layers: set[str], lengths: Sequence[int] | None = None):
        self.boxes = [dict(image_boxes) for image_boxes in boxes]
        self.concepts = list(concepts)
        self.positions = positions
        self.valid = valid
        self.guidance_weight = float(guidance_weight)
        self.inside, self.outside = float(inside), float(outside)
        self.bias_layers = set(bias_layers) if self.guidance_weight != 0 else set()
        self.lengths = None if lengths is None else [int(length) for length in lengths]
        self.sigma: float | None = None
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self.edited: list[str] = []  # the layers whose scores got the bias, in call order (tests read it)

    @property
    def n_images(self) -> int:
        return len(self.boxes)

    def wants_scores(self, layer: AttentionLayer) -> bool:
        return layer.is_cross and (self.lengths is not None or layer.name in self.bias_layers)

    def masks(self, queries: int) -> torch.Tensor:
        """(N, K, Q) box masks at a layer's resolution (all zeros for concepts a prompt does not name)."""
        side = int(round(queries**0.5))
        if side * side != queries:
            raise ValueError(f"cross-attention over {queries} positions is not a square map")
        out = torch.zeros(self.n_images, len(self.concepts), queries)
        for i, image_boxes in enumerate(self.boxes):
            for k, name in enumerate(self.concepts):
                if name in image_boxes:
                    out[i, k] = box_masks({name: image_boxes[name]}, side)[0].flatten()
        return out

    def weights(self, queries: int, n_tokens: int) -> torch.Tensor:
        key = (queries, n_tokens)
        if key not in self._weights:
            self._weights[key] = token_weights(self.masks(queries), self.positions, self.valid, n_tokens,
                                               self.inside, self.outside)
        return self._weights[key]

    def edit_scores(self, layer: AttentionLayer, scores: torch.Tensor) -> torch.Tensor:
        n = self.n_images
        if scores.shape[0] != 2 * n:
            raise ValueError(f"layout bias for {n} images expects the [uncond, cond] batch of {2 * n}, "
                             f"got {scores.shape[0]} rows")
        _, _, queries, n_tokens = scores.shape
        if layer.name in self.bias_layers:
            if self.sigma is None:
                raise RuntimeError("LayoutBiasHook.sigma is unset: set it to the step's sigma before the UNet call")
            weights = self.weights(queries, n_tokens).to(scores.device)
            bias = layout_bias(scores[n:], weights, self.sigma, self.guidance_weight, self.lengths)
            scores = torch.cat([scores[:n], scores[n:] + bias.to(scores.dtype)])
            self.edited.append(layer.name)
        if self.lengths is not None:
            padding = padding_mask(self.lengths, n_tokens).to(scores.device).repeat(2, 1)  # both halves
            scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        return scores
