"""The stages one combination needs, run in order in this process (no Prefect): for scripts,
benchmarks and tests that want a combination's images without the catalog flow."""

from __future__ import annotations

from pathlib import Path

from conceptflow.config import Catalog
from conceptflow.layout import Layout
from conceptflow.stages.fuse import fuse
from conceptflow.stages.generate import generate
from conceptflow.stages.ingest import ingest
from conceptflow.stages.mask import mask
from conceptflow.stages.train import train


def make_combination(catalog: Catalog, combination_name: str, sampler: str | None = None) -> Path:
    """Ingest, mask and train each concept, fuse, generate; returns the generated folder.
    Each stage skips what is already up to date, as it does in the flow."""
    for concept in catalog.combination(combination_name).concepts:
        ingest(catalog, concept)
        mask(catalog, concept)
        train(catalog, concept)
    fuse(catalog, combination_name)
    generate(catalog, combination_name, sampler=sampler)
    return Layout(catalog).generated(combination_name)
