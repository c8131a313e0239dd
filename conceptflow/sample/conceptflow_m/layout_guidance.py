"""Layout-consistency guidance (ConceptFlow §4.2.2, Eq. 10-11; A.2.2).

Each concept's cross-attention map is refined (+λ above τ, −λ at or below), compared with
the refined map of the first step by a soft IoU, and the latent takes a gradient step
z' = z − φ_t ∇_z L (φ_t decays linearly from φ = 10). The gradient pass runs the UNet on the
targets' text-conditioned rows only and stops right after the last cross-attention layer the
loss reads (through the project's attention hooks), so the layers after it cost nothing.

Two readings we make explicit:
- Eq. 10's numerator is written as a product; for binary maps the product is the minimum, and
  the minimum (weighted Jaccard, Σ min / Σ max) is what makes the loss exactly zero when the
  maps agree, so we use it.
- M ± λ spans [−λ, 1 + λ] for min-max-normalised M; the refined maps are shifted affinely into
  [0, 1] before the IoU so that "max" in the denominator is a union of non-negative masses.
"""

from __future__ import annotations

from typing import Sequence

import torch

from conceptflow.attention.processor import AttentionLayer, CrossAttentionMapRecorder, StopForward
from conceptflow.sample.conceptflow_m.sama import EPS, mean_concept_maps, normalize_maps

BLOCK_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def refine_maps(maps: torch.Tensor, threshold: float = 0.55, adjustment: float = 0.5) -> torch.Tensor:
    """A_k^t of §4.2.2 on min-max-normalised maps M, shifted from [−λ, 1+λ] into [0, 1]."""
    refined = torch.where(maps > threshold, maps + adjustment, maps - adjustment)
    return (refined + adjustment) / (1 + 2 * adjustment)


def soft_iou(maps: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Σ min(a, b) / Σ max(a, b) over the last two (spatial) dims."""
    return torch.minimum(maps, other).flatten(-2).sum(-1) / torch.maximum(maps, other).flatten(-2).sum(-1).clamp_min(EPS)


def layout_loss(maps: torch.Tensor, initial_maps: torch.Tensor, valid: torch.Tensor,
                threshold: float = 0.55, adjustment: float = 0.5) -> torch.Tensor:
    """Eq. 10 summed over concepts (and over the images of a batch, which stay independent).

    ``maps``, ``initial_maps``: raw concept cross-attention maps (B, K, H, W) at step t and at
    the first step; ``valid`` (B, K) marks the concepts each prompt names.
    """
    current = refine_maps(normalize_maps(maps), threshold, adjustment)
    initial = refine_maps(normalize_maps(initial_maps), threshold, adjustment)
    per_concept = 1 - soft_iou(current, initial)
    return (per_concept * valid.to(per_concept.device, per_concept.dtype)).sum()


def step_size(step_index: int, steps: int, initial: float = 10.0) -> float:
    """φ_t of Eq. 11: ``initial`` at the first step, decaying linearly towards 0 at the last."""
    return initial * (1 - step_index / steps)


def layout_layer_names(layers: Sequence[AttentionLayer], last_block: str = "mid_block") -> list[str]:
    """Cross-attention layers the loss reads: the encoder's, up to and including ``last_block``."""
    return [layer.name for layer in layers if layer.is_cross and BLOCK_RANK[layer.block] <= BLOCK_RANK[last_block]]


class TruncatingMapRecorder(CrossAttentionMapRecorder):
    """Records maps with their graph and stops the UNet after the last layer it reads."""

    def __init__(self, token_positions: torch.Tensor, layers: Sequence[str]):
        super().__init__(token_positions, layers, keep_graph=True)
        self.last_layer = list(layers)[-1]

    def on_probs(self, layer, probs):
        super().on_probs(layer, probs)
        if layer.name == self.last_layer:
            raise StopForward


class LayoutGuidance:
    """Eq. 11 for a batch of targets: ``__call__(latents, timestep, text, step_index)``.

    ``token_positions`` (B, 2K) are the concept tokens in each target prompt (concept by
    concept), ``valid`` (B, K) which concepts the prompt names. ``set_initial_maps`` takes the
    first step's maps (B, K, size, size), recorded in the same layers (``layer_names``).
    """

    def __init__(self, unet, controller, layer_names: Sequence[str], token_positions: torch.Tensor,
                 valid: torch.Tensor, steps: int, threshold: float = 0.55, adjustment: float = 0.5,
                 initial_step_size: float = 10.0, map_size: int | None = None):
        if not layer_names:
            raise ValueError("layout guidance needs at least one cross-attention layer to read")
        self.unet = unet
        self.controller = controller
        self.layer_names = list(layer_names)
        self.token_positions = token_positions
        self.valid = valid
        self.steps = steps
        self.threshold = threshold
        self.adjustment = adjustment
        self.initial_step_size = initial_step_size
        self.map_size = map_size or unet.config.sample_size
        self.initial_maps: torch.Tensor | None = None
        self.last_loss: float | None = None

    def set_initial_maps(self, maps: torch.Tensor) -> None:
        self.initial_maps = maps.detach().float()

    def concept_maps(self, layer_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return mean_concept_maps(layer_maps, self.valid.shape[1], self.map_size)

    def loss(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """L_Layout at ``latents`` (with graph): a truncated UNet pass on the text-conditioned rows.

        DPM-Solver's ``scale_model_input`` is the identity, so the latents go in as they are (cast
        to the UNet's dtype inside the graph); the maps are taken to float32 for the loss, so in half
        precision only the UNet pass itself runs in half precision.
        """
        recorder = TruncatingMapRecorder(self.token_positions, self.layer_names)
        with self.controller.use(recorder):
            try:
                self.unet(latents.to(self.unet.dtype), timestep, encoder_hidden_states=text)
            except StopForward:
                pass
        maps = self.concept_maps([recorder.maps[name].float() for name in self.layer_names])
        return layout_loss(maps, self.initial_maps, self.valid, self.threshold, self.adjustment)

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, step_index: int) -> torch.Tensor:
        if self.initial_maps is None:
            raise RuntimeError("layout guidance has no first-step maps; call set_initial_maps after step 0")
        if not bool(self.valid.any()):
            return latents
        with torch.enable_grad():
            variable = latents.detach().requires_grad_(True)
            loss = self.loss(variable, timestep, text)
            # autograd.grad with inputs=latents: the UNet's weight gradients are never computed
            (gradient,) = torch.autograd.grad(loss, variable)
        self.last_loss = float(loss.detach())
        return latents - step_size(step_index, self.steps, self.initial_step_size) * gradient.to(latents.dtype)
