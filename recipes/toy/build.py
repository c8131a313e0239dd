"""Build every toy-world asset in one call: the pretrained base and its evaluators.

``conceptflow pretrain-toy --out DIR --minutes N`` calls ``build_toy_assets``: the base goes to
``DIR`` (diffusers format + model card), the recogniser and identity encoder to
``DIR/evaluators/{recogniser,identity}``. Re-running resumes an unfinished base from its
checkpoints; finished evaluators are kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from conceptflow.toy.evaluators import WEIGHTS_FILE
from recipes.toy.evaluators import train_identity_encoder, train_recogniser
from recipes.toy.pretrain import PretrainConfig, PretrainResult, pretrain_toy_base

RECOGNISER_STEPS = 3000  # 1200 steps read single objects (0.89) but bound colours to shapes poorly
IDENTITY_STEPS = 2000
EVALUATOR_MINUTES = 26.0  # cap per evaluator


def build_toy_assets(out_dir: str | Path, minutes: float | None = 90.0, config: PretrainConfig = PretrainConfig(),
                     progress: bool = True) -> PretrainResult:
    """Train the evaluators (if absent) and then the base within ``minutes`` of wall time."""
    out_dir = Path(out_dir)
    started = time.monotonic()
    evaluators = out_dir / "evaluators"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        if not (evaluators / "recogniser" / WEIGHTS_FILE).is_file():
            train_recogniser(evaluators / "recogniser", steps=RECOGNISER_STEPS, seed=config.seed, progress=progress,
                             minutes=EVALUATOR_MINUTES)
        if not (evaluators / "identity" / WEIGHTS_FILE).is_file():
            train_identity_encoder(evaluators / "identity", steps=IDENTITY_STEPS, seed=config.seed,
                                   progress=progress, minutes=EVALUATOR_MINUTES)
    finally:
        torch.set_num_threads(previous_threads)
    remaining = None if minutes is None else max(0.0, minutes - (time.monotonic() - started) / 60)
    return pretrain_toy_base(out_dir, remaining, config, progress)
