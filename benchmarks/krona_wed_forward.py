"""KronA-WED factored forward against the materialised one, per layer size and token count.

Times forward + backward (input and A, B, m gradients) of one ``KronaWEDLinear`` in both
modes, interleaved over rounds, and prints the median seconds, the ratio
factored / materialised (< 1: the factored form is faster) and the form that
``forward_mode="auto"`` picks for that call. Sizes: the tiny base (32, 64)
and SD-1.x attention linears (320/640/1280, cross-attention input 768) at the token counts
of 256- and 512-px training.

``--weight-decompose columns`` times the column-norm layers instead (the measurements in
krona_wed.py's docstring are of rows).

Usage: ``python benchmarks/krona_wed_forward.py [--rounds 7] [--threads 1] [--weight-decompose rows]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from conceptflow.methods.conceptflow_s.krona_wed import KronaWEDLinear

# (label, out, in, tokens): tokens = batch × latent pixels (self-attention) or × 77 (K/V).
CASES = [
    ("tiny 32 self", 32, 32, 4 * 256),
    ("tiny 64 self", 64, 64, 4 * 64),
    ("tiny 64 cross k/v", 64, 32, 4 * 77),
    ("sd 320 self 256px", 320, 320, 1024),
    ("sd 320 self 512px", 320, 320, 4096),
    ("sd 320 cross k/v", 320, 768, 77),
    ("sd 640 self 256px", 640, 640, 256),
    ("sd 640 self 512px", 640, 640, 1024),
    ("sd 640 cross k/v", 640, 768, 77),
    ("sd 1280 self 256px", 1280, 1280, 64),
    ("sd 1280 self 512px", 1280, 1280, 256),
    ("sd 1280 cross k/v", 1280, 768, 77),
]


def step_fn(module: nn.Module, inputs: torch.Tensor):
    def step() -> None:
        module(inputs).square().mean().backward()
    return step


def time_case(out_features: int, in_features: int, tokens: int, rounds: int,
              weight_decompose: str = "rows") -> tuple[dict[str, float], str]:
    base = nn.Linear(in_features, out_features)
    inputs = torch.randn(1, tokens, in_features, requires_grad=True)
    steps = {}
    for name in ("factored", "materialized"):
        module = KronaWEDLinear(base, forward_mode=name, weight_decompose=weight_decompose)
        nn.init.normal_(module.kron_b, std=1e-3)
        steps[name] = step_fn(module, inputs)
    work = 2 * tokens * out_features * in_features
    repeats = max(1, min(200, int(2e9 / work)))  # roughly 20-50 ms per timing on one core
    for step in steps.values():
        for _ in range(2):
            step()
    times = {name: [] for name in steps}
    for round_index in range(rounds):
        for name in (list(steps) if round_index % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            for _ in range(repeats):
                steps[name]()
            times[name].append((time.perf_counter() - start) / repeats)
    auto_choice = "factored" if KronaWEDLinear(base).uses_factored_forward(tokens) else "materialized"
    return {name: statistics.median(values) for name, values in times.items()}, auto_choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default because on a shared 2-core machine "
                             "OpenMP workers of a 2-thread run stall behind other processes")
    parser.add_argument("--weight-decompose", choices=("rows", "columns"), default="rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); forward+backward per layer, "
          f"weight_decompose={args.weight_decompose}")
    for label, out_features, in_features, tokens in CASES:
        medians, auto_choice = time_case(out_features, in_features, tokens, args.rounds, args.weight_decompose)
        ratio = medians["factored"] / medians["materialized"]
        print(f"{label:20s} {out_features:4d}x{in_features:<4d} tokens {tokens:5d}: "
              f"factored {medians['factored'] * 1e3:8.3f} ms, materialized {medians['materialized'] * 1e3:8.3f} ms, "
              f"factored/materialized = {ratio:.2f} (auto: {auto_choice})", flush=True)


if __name__ == "__main__":
    main()
