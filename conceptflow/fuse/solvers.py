"""Gradient fusion of concept adapters into one weight per linear layer (Mix-of-Show §3.3).

For one adapted linear layer with base weight ``W0`` (d_out × d_in) and concepts i = 1..k with
merged weights ``W_i = W0 + ΔW_i`` and layer inputs ``X_i`` (d_in × n_i, one column per token),
gradient fusion looks for one weight that reproduces every concept on its own inputs:

    (1)  W* = argmin_W  f(W),    f(W) = Σ_i ‖W X_i − W_i X_i‖²_F

Only the input Gram matrices ``G_i = X_i X_iᵀ`` enter, since

    (2)  f(W) = Σ_i tr((W − W_i) G_i (W − W_i)ᵀ).

With ``G = Σ_j G_j`` the minimisers are the solutions of the normal equations
``(W − W0) G = R``, ``R = Σ_i ΔW_i G_i``. When ``G`` is singular (text layers see fewer tokens
than they have features) there are many; the one nearest ``W0`` in Frobenius norm is

    (3)  W* = W0 + R G⁺ = W0 + Σ_i ΔW_i G_i (Σ_j G_j)⁺,

because every other minimiser adds to it rows in the null space of ``G``, orthogonal to the
rows of ``R G⁺``. :func:`closed_form_fuse` evaluates (3); :func:`lbfgs_fuse` is the iterative
reference Mix-of-Show uses (``gradient_fusion.py``: L-BFGS from W0 on the per-element mean
squared error), here on the Gram form (2) so it needs no raw activations either.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Mix-of-Show's iteration budgets: text-encoder layers and cross-attention K/V (whose inputs
# are text features) get 500 L-BFGS iterations, the other UNet layers 50.
TEXT_AND_KV_ITERATIONS = 500
SPATIAL_ITERATIONS = 50

# Eigenvalues of G below DEFAULT_RCOND · λ_max are treated as zero. G squares the singular
# values of the stacked inputs, so this keeps input directions down to ~1e-5 of the largest
# singular value. Rounding in float64 (accumulating G and eigh) perturbs eigenvalues by about
# d_in · 1e-16 · λ_max; directions near that floor have garbage eigenvectors and, through the
# 1/λ in (3), garbage weights large enough to spoil the objective. Directions between the floor
# and the cutoff carry at most ~rcond of the input energy.
DEFAULT_RCOND = 1e-10


def _check_shapes(weight: torch.Tensor, deltas: Sequence[torch.Tensor | None], grams: Sequence[torch.Tensor]) -> None:
    if weight.ndim != 2:
        raise ValueError(f"W0 must be a (d_out, d_in) matrix, got shape {tuple(weight.shape)}")
    if len(deltas) != len(grams) or not grams:
        raise ValueError(f"need one Gram per concept and at least one concept: "
                         f"{len(deltas)} deltas, {len(grams)} Grams")
    d_out, d_in = weight.shape
    for index, (delta, gram) in enumerate(zip(deltas, grams)):
        if delta is not None and tuple(delta.shape) != (d_out, d_in):
            raise ValueError(f"delta {index} has shape {tuple(delta.shape)}, W0 has {(d_out, d_in)}")
        if tuple(gram.shape) != (d_in, d_in):
            raise ValueError(f"Gram {index} has shape {tuple(gram.shape)}, expected {(d_in, d_in)}")


def _solve_device(weight: torch.Tensor) -> torch.device:
    # MPS has no float64; everything else solves where the weight lives.
    return torch.device("cpu") if weight.device.type == "mps" else weight.device


def _as64(tensors: Sequence[torch.Tensor | None], like: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """float64 copies on ``device``; a missing delta (concept did not adapt the layer) is zero."""
    return [torch.zeros_like(like, dtype=torch.float64, device=device) if t is None
            else t.detach().to(device=device, dtype=torch.float64) for t in tensors]


def fusion_objective(
    weight: torch.Tensor,
    base_weight: torch.Tensor,
    deltas: Sequence[torch.Tensor | None],
    grams: Sequence[torch.Tensor],
) -> float:
    """f(W) of Eq. (1), evaluated through Eq. (2) in float64: Σ_i ‖W X_i − (W0 + ΔW_i) X_i‖².

    Args:
        weight: the candidate fused weight W, (d_out, d_in).
        base_weight: W0, (d_out, d_in).
        deltas: ΔW_i per concept (None = the concept leaves this layer at W0).
        grams: G_i = X_i X_iᵀ per concept, (d_in, d_in).

    Computed per concept as tr(E_i G_i E_iᵀ) with E_i = W − W_i, so there is no cancellation
    between large terms (unlike the expanded form used by the L-BFGS solver).
    """
    _check_shapes(base_weight, deltas, grams)
    device = _solve_device(base_weight)
    fused = weight.detach().to(device=device, dtype=torch.float64)
    base = base_weight.detach().to(device=device, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for delta, gram in zip(_as64(deltas, base, device), _as64(grams, base, device)):
        error = fused - base - delta
        total = total + ((error @ gram) * error).sum()
    return float(total)


def closed_form_fuse(
    base_weight: torch.Tensor,
    deltas: Sequence[torch.Tensor | None],
    grams: Sequence[torch.Tensor],
    rcond: float = DEFAULT_RCOND,
) -> torch.Tensor:
    """The minimiser of Eq. (1) nearest W0, Eq. (3): W0 + Σ_i ΔW_i G_i (Σ_j G_j)⁺.

    Args:
        base_weight: W0, (d_out, d_in).
        deltas: merged adapter update ΔW_i per concept (None = no update on this layer).
        grams: input Gram G_i = X_i X_iᵀ per concept (e.g. from ``GramRecorder``), (d_in, d_in).
        rcond: eigenvalues of Σ G below ``rcond · λ_max`` count as zero (see DEFAULT_RCOND).

    Returns:
        The fused weight, in W0's dtype and device.

    The pseudo-inverse is taken by a symmetric eigendecomposition of G in float64: G⁺ =
    U_k Λ_k⁻¹ U_kᵀ over the kept eigenpairs, applied as ((R U_k) / λ_k) U_kᵀ so no
    ill-conditioned inverse is ever formed. A plain inverse of a rank-deficient text-layer G
    turns rounding noise into huge weights.

    Example:
        >>> W = closed_form_fuse(layer.weight, [delta_a, delta_b], [gram_a, gram_b])
    """
    _check_shapes(base_weight, deltas, grams)
    device = _solve_device(base_weight)
    base = base_weight.detach().to(device=device, dtype=torch.float64)
    deltas64 = _as64(deltas, base, device)
    grams64 = _as64(grams, base, device)
    # Symmetrise: a Gram accumulated in float is symmetric only up to rounding.
    gram_total = sum(grams64)
    gram_total = (gram_total + gram_total.T) / 2
    residual = sum(delta @ gram for delta, gram in zip(deltas64, grams64))  # R = Σ ΔW_i G_i

    eigenvalues, eigenvectors = torch.linalg.eigh(gram_total)
    largest = eigenvalues[-1].clamp(min=0)
    if largest <= 0:  # the layer saw no input at all: every W is a minimiser, the nearest is W0
        return base_weight.detach().clone()
    keep = eigenvalues > rcond * largest
    basis = eigenvectors[:, keep]
    update = ((residual @ basis) / eigenvalues[keep]) @ basis.T
    return (base + update).to(device=base_weight.device, dtype=base_weight.dtype)


def lbfgs_fuse(
    base_weight: torch.Tensor,
    deltas: Sequence[torch.Tensor | None],
    grams: Sequence[torch.Tensor],
    iterations: int,
    token_counts: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The Mix-of-Show reference solver for Eq. (1): L-BFGS started at W0.

    Args:
        base_weight: W0, (d_out, d_in).
        deltas: ΔW_i per concept (None = no update on this layer).
        grams: G_i per concept, (d_in, d_in).
        iterations: L-BFGS iterations (TEXT_AND_KV_ITERATIONS or SPATIAL_ITERATIONS).
        token_counts: tokens behind each Gram. Mix-of-Show minimises the mean squared error
            per output element, i.e. f / (d_out · Σ n_i); given the counts we do the same, without
            them the loss is f / d_out. The scale only changes L-BFGS's first step length.
        dtype: working precision (Mix-of-Show used float32 on raw activations; float64 keeps the
            Gram form accurate near the optimum).

    Settings as in Mix-of-Show: lr 1, history 25, strong-Wolfe line search, tolerances 1e-16
    (so it runs its budget: ``iterations`` steps or 1.25 · iterations evaluations), and the best
    point seen in any evaluation is returned. The loss is Eq. (2) expanded around W0 with
    D = W − W0:  f = tr(D G Dᵀ) − 2 tr(D Rᵀ) + Σ_i tr(ΔW_i G_i ΔW_iᵀ); expanding around W0
    rather than 0 keeps the constant small (it holds only the ΔW energy, not W0's), so less
    cancellation near the optimum.
    """
    _check_shapes(base_weight, deltas, grams)
    device = _solve_device(base_weight)
    base = base_weight.detach().to(device=device, dtype=dtype)
    deltas64 = _as64(deltas, base, device)
    grams64 = _as64(grams, base, device)
    gram_total = sum(grams64).to(dtype)
    residual = sum(delta @ gram for delta, gram in zip(deltas64, grams64)).to(dtype)
    constant = float(sum(((delta @ gram) * delta).sum() for delta, gram in zip(deltas64, grams64)))
    normaliser = base.shape[0] * (sum(token_counts) if token_counts else 1)

    offset = torch.zeros_like(base, requires_grad=True)  # D = W − W0, so the start is W0
    optimizer = torch.optim.LBFGS([offset], lr=1, max_iter=iterations, history_size=25,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-16, tolerance_change=1e-16)
    best = {"loss": float("inf"), "offset": offset.detach().clone()}

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (((offset @ gram_total) * offset).sum() - 2 * (offset * residual).sum() + constant) / normaliser
        if loss.item() < best["loss"]:
            best["loss"], best["offset"] = loss.item(), offset.detach().clone()
        loss.backward()
        return loss

    optimizer.step(closure)
    fused = base.to(torch.float64) + best["offset"].to(torch.float64)
    return fused.to(device=base_weight.device, dtype=base_weight.dtype)
