"""Names and the strict settings base that every configuration model shares.

Kept below every library package (it imports nothing of the project) so that method and
sampler folders can define their own settings without importing ``conceptflow.config``.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

CONCEPT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
CONCEPT_REFERENCE = re.compile(r"<([a-z][a-z0-9_]{0,31})>")
# Names that become folder names under data/ and MLflow model names (``combo.<name>``), so no
# '/', '\\', '.', '@' or spaces. A combination's name defaults to its concepts joined by '+'
# (``dog+cat``), so '+' stays allowed; '-' is allowed too. Starts with a letter or digit.
COMBINATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]{0,199}$")
# The project name is the MLflow experiment name and the report's title.
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StrictModel(BaseModel):
    """Settings that refuse unknown fields and cannot change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
