"""Names and the strict settings base that every configuration model shares.

Kept below every library package (it imports nothing of the project) so that method and
sampler folders can define their own settings without importing ``conceptflow.config``.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

CONCEPT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
CONCEPT_REFERENCE = re.compile(r"<([a-z][a-z0-9_]{0,31})>")


class StrictModel(BaseModel):
    """Settings that refuse unknown fields and cannot change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
