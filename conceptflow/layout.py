"""Where every artifact of a catalog lives (the DVC workspace under ``data/``).

The stage table (stages/table.py) names the method holding each stage's output; dvc.yaml's
outs name the same paths, and tests/test_stage_table.py checks that they do.
"""

from __future__ import annotations

from pathlib import Path

from conceptflow.config import Catalog


class Layout:
    def __init__(self, catalog: Catalog):
        self.root = Path(catalog.root)
        self.data = self.root / "data"

    def images(self, concept: str) -> Path:
        return self.data / "concepts" / concept / "images"

    def masks(self, concept: str) -> Path:
        return self.data / "concepts" / concept / "masks"

    def adapter(self, concept: str) -> Path:
        return self.data / "adapters" / concept

    def fused(self, combination: str) -> Path:
        return self.data / "fused" / combination

    def generated(self, combination: str) -> Path:
        return self.data / "generated" / combination

    def metrics(self, combination: str) -> Path:
        return self.data / "metrics" / combination

    def report(self) -> Path:
        return self.data / "report"

    def checkpoints(self, concept: str) -> Path:
        """Training checkpoints: kept outside the DVC outputs so a killed run can resume."""
        return self.root / ".cache" / "checkpoints" / concept
