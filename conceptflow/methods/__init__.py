"""The training methods: one folder each, one registry row each (``METHODS``).

Adding a method: write ``conceptflow/methods/<name>/`` (see ``conceptflow.methods.base``) with
its ``SPEC`` and add the spec to ``_BUILT_IN`` below. The catalog's ``train.method`` choices, the
train stage, concept loading (``read_concept``), fusion, exports and the leaderboard read this
registry; nothing else names a method.
"""

from __future__ import annotations

from pathlib import Path

from conceptflow.adapters.concept_io import EMBEDDING_PREFIX, read_adapter, split_prefix
from conceptflow.adapters.effects import ConceptEffects
from conceptflow.adapters.merge import read_fused
from conceptflow.errors import ConceptflowError
from conceptflow.methods import conceptflow_s, cones2, edlora, textual_inversion, textual_localization, tova
from conceptflow.methods.base import ConceptTrainConfig, ConceptTrainer, MethodSpec

_BUILT_IN = (edlora.SPEC, conceptflow_s.SPEC, textual_inversion.SPEC, tova.SPEC, cones2.SPEC,
             textual_localization.SPEC)

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _BUILT_IN}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method at run time (plug-ins, tests); its name must be new."""
    if spec.name in METHODS:
        raise ValueError(f"a training method named {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConceptflowError(f"unknown training method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def method_names() -> list[str]:
    return list(METHODS)


def read_concept(folder: Path, pipeline) -> ConceptEffects:
    """What a trained concept folder (or a fused model's) does to ``pipeline``'s base.

    Token embeddings are read here for every method; the method's reader turns the rest of
    its tensors into effects. A fused model holds full weights (``weight.<model>.<path>``) and
    its concepts' run-time parts (``adapters.merge.read_fused``).
    """
    tensors, meta = read_adapter(folder)
    embeddings = split_prefix(tensors, EMBEDDING_PREFIX)
    if meta.get("kind") == "fused":
        return read_fused(tensors, meta)
    method = meta.get("method")
    if method not in METHODS:
        raise ConceptflowError(f"{folder}/concept.json names unknown method {method!r}; known: {sorted(METHODS)}")
    adapter_tensors = {k: v for k, v in tensors.items() if not k.startswith(EMBEDDING_PREFIX)}
    effects = METHODS[method].read(adapter_tensors, meta, pipeline)
    effects.embeddings.update(embeddings)
    return effects


__all__ = ["METHODS", "ConceptTrainConfig", "ConceptTrainer", "MethodSpec", "get_method", "method_names",
           "read_concept", "register_method"]
