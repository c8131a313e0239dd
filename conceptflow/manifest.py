"""Manifests: what stages hand each other (paths and hashes, never tensors).

A manifest's ``key`` is derived from the hashes of its inputs and the config that made it;
an unchanged key means the stage has nothing to redo.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from conceptflow.fileio import write_json_atomic


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    stage: str
    name: str  # concept name or combination name
    path: Path  # the artifact: file or folder
    md5: str  # content hash of the artifact (DVC's md5)
    config_hash: str
    upstream: dict[str, str] = {}  # name -> md5 of the artifacts this one was made from

    @property
    def key(self) -> str:
        payload = json.dumps([self.stage, self.name, self.config_hash, sorted(self.upstream.items())])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def save(self, path: Path) -> Path:
        return write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        return cls.model_validate_json(Path(path).read_text())
