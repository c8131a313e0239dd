"""Record the input Gram matrices G = Σ x xᵀ that gradient fusion needs (solvers.py, Eq. 2).

Fusion only ever needs G_i = X_i X_iᵀ per layer and concept, so the recorder accumulates that
(d_in × d_in, float64) instead of keeping activations, whose size grows with tokens × steps.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch


class GramRecorder:
    """Forward pre-hooks that accumulate each module's input Gram matrix and token count.

    Args:
        modules: ``{name: module}``; each module's first input is a linear layer's input
            (an ``nn.Linear``, a peft LoRA wrapper, a custom adapter around a linear, ...).
        device: where to accumulate; by default the input's device (CPU for MPS, which has no
            float64).

    Every call adds ``xᵀ x`` over all rows of the input flattened to (-1, d_in) — tokens,
    positions, batch — so G equals X Xᵀ with X the inputs seen as columns. ``token_mask``
    (see :meth:`masked`) restricts recording to some rows, e.g. a concept's tokens. A module
    that was never called has no entry in ``grams``.

    Example:
        >>> with GramRecorder({"q": attn.to_q, "k": attn.to_k}) as recorder:
        ...     model(inputs)
        >>> recorder.grams["q"], recorder.counts["q"]
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], device: str | torch.device | None = None):
        self.modules = dict(modules)
        self.device = None if device is None else torch.device(device)
        self.grams: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in self.modules}
        self.enabled = True
        self.token_mask: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> "GramRecorder":
        if self._handles:
            raise RuntimeError("GramRecorder is already attached")
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "GramRecorder":
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    @contextmanager
    def masked(self, token_mask: torch.Tensor) -> Iterator["GramRecorder"]:
        """Record only rows where ``token_mask`` (the input's leading shape, bool) is True."""
        previous, self.token_mask = self.token_mask, token_mask
        try:
            yield self
        finally:
            self.token_mask = previous

    def _hook(self, name: str):
        def record(module, args, kwargs):
            if self.enabled:
                self._accumulate(name, args[0] if args else next(iter(kwargs.values())))

        return record

    @torch.no_grad()
    def _accumulate(self, name: str, inputs: torch.Tensor) -> None:
        if self.token_mask is not None:
            if tuple(self.token_mask.shape) != tuple(inputs.shape[:-1]):
                raise ValueError(f"token mask of shape {tuple(self.token_mask.shape)} does not fit the input "
                                 f"of {name!r}, shape {tuple(inputs.shape)}")
            inputs = inputs[self.token_mask.to(inputs.device)]
        device = self.device or (torch.device("cpu") if inputs.device.type == "mps" else inputs.device)
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(device=device, dtype=torch.float64)
        if name in self.grams:
            self.grams[name].addmm_(rows.T, rows)
        else:
            self.grams[name] = rows.T @ rows
        self.counts[name] += rows.shape[0]
