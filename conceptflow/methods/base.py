"""What every training method shares, and the registry row that names a method's parts.

A method lives in one folder, ``conceptflow/methods/<name>/`` (peft's shape), split by concern:

* ``config.py``: its settings, a ``ConceptTrainConfig`` subclass with ``method: Literal[name]``;
* its adapter/layer code (``lora.py``, ``krona_wed.py`` ...);
* ``trainer.py``: the training objective, a ``ConceptTrainer`` subclass (``run_training`` drives it);
* ``reader.py``: saved adapter tensors -> ``ConceptEffects`` (what it does to a pipeline);
* optional exporters (``lycoris.py`` ...): a concept folder -> a file other tools load;
* ``__init__.py``: its ``MethodSpec`` row, which ``conceptflow/methods/__init__.py`` registers.

``ConceptTrainer`` holds the parts every method has: the concept's token embeddings (trained,
frozen once their mean norm reaches the limit), their checkpoint state and their export rows.
A method adds its own parameters, loss and tensors.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch
from pydantic import Field

from conceptflow.adapters.concept_io import EMBEDDING_PREFIX
from conceptflow.adapters.effects import ConceptEffects
from conceptflow.schema import StrictModel
from conceptflow.train.common import ConceptTrainingSetup, freeze_embeddings_at_norm

EMBEDDINGS_STATE = "embeddings"


class ConceptTrainConfig(StrictModel):
    """Settings every training method has (a method's config adds its own)."""

    steps: int = Field(200, ge=1, description="optimisation steps")
    batch_size: int = Field(2, ge=1)
    lr_embeddings: float = Field(1e-3, description="learning rate of the concept's token embeddings")
    embedding_norm_limit: float = Field(
        0.55, description="stop updating the token embeddings once their mean norm reaches this (Mix-of-Show)")
    masked_loss: bool = Field(True, description="restrict the denoising loss to the foreground mask")
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    # Left out of dumps at their defaults, so the config hashes of concepts trained before these
    # settings existed stay the same (nothing retrains for a setting it does not use).
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", exclude_if=lambda value: value == "no", description="fp16/bf16: frozen base in half precision, trainable parameters and optimizer state in "
        "float32, autocast forward passes, a grad scaler for fp16; no: everything in the catalog's dtype")
    gradient_checkpointing: bool = Field(
        False, exclude_if=lambda value: not value, description="recompute the UNet's activations in the backward pass (diffusers' non-reentrant "
        "checkpointing): less memory for more time")


class ConceptTrainer:
    """Base of a method's ``TrainingMethod`` (see ``conceptflow.train.loop``).

    Subclasses implement ``__init__`` (add their layers to ``setup``'s models, then call
    ``super().__init__``), ``method_parameter_groups``, ``loss``, ``method_state`` /
    ``load_method_state`` and ``method_meta``.
    """

    def __init__(self, setup: ConceptTrainingSetup, config: ConceptTrainConfig, device: str = "cpu"):
        self.setup, self.config, self.device = setup, config, device

    # --- what run_training calls ---------------------------------------------------------

    def parameter_groups(self) -> list[dict]:
        return [{"params": [self.setup.embeddings.weight], "lr": self.config.lr_embeddings},
                *self.method_parameter_groups()]

    def loss(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self) -> None:
        freeze_embeddings_at_norm(self.setup.embeddings, self.config.embedding_norm_limit)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {EMBEDDINGS_STATE: self.setup.embeddings.weight.detach(), **self.method_state()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.setup.embeddings.weight.copy_(state[EMBEDDINGS_STATE])
        self.load_method_state({k: v for k, v in state.items() if k != EMBEDDINGS_STATE})

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors for ``adapter.safetensors`` (``embedding.<layer token>`` rows + the method's
        tensors) and the method's part of ``concept.json``."""
        state = self.trainable_state()
        tensors = {f"{EMBEDDING_PREFIX}{token}": row
                   for token, row in zip(self.setup.token_strings, state.pop(EMBEDDINGS_STATE))}
        tensors.update(state)
        return tensors, self.method_meta()

    # --- what a method provides -----------------------------------------------------------

    def method_parameter_groups(self) -> list[dict]:
        raise NotImplementedError

    def method_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def method_meta(self) -> dict:
        return {}


# reader(adapter tensors without the embedding rows, concept.json, base pipeline) -> effects
# (the shared loader fills in the embeddings)
Reader = Callable[[dict[str, torch.Tensor], dict, object], ConceptEffects]


def _resolve(reference: str):
    module_name, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class MethodSpec:
    """One registry row: a method's name, its settings and where its parts live.

    ``trainer``, ``reader`` and ``exporters`` are ``"module:attribute"`` references, imported
    on first use, so that reading a catalog does not import every method's dependencies.
    """

    name: str
    config: type[ConceptTrainConfig]
    trainer: str
    reader: str
    exporters: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    # True: the method learns a catalog group's concepts together from photos showing them
    # (``stages.train_group``); its concepts are listed in ``groups:`` and have no photos of their own.
    trains_groups: bool = False

    def build_trainer(self, setup: ConceptTrainingSetup, config: ConceptTrainConfig, device: str = "cpu"):
        return _resolve(self.trainer)(setup, config, device)

    def read(self, tensors: dict[str, torch.Tensor], meta: dict, pipeline) -> ConceptEffects:
        return _resolve(self.reader)(tensors, meta, pipeline)

    def exporter(self, format_name: str):
        return _resolve(self.exporters[format_name])
