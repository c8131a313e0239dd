"""The project's one attention-hook mechanism.

Every attention layer of a UNet gets a ``HookedAttnProcessor``; the processors share one
``AttentionController`` (``attention_controller_of(unet)`` installs it once and returns it)
whose active hooks act at four points of each layer, in this order:

1. ``edit_key_value``: the projected keys and values, with the context they came from (the
   text at each token for cross-attention): per-token value updates (ToVA), reading keys
   (Concept Conductor), SAMA's warped self-attention values;
2. ``edit_scores``: the scaled scores before the softmax (layout biases: Cones 2, ConceptSplit);
3. ``on_probs``: the softmax probabilities (record or regularise maps);
4. ``on_output``: the attention output before the output projection.

Scores and probabilities are materialised only in a layer where a hook asks for them
(``wants_scores`` / ``wants_probs``); otherwise the processor runs
``scaled_dot_product_attention`` and gives the same result as diffusers' ``AttnProcessor2_0``.

Layer-wise text conditioning (ED-LoRA) rides on the same processor: a 4-D
``encoder_hidden_states`` of shape (batch, n_cross_layers, tokens, dim) gives each
cross-attention layer its own slice, picked by the layer's ``cross_index``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint
import torch.nn.functional as F

BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


@dataclass(frozen=True)
class AttentionLayer:
    """Where an attention layer sits in the UNet."""

    name: str  # module path, e.g. "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    is_cross: bool
    index: int  # position among layers of the same kind (self or cross), down -> mid -> up
    block: str  # "down_blocks" | "mid_block" | "up_blocks"
    block_index: int  # which down/up block (0 for the mid block)

    @property
    def cross_index(self) -> int:
        if not self.is_cross:
            raise ValueError(f"{self.name} is a self-attention layer")
        return self.index


class StopForward(Exception):
    """Raised by a hook after the last layer a pass reads (a truncated UNet pass: a guidance
    gradient, inverted keys); the sampler that started the pass catches it."""


class AttentionHook:
    """Base class for what a method does inside attention. Override only what you need.

    Shapes: ``query`` (B, heads, Q, d), ``key``/``value`` (B, heads, K, d), ``probs``
    (B, heads, Q, K), where B is the UNet batch (CFG halves and reference branches included).
    """

    def wants_probs(self, layer: AttentionLayer) -> bool:
        """Return True to have this layer's attention probabilities materialised."""
        return False

    def on_probs(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        """Receive the softmax attention probabilities (record maps, build losses)."""

    def edit_key_value(
        self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the keys and values attention should use (default: unchanged).

        ``context`` (B, K, C) is what they were projected from: the layer's slice of the text
        for cross-attention (after ``norm_cross``), the hidden states for self-attention; its
        token k gives ``key[:, :, k]`` and ``value[:, :, k]``.
        """
        return key, value

    def wants_scores(self, layer: AttentionLayer) -> bool:
        """True to have ``edit_scores`` called in this layer (default: wherever it is overridden)."""
        return type(self).edit_scores is not AttentionHook.edit_scores

    def edit_scores(self, layer: AttentionLayer, scores: torch.Tensor) -> torch.Tensor:
        """Return the scores the softmax should use: ``scores`` (B, heads, Q, K) are q·k scaled
        by 1/sqrt(d), plus the attention mask where there is one (default: unchanged)."""
        return scores

    def on_output(self, layer: AttentionLayer, hidden_states: torch.Tensor) -> torch.Tensor:
        """Edit or record the attention output (B, Q, C) before the output projection."""
        return hidden_states


class AttentionController:
    """Holds the hooks active right now; shared by all processors of one UNet."""

    def __init__(self, layers: Sequence[AttentionLayer]):
        self.layers = tuple(layers)
        self.cross_layers = tuple(layer for layer in self.layers if layer.is_cross)
        self.hooks: list[AttentionHook] = []

    @property
    def n_cross_layers(self) -> int:
        """How many cross-attention layers there are: the layer count of layer-wise text."""
        return len(self.cross_layers)

    @contextlib.contextmanager
    def use(self, *hooks: AttentionHook) -> Iterator["AttentionController"]:
        """Activate ``hooks`` for the duration of a ``with`` block."""
        self.hooks.extend(hooks)
        try:
            yield self
        finally:
            for hook in hooks:
                self.hooks.remove(hook)

    @contextlib.contextmanager
    def exactly(self, hooks: Sequence[AttentionHook]) -> Iterator["AttentionController"]:
        """Make exactly ``hooks`` active for a ``with`` block, whatever was active before."""
        previous, self.hooks = self.hooks, list(hooks)
        try:
            yield self
        finally:
            self.hooks = previous


def enable_hooked_gradient_checkpointing(unet) -> None:
    """diffusers' gradient checkpointing, with the hooks of each forward active in its recomputation.

    Checkpointing recomputes a block's forward pass during backward, when the hooks that were
    active in the forward (e.g. a map recorder that materialises attention probabilities) have
    usually been deactivated; the recomputation would then run another computation and torch
    refuses it. Each checkpointed call remembers the active hooks and reinstates exactly those
    for its recomputation (non-reentrant checkpointing's ``context_fn``).
    """
    controller = attention_controller_of(unet)

    def checkpointed(module, *args):
        hooks = tuple(controller.hooks)
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), controller.exactly(hooks)))

    unet.enable_gradient_checkpointing(checkpointed)


class HookedAttnProcessor:
    """Attention with hooks; numerically AttnProcessor2_0 when no hook asks for anything."""

    def __init__(self, layer: AttentionLayer, controller: AttentionController):
        self.layer = layer
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        layer = self.layer
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, sequence_length, _ = hidden_states.shape

        if encoder_hidden_states is not None and encoder_hidden_states.ndim == 4:
            encoder_hidden_states = encoder_hidden_states[:, layer.cross_index]
        if attention_mask is not None:
            key_length = sequence_length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hooks = self.controller.hooks
        for hook in hooks:
            key, value = hook.edit_key_value(layer, query, key, value, context)

        editors = [hook for hook in hooks if hook.wants_scores(layer)]
        listeners = [hook for hook in hooks if hook.wants_probs(layer)]
        if editors or listeners:
            scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            for hook in editors:
                scores = hook.edit_scores(layer, scores)
            probs = scores.softmax(dim=-1).to(value.dtype)
            for hook in listeners:
                hook.on_probs(layer, probs)
            hidden_states = torch.matmul(probs, value)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        for hook in hooks:
            hidden_states = hook.on_output(layer, hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_layers(unet) -> list[AttentionLayer]:
    """The UNet's attention layers in down -> mid -> up order, indexed per kind."""
    names = [key.removesuffix(".processor") for key in unet.attn_processors]

    def position(name: str) -> tuple:
        parts = name.split(".")
        block = parts[0]
        block_index = int(parts[1]) if block != "mid_block" else 0
        return (BLOCK_ORDER[block], block_index, name)

    layers, counters = [], {True: 0, False: 0}
    for name in sorted(names, key=position):
        is_cross = name.endswith("attn2")
        block = name.split(".")[0]
        block_index = int(name.split(".")[1]) if block != "mid_block" else 0
        layers.append(AttentionLayer(name, is_cross, counters[is_cross], block, block_index))
        counters[is_cross] += 1
    return layers


def attention_controller_of(unet) -> AttentionController:
    """The controller of ``unet``'s hooked processors, installing them on first use.

    Idempotent: a UNet that already has a controller keeps it (and its processors).
    """
    existing = getattr(unet, "attention_controller", None)
    if existing is not None:
        return existing
    layers = attention_layers(unet)
    controller = AttentionController(layers)
    unet.set_attn_processor({f"{layer.name}.processor": HookedAttnProcessor(layer, controller) for layer in layers})
    unet.attention_controller = controller
    return controller


class CrossAttentionMapRecorder(AttentionHook):
    """Records cross-attention maps of chosen token positions, averaged over heads.

    ``maps[layer.name]`` is (B, Q, n_positions); ``mean_map(size)`` averages the layers
    (each resized to ``size``) into (B, n_positions, size, size), the CA(.) of Eq. 5.
    ``token_positions`` is (B, n_positions) (one row per prompt) or (n_positions,).
    """

    def __init__(self, token_positions: torch.Tensor, layers: Sequence[str] | None = None, keep_graph: bool = False):
        self.token_positions = token_positions
        self.layer_names = set(layers) if layers is not None else None
        self.keep_graph = keep_graph
        self.maps: dict[str, torch.Tensor] = {}

    def wants_probs(self, layer: AttentionLayer) -> bool:
        return layer.is_cross and (self.layer_names is None or layer.name in self.layer_names)

    def on_probs(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        mean_over_heads = probs.mean(dim=1)  # (B, Q, K)
        positions = self.token_positions.to(mean_over_heads.device)
        if positions.ndim == 1:
            positions = positions.expand(mean_over_heads.shape[0], -1)
        index = positions.unsqueeze(1).expand(-1, mean_over_heads.shape[1], -1)
        token_maps = mean_over_heads.gather(2, index)
        self.maps[layer.name] = token_maps if self.keep_graph else token_maps.detach()

    def mean_map(self, size: int) -> torch.Tensor:
        """Average over recorded layers of each position's map, resized to size x size."""
        if not self.maps:
            raise RuntimeError("no cross-attention maps were recorded; did the UNet run with this hook?")
        resized = []
        for token_maps in self.maps.values():
            batch, queries, n_positions = token_maps.shape
            side = int(round(queries**0.5))
            grid = token_maps.transpose(1, 2).reshape(batch, n_positions, side, side)
            resized.append(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False))
        return torch.stack(resized).mean(dim=0)

    def clear(self) -> None:
        self.maps.clear()
