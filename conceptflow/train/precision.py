"""Mixed-precision training, the usual way (diffusers' and kohya's training scripts).

``mixed_precision: fp16 | bf16``: the frozen base (UNet, text encoder, VAE) is loaded in half
precision, the trainable parameters (token embeddings, adapters) and therefore AdamW's state stay
float32, forward passes run under ``torch.autocast`` and the backward pass outside it; fp16
scales the loss with a ``GradScaler`` (bf16 has float32's range and needs none). ``no`` changes
nothing: the catalog's ``dtype`` is used for everything, as before. bf16 autocast runs on the CPU
too, which is how the tests check it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

MixedPrecision = Literal["no", "fp16", "bf16"]
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16"}


def base_dtype_name(mixed_precision: MixedPrecision, catalog_dtype: str) -> str:
    """The dtype the frozen base is loaded in: half under mixed precision, else the catalog's."""
    return DTYPE_NAMES.get(mixed_precision, catalog_dtype)


def trainable_in_float32(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Make the trainable parameters float32 master weights (a no-op when they already are)."""
    for parameter in parameters:
        if parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


@dataclass
class Precision:
    """Autocast and loss scaling for one training run."""

    mixed_precision: MixedPrecision = "no"
    device_type: str = "cpu"

    def __post_init__(self):
        if self.mixed_precision not in ("no", *HALF_DTYPES):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', not {self.mixed_precision!r}")
        self.scaler = torch.amp.GradScaler(self.device_type) if self.mixed_precision == "fp16" else None

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=HALF_DTYPES[self.mixed_precision])

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        self.scaler.update()

    def state(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
