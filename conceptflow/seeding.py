"""Per-step seeds: every training step draws its randomness from its own (seed, step) generator.

A run resumed from a checkpoint at step k then takes the same steps k+1.. as an uninterrupted
run. The stride is a prime larger than any run's step count, so runs with different seeds do
not share a step's seed.
"""

from __future__ import annotations

import torch

STEP_STRIDE = 1_000_003


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step`` of a run seeded with ``seed``."""
    return seed * STEP_STRIDE + step


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded with ``step_seed(seed, step)``."""
    return torch.Generator().manual_seed(step_seed(seed, step))
