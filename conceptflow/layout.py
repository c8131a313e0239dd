"""Where every artifact of a catalog lives (the DVC workspace under ``data/``).

The stage table (stages/table.py) names the method holding each stage's output; dvc.yaml's
outs name the same paths, and tests/test_stage_table.py checks that they do.

Every path is checked to be a folder directly inside its stage's folder (``data/<stage>/``,
or ``.cache/checkpoints/``), resolved (``resolve()`` of the stage folder, then the name joined
as the filesystem would read it): a concept or combination name that would lead
elsewhere (``../x``, ``a/b``) is a ``CatalogError`` naming the catalog field, so nothing is ever
written outside the project's data folders. The names are validated when the catalog loads
(conceptflow.schema); this is the check at the point of writing. The stage folders themselves
(``data/adapters``, ...) may be symlinks to another disk: containment is checked against
their resolved location.
"""

from __future__ import annotations

import os
from pathlib import Path

from conceptflow.config import Catalog
from conceptflow.errors import CatalogError


class Layout:
    def __init__(self, catalog: Catalog):
        self.root = Path(catalog.root)
        self.data = self.root / "data"

    def _inside(self, folder: Path, name: str, field: str) -> Path:
        """``folder / name``, refused unless it resolves to a child of ``folder`` (resolved)."""
        base = folder.resolve()
        target = Path(os.path.normpath(base / name))  # '..' and '/' taken as the filesystem would
        if not name or target.parent != base or target.name != name:
            raise CatalogError(
                f"{field} {name!r} would write {target}, not a folder directly in {base}: use a name of letters, "
                "digits, '_' (and '+', '-' for combinations) without '/' or '..'")
        return folder / name

    def _concept(self, concept: str, *parts: str) -> Path:
        return self._inside(self.data / "concepts", concept, "concept name").joinpath(*parts)

    def images(self, concept: str) -> Path:
        return self._concept(concept, "images")

    def masks(self, concept: str) -> Path:
        return self._concept(concept, "masks")

    def adapter(self, concept: str) -> Path:
        return self._inside(self.data / "adapters", concept, "concept name")

    def fused(self, combination: str) -> Path:
        return self._inside(self.data / "fused", combination, "combination name")

    def generated(self, combination: str) -> Path:
        return self._inside(self.data / "generated", combination, "combination name")

    def metrics(self, combination: str) -> Path:
        return self._inside(self.data / "metrics", combination, "combination name")

    def report(self) -> Path:
        return self.data / "report"

    def sampler_cache(self, sampler: str) -> Path:
        """What a sampler computes once per input and reuses (Concept Conductor's layout inversions,
        keyed by content): outside the DVC outputs, safe to delete."""
        return self._inside(self.root / ".cache" / "samplers", sampler, "sampler name")

    def group_runs(self, group: str) -> Path:
        """A group's joint training results (Textual Localization), which its concepts' train
        stages copy their folders from: outside the DVC outputs, safe to delete."""
        return self._inside(self.root / ".cache" / "groups", group, "group name")

    def class_images(self, key: str) -> Path:
        """Class-prior images the base drew (``stages.class_images``), by their content key."""
        return self._inside(self.root / ".cache" / "class_images", key, "class-image key")

    def checkpoints(self, concept: str) -> Path:
        """Training checkpoints: kept outside the DVC outputs so a killed run can resume."""
        return self._inside(self.root / ".cache" / "checkpoints", concept, "concept name")
