"""The stages one combination needs, run in order in this process (no Prefect): for scripts,
benchmarks and tests that want a combination's images without the catalog flow.

Which stages and in what order come from the stage table (``stages/table.py``): every stage
generate reads from, directly or not, each concept through its concept stages, then the
combination."""

from __future__ import annotations

from pathlib import Path

from conceptflow.config import Catalog
from conceptflow.stages.table import needed_for, plan, stage


def make_combination(catalog: Catalog, combination_name: str, sampler: str | None = None) -> Path:
    """Ingest, mask and train each concept, fuse, generate; returns the generated folder.
    Each stage skips what is already up to date, as it does in the flow."""
    for row, item in plan(catalog, needed_for("generate"), combinations=(combination_name,)):
        row.call(catalog, item, sampler=sampler)
    return stage("generate").folder(catalog, combination_name)
