"""The lineage chain of a registered version, from its registry tags (``stages/register.py``).

A concept version's chain: the ingested dataset's DVC md5 -> the masks' md5 -> the train
config hash and the config slice it covers (tag ``config.train``; versions registered before
that tag existed show none) -> the git revision -> the base model id and content hash -> the
adapter's md5 -> the version. A combination's: the fuse config, revision, base model, fused
md5 and version, then each concept version it fused (tags ``concept.<c>.version``), each with
its own chain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from conceptflow.errors import ConceptflowError, ModelUnavailableError
from conceptflow.registry import lookup
from conceptflow.serving.reference import ModelReference, parse_model_reference

CONCEPT_STEPS = (("dataset", "dvc.images.md5"), ("masks", "dvc.masks.md5"), ("config hash", "config_hash"),
                 ("code revision", "git_revision"), ("base model", "base_model"),
                 ("base model hash", "base_model_hash"), ("adapter", "dvc.adapter.md5"))
COMBO_STEPS = (("config hash", "config_hash"), ("code revision", "git_revision"), ("base model", "base_model"),
               ("base model hash", "base_model_hash"), ("fused model", "dvc.fused.md5"),
               ("generated", "dvc.generated.md5"), ("metrics", "dvc.metrics.md5"))


@dataclass
class Chain:
    """One version's lineage: (label, value) steps in order, its config slice and its parts."""

    name: str
    version: str
    aliases: list[str]
    steps: list[tuple[str, str]]
    config: dict | None
    tags: dict[str, str]
    concepts: list["Chain"] = field(default_factory=list)


def resolve_version(uri: str, reference: ModelReference) -> dict:
    """``registry.lookup`` of the reference, with an error naming the model, alias or version."""
    try:
        return lookup(uri, reference.name, reference.alias, reference.version)
    except ModelUnavailableError:
        raise
    except Exception as error:  # noqa: BLE001 - MLflow raises its own types for unknown names
        raise ModelUnavailableError(f"cannot read {reference} from the registry at {uri}: {error}") from None


def _config(tags: dict[str, str], key: str) -> dict | None:
    raw = tags.get(key)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ConceptflowError(f"registry tag {key!r} is not JSON: {raw[:80]!r}") from None


def chain_of(uri: str, reference: ModelReference | str) -> Chain:
    """The lineage chain of ``reference`` (``concept.dog@champion``, ``combo.a+b/2``, ...)."""
    if isinstance(reference, str):
        reference = parse_model_reference(reference)
    entry = resolve_version(uri, reference)
    tags = entry["tags"]
    kind = reference.name.split(".", 1)[0]
    steps = CONCEPT_STEPS if kind == "concept" else COMBO_STEPS
    chain = Chain(name=reference.name, version=entry["version"], aliases=entry["aliases"],
                  steps=[(label, tags.get(key, "(not recorded)")) for label, key in steps],
                  config=_config(tags, f"config.{'train' if kind == 'concept' else 'fuse'}"), tags=tags)
    if kind == "combo":
        concepts = sorted(key[len("concept."):-len(".version")] for key in tags
                          if key.startswith("concept.") and key.endswith(".version"))
        for concept in concepts:
            chain.concepts.append(chain_of(uri, ModelReference(f"concept.{concept}", alias=None,
                                                               version=tags[f"concept.{concept}.version"])))
    return chain


def format_chain(chain: Chain, indent: str = "") -> str:
    """The chain as text, one step a line (``->`` between steps), the config under its hash."""
    aliases = f" @{','.join(chain.aliases)}" if chain.aliases else ""
    lines = [f"{indent}{chain.name} version {chain.version}{aliases}"]
    for label, value in chain.steps:
        lines.append(f"{indent}  -> {label:16s} {value}")
        if label == "config hash":
            if chain.config is None:
                lines.append(f"{indent}     config: not recorded with this version (registered before the "
                             "config tag; `conceptflow reproduce` reads it from git)")
            else:
                for key, value_ in chain.config.items():
                    lines.append(f"{indent}     {key} = {json.dumps(value_, sort_keys=True)}")
    lines.append(f"{indent}  -> registered       {chain.name}/{chain.version}")
    if chain.concepts:
        lines.append(f"{indent}  fused from:")
        for concept in chain.concepts:
            lines.append(format_chain(concept, indent + "    "))
    return "\n".join(lines)
