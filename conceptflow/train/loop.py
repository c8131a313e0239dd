"""The one training loop: seeded steps, progress bar, atomic checkpoints, exact resume.

Each step draws its randomness from a generator seeded with (seed, step), so a run resumed
from a checkpoint at step k takes the same steps k+1.. as an uninterrupted run: the result
is the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from conceptflow.fileio import atomic_path, write_json_atomic
from conceptflow.train.precision import Precision
from conceptflow.seeding import step_generator

CHECKPOINT_DIR = "checkpoint"


class TrainingMethod(Protocol):
    def parameter_groups(self) -> list[dict]: ...

    def loss(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_step(self) -> None: ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten AdamW state to safetensors-compatible tensors plus a JSON description."""
    state = optimizer.state_dict()
    tensors, described = {}, {"param_groups": state["param_groups"], "state": {}}
    for param_id, entries in state["state"].items():
        described["state"][str(param_id)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"opt.{param_id}.{name}"] = value.detach().cpu().contiguous()
                described["state"][str(param_id)][name] = "tensor"
            else:
                described["state"][str(param_id)][name] = value
    return tensors, described


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], described: dict) -> None:
    state = {}
    for param_id, entries in described["state"].items():
        state[int(param_id)] = {
            name: tensors[f"opt.{param_id}.{name}"] if value == "tensor" else value for name, value in entries.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": described["param_groups"]})


def save_checkpoint(folder: Path, step: int, method: TrainingMethod, optimizer, run_key: str,
                    precision: Precision | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    optimizer_tensors, optimizer_description = _optimizer_tensors(optimizer)
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in method.trainable_state().items()}
    tensors.update(optimizer_tensors)
    with atomic_path(folder / "state.safetensors") as temporary:
        save_file(tensors, str(temporary))
    progress = {"step": step, "run_key": run_key, "optimizer": optimizer_description}
    if precision is not None and precision.state():
        progress["grad_scaler"] = precision.state()
    write_json_atomic(folder / "progress.json", progress)


def load_checkpoint(folder: Path, method: TrainingMethod, optimizer, run_key: str,
                    precision: Precision | None = None) -> int:
    """Restore and return the step reached; 0 when there is no checkpoint of this run."""
    progress_path = folder / "progress.json"
    if not progress_path.is_file() or not (folder / "state.safetensors").is_file():
        return 0
    progress = json.loads(progress_path.read_text())
    if progress.get("run_key") != run_key:
        return 0  # a checkpoint of other data or settings: start afresh
    tensors = load_file(str(folder / "state.safetensors"))
    method.load_trainable_state({k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")})
    _restore_optimizer(optimizer, tensors, progress["optimizer"])
    if precision is not None:
        precision.load_state(progress.get("grad_scaler", {}))
    return int(progress["step"])


def run_training(method: TrainingMethod, steps: int, seed: int, checkpoint_root: Path, run_key: str,
                 checkpoint_every: int, log_every: int, description: str = "train",
                 on_log: Callable[[int, dict], None] | None = None,
                 stop_after: int | None = None, precision: Precision | None = None) -> list[dict]:
    """Optimise ``method`` for ``steps`` steps (resuming if a checkpoint of this run exists).

    ``stop_after`` ends the run early at that step (after checkpointing), as a kill would;
    tests use it to check that resuming reproduces an uninterrupted run. ``precision`` runs the
    forward passes under autocast and scales fp16 losses (``conceptflow.train.precision``).
    Returns the logged metrics (one dict per ``log_every`` steps).
    """
    precision = precision or Precision()
    optimizer = torch.optim.AdamW(method.parameter_groups(), weight_decay=0.0)
    checkpoint_folder = Path(checkpoint_root) / CHECKPOINT_DIR
    start = load_checkpoint(checkpoint_folder, method, optimizer, run_key, precision)
    if start:
        method.after_step()  # re-derive step-dependent state (e.g. frozen embeddings) as it was
    history = []
    progress = tqdm(range(start, steps), initial=start, total=steps, desc=description, leave=False)
    for step in progress:
        generator = step_generator(seed, step)
        with precision.autocast():
            loss, logs = method.loss(step, generator)
        optimizer.zero_grad(set_to_none=True)
        precision.backward_and_step(loss, optimizer)
        method.after_step()
        done = step + 1
        if done % log_every == 0 or done == steps:
            record = {"step": done, "loss": float(loss.detach()), **logs}
            history.append(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if on_log:
                on_log(done, record)
        if done % checkpoint_every == 0 or done == steps or done == stop_after:
            save_checkpoint(checkpoint_folder, done, method, optimizer, run_key, precision)
        if stop_after is not None and done >= stop_after:
            break
    progress.close()
    return history
