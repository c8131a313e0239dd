"""What a trained concept, or a fused model, does to a base pipeline.

A method's reader turns a saved adapter into a ``ConceptEffects``; sampling, fusion and
serving apply it without knowing the method. A concept reaches a pipeline through up to five
channels, each used by some of the seed methods:

* ``embeddings``: rows of new tokens (single or ED-LoRA's layer-wise tokens) written into
  the tokenizer and the text encoder's table.
* ``deltas``: a merged weight update ΔW per linear layer (``"unet.<path>"`` or
  ``"text_encoder.<path>"``): ED-LoRA's B·A, KronA-WED's W' − W0, Textual Localization's
  cross-attention K/V. This is what gradient fusion works on.
* ``token_deltas``: a ΔW of a cross-attention key/value projection applied only to the rows
  whose text token is one of the concept's (ConceptSplit ToVA: a value LoRA at the token).
  These cannot be merged into the weights: they apply at run time.
* ``text_residuals``: a vector added to the text encoder's output at the positions of a token
  (Cones 2's residual embedding at the class word). Also run-time only. A concept whose
  ``meta["prompt_word"]`` is set has no tokens of its own: its ``<name>`` is written as that word.
* ``weights``: full new weights per linear (a fused model stores these instead of deltas).

A fused model may also carry ``parts``: the run-time channels of the concepts it was fused
from (a ToVA concept's token deltas, a Cones 2 residual), one ``ConceptEffects`` each, since two
concepts may hold token deltas of the same linear at different tokens. Everything that applies
concepts at run time applies a concept's parts with it (``with_parts``).

``conceptflow.adapters.merge.apply_concepts`` writes the mergeable channels into a pipeline;
``conceptflow.adapters.branched`` applies every channel at run time, one set of concepts per
sample of a batch (separate branches of one UNet call).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenDelta:
    """ΔW (out, in) of one linear, added only at the rows whose token is in ``tokens``."""

    delta: torch.Tensor
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class TextResidual:
    """A vector (dim,) added to the text encoder's output wherever ``token`` stands."""

    token: str
    vector: torch.Tensor


@dataclass
class ConceptEffects:
    """Everything sampling and fusion need from a concept (``meta`` is its ``concept.json``)."""

    meta: dict
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    token_deltas: dict[str, TokenDelta] = field(default_factory=dict)
    text_residuals: list[TextResidual] = field(default_factory=list)
    parts: list["ConceptEffects"] = field(default_factory=list)  # a fused model's concepts' run-time channels

    @property
    def name(self) -> str:
        return str(self.meta.get("name", ""))

    @property
    def has_runtime_channels(self) -> bool:
        """True when this concept itself (not its parts) has a run-time channel."""
        return bool(self.token_deltas or self.text_residuals)

    @property
    def mergeable(self) -> bool:
        """True when every channel can be written into the weights (no run-time channel, no parts)."""
        return not self.has_runtime_channels and not self.parts

    def runtime_part(self) -> "ConceptEffects | None":
        """This concept's run-time channels alone (what a fused model carries of it), or None."""
        if not self.has_runtime_channels:
            return None
        meta = {"name": self.name, "method": self.meta.get("method")}
        if self.meta.get("prompt_word"):  # written in prompts as this word (Cones 2's class word)
            meta["prompt_word"] = self.meta["prompt_word"]
        return ConceptEffects(meta, token_deltas=dict(self.token_deltas), text_residuals=list(self.text_residuals))

    def with_parts(self) -> list["ConceptEffects"]:
        """This concept and its parts, flat, for run-time application."""
        return [self, *(piece for part in self.parts for piece in part.with_parts())]

    @property
    def adapted_paths(self) -> set[str]:
        """Every linear this concept changes, by any channel."""
        return set(self.deltas) | set(self.weights) | set(self.token_deltas)
