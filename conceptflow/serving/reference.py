"""What a user types to name a registered model and the seeds to draw: parsed and checked.

A model reference is ``<name>@<alias>`` (``combo.dog+cat@champion``), ``<name>/<version>``
(``concept.dog/3``), either of those behind ``models:/``, or a bare ``<name>`` (its
``champion``). Names are the registry's: ``concept.<name>`` or ``combo.<a>+<b>``.

Seeds: ``0-7`` (inclusive range), ``0,3,5``, or a mix (``0-3,9``); order kept, repeats dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from conceptflow.errors import ConceptflowError

DEFAULT_ALIAS = "champion"


@dataclass(frozen=True)
class ModelReference:
    """A registered model and either an alias or a version number (never both)."""

    name: str
    alias: str | None = DEFAULT_ALIAS
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version is not None else f"{self.name}@{self.alias}"

    @property
    def models_uri(self) -> str:
        """The standard MLflow URI of this version (``models:/name@alias`` or ``models:/name/3``)."""
        return f"models:/{self}"


def parse_model_reference(text: str) -> ModelReference:
    """``combo.a+b@champion``, ``concept.dog/3``, ``models:/...`` or a bare name (-> champion)."""
    raw = text.strip()
    body = raw.removeprefix("models:/")
    if "@" in body:
        name, _, alias = body.partition("@")
        reference = ModelReference(name, alias=alias)
        if not alias:
            raise ConceptflowError(f"model reference {raw!r} has an empty alias after '@'")
    elif "/" in body:
        name, _, version = body.rpartition("/")
        if not version.isdigit():
            raise ConceptflowError(f"model reference {raw!r}: the part after '/' must be a version number")
        reference = ModelReference(name, alias=None, version=version)
    else:
        reference = ModelReference(body)
    if not reference.name.startswith(("concept.", "combo.")) or len(reference.name.split(".", 1)[1]) == 0:
        raise ConceptflowError(f"model reference {raw!r} must name concept.<name> or combo.<a>+<b> "
                               "(e.g. combo.dog+cat@champion or concept.dog/2)")
    return reference


def parse_seeds(text: str) -> list[int]:
    """``0-7`` -> [0..7], ``0,3,5`` -> [0, 3, 5]; ranges and lists mix (``0-2,9``)."""
    seeds: list[int] = []
    for part in (piece.strip() for piece in str(text).split(",")):
        try:
            if "-" in part[1:]:  # a leading '-' would be a negative number, which seeds are not
                low, _, high = part.partition("-")
                first, last = int(low), int(high)
                if first > last:
                    raise ValueError
                values = range(first, last + 1)
            else:
                values = [int(part)]
        except ValueError:
            raise ConceptflowError(f"seeds {text!r}: write a range (0-7), a list (0,3,5) or both (0-3,9); "
                                   f"{part!r} is neither") from None
        if any(value < 0 for value in values):
            raise ConceptflowError(f"seeds {text!r}: seeds are non-negative integers")
        seeds.extend(value for value in values if value not in seeds)
    return seeds
