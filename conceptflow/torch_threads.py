"""Set torch's intra-op threads for this process (the orchestration layer decides how many, e.g.
``tasks.threads`` on a Dask worker, without importing torch itself)."""

from __future__ import annotations


def use_torch_threads(threads: int) -> int:
    """``torch.set_num_threads(threads)`` unless already so; returns the count in force."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
