"""KronA-WED: a Kronecker adapter with weight decomposition (ConceptFlow-S, §4.1, Eq. 2).

For a frozen linear layer with weight W0 (torch layout: out × in) the adapted weight is

    W' = m ⊙ (W0 + A ⊗ B) / ‖W0 + A ⊗ B‖                                   (Eq. 2, Eq. 20)

with the norm taken along one axis, ``weight_decompose``:

* ``"rows"``: per output row (as peft DoRA and LyCORIS ≥ 3.2 ``dora_wd`` with
  ``wd_on_output=True`` do), m ∈ R^out initialised to ‖W0‖ per row;
* ``"columns"``: per input column (the DoRA paper's ‖·‖_c, LyCORIS ``wd_on_output=False``, the
  only form AUTOMATIC1111 computes and the one ComfyUI computes correctly), m ∈ R^in
  initialised to ‖W0‖ per column: W' = (W0 + A⊗B) · diag(m / ‖W0 + A⊗B‖_col).

A ∈ R^{a1×a2} is He-initialised and B ∈ R^{b1×b2} zero, so W' = W0 at the start. a1·b1 = out, a2·b2 = in;
(a1, b1) and (a2, b2) come from :func:`factorization` with one factor f (Eq. 18, the rule of
LyCORIS). A and B are full matrices (LyCORIS LoKr with ``full_matrix``), which makes this
module interchangeable with LyCORIS's LoKr with ``dora_wd=True`` (see ``lycoris.py``).

The weight norm is *not* detached: gradients flow through ‖W0 + A⊗B‖ into A and B. That is
what LyCORIS's ``dora_wd`` does (its ``weight_decompose`` keeps the norm in the graph), and
LyCORIS is the reference the paper builds on and the format we export to, so training here
optimises the same function as training there. peft's DoRA detaches the norm (DoRA paper
§4.3) to avoid keeping the norm's graph over a full ΔW = BA; with Kronecker factors that
graph is small (a pass over the out × in weight per step), so the saving does not justify
optimising a different objective. ``detach_norm=True`` gives the peft/DoRA-paper gradient;
the forward value is the same either way.

Two forward forms give the same values and gradients (``forward_mode``):

* ``"factored"`` never builds A ⊗ B: (A ⊗ B) x = vec(A · X · Bᵀ) with X = x reshaped to
  (a2, b2), row-major; ‖W0_r + (A⊗B)_r‖² = ‖W0_r‖² + 2⟨W0_r, A_i ⊗ B_k⟩ + ‖A_i‖²‖B_k‖² for
  row r = (i, k), the middle term contracted over W0 viewed as (a1, b1, a2, b2); then
  y = (m / ‖·‖) ⊙ (W0 x + (A ⊗ B) x) + bias. With column norms the scale multiplies the input
  instead, y = W0 x' + (A ⊗ B) x' + bias with x' = (m / ‖·‖_col) ⊙ x, and ‖W0_c + (A⊗B)_c‖² =
  ‖W0_c‖² + 2⟨W0_c, A_:j ⊗ B_:l⟩ + ‖A_:j‖²‖B_:l‖² for column c = (j, l). Its backward has no
  weight-gradient GEMM (W0 is frozen) but makes several passes over the token-sized activations.
* ``"materialized"`` builds W' (a few passes over the out × in weight) and calls ``F.linear``,
  whose backward adds one tokens × out × in weight-gradient GEMM.

Which is faster depends on tokens · (in + out) against out · in (the per-token activation
traffic of one form against the weight-sized work of the other).
``benchmarks/krona_wed_forward.py`` measured, on one core of the development CPU (forward +
backward, factored / materialized): tiny base 32–64 wide, 256–1024 tokens: 2.4–3.2 (slower);
SD 320 self-attention at 1024/4096 tokens: 1.22/1.43; SD 640 at 256/1024 tokens: 0.94/1.14;
SD 1280 at 64/256 tokens: 0.41/0.59; cross-attention K/V (77 text tokens, input 768) at
320/640/1280: 0.74/0.58/0.50 (row norms; the column-norm cross term is an elementwise pass
over W0 rather than a matmul on its view, not measured separately). Neither form wins everywhere, so the default ``"auto"`` picks
per call: factored when tokens · (in + out) ≤ out · in, materialised otherwise; it picked the
faster form in all twelve measured cases. On the tiny base that is always the materialised
form; on SD at batch 1 it is factored for the text K/V layers, the 1280-wide blocks and the
640-wide blocks at 256 px. In whole training steps (``benchmarks/train_step.py``) forcing the
factored form was 1.25× slower than "auto", on the tiny UNet and on SD-sized attention.

Example::

    modules = inject_krona_wed(unet, factor=16)      # {module path: KronaWEDLinear}, row norms
    # inject_krona_wed(unet, weight_decompose="columns") for the form the UIs compute (lycoris.py)
    optimizer = torch.optim.AdamW([p for m in modules.values() for p in m.parameters()
                                   if p.requires_grad], lr=5e-4)
    state = krona_wed_state_dict(modules)             # {"<path>.kron_a": ..., ...}
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from conceptflow.errors import ConceptflowError

DEFAULT_FACTOR = 16  # ConceptFlow A.2.2: "decomposition factor f = 16"
STATE_SUFFIXES = ("kron_a", "kron_b", "magnitude")
FORWARD_MODES = ("auto", "factored", "materialized")
# "rows": m and the norm per output row (LyCORIS wd_on_output=True, dora_scale (out, 1));
# "columns": per input column (wd_on_output=False, dora_scale (1, in)).
WEIGHT_DECOMPOSE_AXES = ("rows", "columns")


def factorization(dimension: int, factor: int = DEFAULT_FACTOR) -> tuple[int, int]:
    """Split ``dimension`` into (small, large) with small · large = dimension (Eq. 18).

    The small part is the largest divisor u ≤ min(f, √dimension); f ≤ 0 means no limit.
    Like LyCORIS's ``factorization``, a dimension divisible by f gives (f, dimension / f)
    sorted, even when f > √dimension: 32 with f = 16 gives (2, 16), not Eq. 18's (4, 8).
    SD-1.x sizes: 320 → (16, 20), 640 → (16, 40), 768 → (16, 48), 1280 → (16, 80).
    """
    if factor > 0 and dimension % factor == 0:
        small, large = sorted((factor, dimension // factor))
        return small, large
    limit = math.isqrt(dimension) if factor <= 0 else min(factor, math.isqrt(dimension))
    small = max(u for u in range(1, limit + 1) if dimension % u == 0)
    return small, dimension // small


class KronaWEDLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) adapted by KronA-WED.

    Args:
        base_layer: the linear layer to adapt; it is frozen and kept as a child module.
        factor: the decomposition factor f of :func:`factorization`.
        a_shape: (a1, a2) to use instead of the factorisation (for loading files written
            with another factor); B's shape follows from the layer's size.
        forward_mode: "auto" (per call, the form the module docstring's rule says is faster),
            "factored" or "materialized".
        detach_norm: treat ‖W0 + A⊗B‖ as a constant in the backward pass (peft DoRA).
        weight_decompose: "rows" (m and the norm per output row, m of ``out`` values) or
            "columns" (per input column, m of ``in`` values); see the module docstring.
    """

    def __init__(self, base_layer: nn.Linear, factor: int = DEFAULT_FACTOR,
                 a_shape: tuple[int, int] | None = None, forward_mode: str = "auto",
                 detach_norm: bool = False, weight_decompose: str = "rows") -> None:
        super().__init__()
        out_features, in_features = base_layer.weight.shape
        if a_shape is None:
            a_shape = (factorization(out_features, factor)[0], factorization(in_features, factor)[0])
        a1, a2 = a_shape
        if out_features % a1 or in_features % a2:
            raise ValueError(f"A of shape {tuple(a_shape)} does not tile a {out_features}×{in_features} weight")
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, not {forward_mode!r}")
        if weight_decompose not in WEIGHT_DECOMPOSE_AXES:
            raise ValueError(f"weight_decompose must be one of {WEIGHT_DECOMPOSE_AXES}, not {weight_decompose!r}")
        self.weight_decompose = weight_decompose
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.forward_mode, self.detach_norm = forward_mode, detach_norm

        base_weight = base_layer.weight.detach().float()
        # LyCORIS initialises its w1 with nn.Linear's He-uniform rule; B = 0 makes W' = W0.
        self.kron_a = nn.Parameter(torch.empty(a1, a2, device=base_weight.device))
        nn.init.kaiming_uniform_(self.kron_a, a=math.sqrt(5))
        self.kron_b = nn.Parameter(torch.zeros(out_features // a1, in_features // a2, device=base_weight.device))
        # ‖W0_r‖² (or ‖W0_c‖²) is fixed (W0 is frozen); kept out of the state dict, it follows the base weight.
        if weight_decompose == "rows":
            self.magnitude = nn.Parameter(base_weight.norm(dim=1))
            self.register_buffer("base_row_norm_sq", base_weight.square().sum(dim=1), persistent=False)
        else:
            self.magnitude = nn.Parameter(base_weight.norm(dim=0))
            self.register_buffer("base_column_norm_sq", base_weight.square().sum(dim=0), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen W0, as peft's wrapped layers expose it (for dtype/device look-ups);
        the adapted weight is :meth:`merged_weight`."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def kron_delta(self) -> torch.Tensor:
        """A ⊗ B materialised (out × in)."""
        return torch.kron(self.kron_a, self.kron_b)

    def merged_weight(self) -> torch.Tensor:
        """W' = m ⊙ (W0 + A⊗B) / ‖W0 + A⊗B‖ (float32, differentiable in A, B, m), the norm per
        row or per column (``weight_decompose``).

        LyCORIS (and ComfyUI) add float32 eps to the norm (a guard for all-zero rows); so do we.
        """
        direction = self.base_layer.weight.float() + self.kron_delta()
        if self.weight_decompose == "columns":
            norms = direction.norm(dim=0) + torch.finfo(torch.float32).eps
            if self.detach_norm:
                norms = norms.detach()
            return direction * (self.magnitude / norms).unsqueeze(0)
        norms = direction.norm(dim=1) + torch.finfo(torch.float32).eps
        if self.detach_norm:
            norms = norms.detach()
        return (self.magnitude / norms).unsqueeze(1) * direction

    def delta_weight(self) -> torch.Tensor:
        """W' − W0 materialised (float32), the update that fusion and export consume."""
        return self.merged_weight() - self.base_layer.weight.float()

    def row_norms(self) -> torch.Tensor:
        """‖W0_r + (A ⊗ B)_r‖ (+ eps) per output row, from the factors (no kron built)."""
        a1, a2 = self.kron_a.shape
        b1, b2 = self.kron_b.shape
        # ⟨W0_r, A_i ⊗ B_k⟩ = Σ_l (Σ_j A_ij W0[i,k,j,l]) B_kl. Contracting j first is a matmul
        # on a view of W0 (no copy of the out × in weight, forward or backward), which
        # einsum("ikjl,ij,kl->ik") does not guarantee.
        base_blocks = self.base_layer.weight.float().view(a1, b1, a2, b2)
        a_rows = self.kron_a.view(a1, 1, 1, a2)
        cross = (torch.matmul(a_rows, base_blocks).view(a1, b1, b2) * self.kron_b).sum(dim=-1)
        kron_sq = torch.outer(self.kron_a.square().sum(dim=1), self.kron_b.square().sum(dim=1))
        norm_sq = self.base_row_norm_sq + (2 * cross + kron_sq).reshape(-1)
        return norm_sq.clamp_min(0).sqrt() + torch.finfo(torch.float32).eps

    def column_norms(self) -> torch.Tensor:
        """‖W0_c + (A ⊗ B)_c‖ (+ eps) per input column, from the factors (no kron built)."""
        a1, a2 = self.kron_a.shape
        b1, b2 = self.kron_b.shape
        # ⟨W0_c, A_:j ⊗ B_:l⟩ = Σ_i A_ij Σ_k W0[i,k,j,l] B_kl for column c = (j, l): the sums run
        # over W0's leading (row) axes, so this is one elementwise pass over W0, not a matmul.
        base_blocks = self.base_layer.weight.float().view(a1, b1, a2, b2)
        times_b = (base_blocks * self.kron_b.view(1, b1, 1, b2)).sum(dim=1)        # (a1, a2, b2)
        cross = (times_b * self.kron_a.view(a1, a2, 1)).sum(dim=0)                  # (a2, b2)
        kron_sq = torch.outer(self.kron_a.square().sum(dim=0), self.kron_b.square().sum(dim=0))
        norm_sq = self.base_column_norm_sq + (2 * cross + kron_sq).reshape(-1)
        return norm_sq.clamp_min(0).sqrt() + torch.finfo(torch.float32).eps

    def uses_factored_forward(self, token_count: int) -> bool:
        """The rule of ``forward_mode="auto"`` (module docstring): factored when the
        activations' size, tokens · (in + out), does not exceed the weight's, out · in."""
        if self.forward_mode != "auto":
            return self.forward_mode == "factored"
        return token_count * (self.in_features + self.out_features) <= self.in_features * self.out_features

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.uses_factored_forward(hidden_states.numel() // self.in_features):
            return self._factored_forward(hidden_states)
        weight = self.merged_weight().to(hidden_states.dtype)
        return F.linear(hidden_states, weight, self.base_layer.bias)

    def _factored_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.weight_decompose == "columns":
            return self._factored_column_forward(hidden_states)
        dtype = hidden_states.dtype
        a1, a2 = self.kron_a.shape
        b1, b2 = self.kron_b.shape
        tokens = hidden_states.reshape(-1, a2, b2)
        # (A ⊗ B) x = vec(A X Bᵀ) for row-major vec, as two flat GEMMs (the order LyCORIS's
        # bypass uses): X Bᵀ over all tokens at once, then A from the left on the transposed view.
        times_b = F.linear(tokens, self.kron_b.to(dtype))                       # (n, a2, b1)
        kron_out = F.linear(times_b.transpose(1, 2), self.kron_a.to(dtype))    # (n, b1, a1)
        kron_out = kron_out.transpose(1, 2).reshape(-1, a1 * b1)
        # W0 x + (A ⊗ B) x in one GEMM call (addmm's beta term).
        combined = torch.addmm(kron_out, hidden_states.reshape(-1, a2 * b2), self.base_layer.weight.t())
        norms = self.row_norms()
        if self.detach_norm:
            norms = norms.detach()
        scale = (self.magnitude / norms).to(dtype)
        if self.base_layer.bias is None:
            out = combined * scale
        else:
            out = torch.addcmul(self.base_layer.bias, combined, scale)
        return out.reshape(*hidden_states.shape[:-1], a1 * b1)

    def _factored_column_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """W' x = (W0 + A⊗B)(s ⊙ x) with s = m / ‖W0 + A⊗B‖_col: the scale goes on the input."""
        dtype = hidden_states.dtype
        a1, a2 = self.kron_a.shape
        b1, b2 = self.kron_b.shape
        norms = self.column_norms()
        if self.detach_norm:
            norms = norms.detach()
        scaled = (hidden_states * (self.magnitude / norms).to(dtype)).reshape(-1, a2 * b2)
        times_b = F.linear(scaled.view(-1, a2, b2), self.kron_b.to(dtype))          # (n, a2, b1)
        kron_out = F.linear(times_b.transpose(1, 2), self.kron_a.to(dtype))         # (n, b1, a1)
        kron_out = kron_out.transpose(1, 2).reshape(-1, a1 * b1)
        combined = torch.addmm(kron_out, scaled, self.base_layer.weight.t())
        if self.base_layer.bias is not None:
            combined = combined + self.base_layer.bias
        return combined.reshape(*hidden_states.shape[:-1], a1 * b1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"a={tuple(self.kron_a.shape)}, b={tuple(self.kron_b.shape)}, forward_mode={self.forward_mode!r}, "
                f"weight_decompose={self.weight_decompose!r}")


def attention_linear_paths(unet: nn.Module) -> list[str]:
    """Module paths of every linear layer inside every attention module of ``unet``.

    On SD-1.x that is to_q, to_k, to_v and to_out.0 of each attn1 and attn2. Layers already
    wrapped by KronA-WED are listed under their own path (not their ``base_layer``).
    """
    paths = []
    for attention_path, attention in unet.named_modules():
        if not isinstance(attention, Attention):
            continue
        for child_path, child in attention.named_modules():
            if isinstance(child, KronaWEDLinear) or (
                    isinstance(child, nn.Linear) and not child_path.endswith("base_layer")):
                paths.append(f"{attention_path}.{child_path}")
    return paths


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def inject_krona_wed(unet: nn.Module, factor: int = DEFAULT_FACTOR, forward_mode: str = "auto",
                     detach_norm: bool = False, weight_decompose: str = "rows") -> dict[str, KronaWEDLinear]:
    """Wrap every attention linear of ``unet`` in KronA-WED; freeze everything else.

    As peft's ``inject_adapter_in_model`` does, all UNet parameters except A, B and m end
    up with ``requires_grad=False``. New layers normalise along ``weight_decompose`` ("rows" or
    "columns"); layers already wrapped are kept as they are (axis included), so the call is
    idempotent. Returns ``{module path: KronaWEDLinear}``.
    """
    unet.requires_grad_(False)
    modules = {}
    for path in attention_linear_paths(unet):
        layer = unet.get_submodule(path)
        if not isinstance(layer, KronaWEDLinear):
            layer = KronaWEDLinear(layer, factor, forward_mode=forward_mode, detach_norm=detach_norm,
                                   weight_decompose=weight_decompose)
            _set_submodule(unet, path, layer)
        for parameter in (layer.kron_a, layer.kron_b, layer.magnitude):
            parameter.requires_grad_(True)
        modules[path] = layer
    return modules


def krona_wed_state_dict(modules: Mapping[str, KronaWEDLinear]) -> dict[str, torch.Tensor]:
    """``{"<path>.kron_a" | "<path>.kron_b" | "<path>.magnitude": tensor}`` (detached copies)."""
    state = {}
    for path, module in modules.items():
        for suffix in STATE_SUFFIXES:
            state[f"{path}.{suffix}"] = getattr(module, suffix).detach().clone().contiguous()
    return state


def krona_tensors_by_path(state: Mapping[str, torch.Tensor], prefix: str = ""
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{path: (A, B, m)}`` from ``<prefix><path>.kron_a|kron_b|magnitude`` tensors, sorted by path.

    Other keys are ignored; a path with some but not all three tensors is refused.
    """
    paths = sorted({key.removeprefix(prefix).rsplit(".", 1)[0] for key in state
                    if key.startswith(prefix) and key.rsplit(".", 1)[-1] in STATE_SUFFIXES})
    parsed = {}
    for path in paths:
        missing = [s for s in STATE_SUFFIXES if f"{prefix}{path}.{s}" not in state]
        if missing:
            raise ConceptflowError(f"KronA-WED tensors for '{prefix}{path}' lack {missing}; re-export the adapter.")
        parsed[path] = tuple(state[f"{prefix}{path}.{s}"] for s in STATE_SUFFIXES)
    return parsed


def load_krona_wed_state_dict(unet: nn.Module, state: Mapping[str, torch.Tensor],
                              forward_mode: str = "auto", weight_decompose: str = "rows"
                              ) -> dict[str, KronaWEDLinear]:
    """Put the tensors of :func:`krona_wed_state_dict` into ``unet``, wrapping layers as needed.

    A's shape is read from the tensors, so files written with any factor load. The axis of the
    weight decomposition is not: a square layer's m fits either, so ``weight_decompose`` says
    which (concept.json's ``weight_decompose``; absent means "rows", the only axis before it
    became a setting). Raises ``ConceptflowError`` when a path is not a linear layer of this
    UNet or a tensor is missing or does not fit.
    """
    if weight_decompose not in WEIGHT_DECOMPOSE_AXES:
        raise ConceptflowError(f"weight_decompose must be one of {WEIGHT_DECOMPOSE_AXES}, not {weight_decompose!r}")
    modules = {}
    for path, (kron_a, kron_b, magnitude) in krona_tensors_by_path(state).items():
        modules[path] = _wrap_for_loading(unet, path, tuple(kron_a.shape), forward_mode, weight_decompose)
        expected = (tuple(modules[path].kron_b.shape), modules[path].magnitude.numel())
        if (tuple(kron_b.shape), magnitude.numel()) != expected:
            raise ConceptflowError(
                f"KronA-WED tensors for '{path}' do not fit its layer: B {tuple(kron_b.shape)} and "
                f"m of {magnitude.numel()} values, expected B {expected[0]} and m of {expected[1]} (one per "
                f"{'output row' if weight_decompose == 'rows' else 'input column'}); load the adapter onto the "
                "base model it was trained on, with its weight_decompose axis.")
        with torch.no_grad():
            modules[path].kron_a.copy_(kron_a)
            modules[path].kron_b.copy_(kron_b)
            modules[path].magnitude.copy_(magnitude.reshape(-1))
    return modules


def _wrap_for_loading(unet: nn.Module, path: str, a_shape: tuple[int, int],
                      forward_mode: str, weight_decompose: str = "rows") -> KronaWEDLinear:
    """The KronA-WED layer at ``path`` with A of ``a_shape`` and the given axis, creating it if needed."""
    try:
        layer = unet.get_submodule(path)
    except AttributeError:
        layer = None
    if isinstance(layer, KronaWEDLinear):
        if tuple(layer.kron_a.shape) == a_shape and layer.weight_decompose == weight_decompose:
            return layer
        layer = layer.base_layer
    if not isinstance(layer, nn.Linear):
        raise ConceptflowError(
            f"adapter tensors name '{path}', which is not a linear layer of this UNet; "
            "load the adapter onto the base model it was trained on.")
    if layer.out_features % a_shape[0] or layer.in_features % a_shape[1]:
        raise ConceptflowError(
            f"KronA-WED A of shape {a_shape} for '{path}' does not tile its "
            f"{layer.out_features}×{layer.in_features} weight; load the adapter onto its own base model.")
    module = KronaWEDLinear(layer, a_shape=a_shape, forward_mode=forward_mode, weight_decompose=weight_decompose)
    _set_submodule(unet, path, module)
    return module
