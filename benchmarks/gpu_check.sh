#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): SD-1.5-sized training (ED-LoRA, ConceptFlow-S, 50 steps,
# 512 px, bf16 mixed precision), fusion and sampling (8 images, plain fused and ConceptFlow-M, 50
# steps, float16) on a CUDA device; prints s/step, s/image, peak GPU memory and whether the outputs
# are finite. Without CUDA it says so and exits 0. Extra arguments go to gpu_check.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
