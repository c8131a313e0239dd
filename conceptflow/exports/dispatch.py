"""Which formats a concept or a fused combination exports to, and the one call that writes them."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from conceptflow.adapters.concept_io import ADAPTER_FILE, CONCEPT_FILE
from conceptflow.errors import ConceptflowError
from conceptflow.methods import METHODS, get_method

# format -> "module:function(fused_folder, out_path, base_model) -> Path"
COMBINATION_EXPORTERS = {"diffusers": "conceptflow.exports.diffusers_folder:export_fused_pipeline"}


def _method_of(concept_folder: Path) -> str:
    folder = Path(concept_folder)
    if not (folder / CONCEPT_FILE).is_file() or not (folder / ADAPTER_FILE).is_file():
        raise ConceptflowError(f"{folder} is not a trained concept (needs {ADAPTER_FILE} and {CONCEPT_FILE}); "
                               "run `conceptflow train` for it")
    method = json.loads((folder / CONCEPT_FILE).read_text()).get("method")
    if method not in METHODS:
        raise ConceptflowError(f"{folder}/{CONCEPT_FILE} names unknown method {method!r}; known: {sorted(METHODS)}")
    return method


def concept_formats(concept_folder: Path) -> list[str]:
    """The formats the concept's method exports (its ``MethodSpec.exporters``)."""
    return sorted(get_method(_method_of(concept_folder)).exporters)


def combination_formats() -> list[str]:
    return sorted(COMBINATION_EXPORTERS)


def export_concept(concept_folder: Path, format_name: str, out_path: Path) -> Path:
    """Write the trained concept at ``concept_folder`` in ``format_name``; returns what was written."""
    method = _method_of(concept_folder)
    spec = get_method(method)
    if format_name not in spec.exporters:
        others = sorted(name for name, row in METHODS.items() if format_name in row.exporters)
        where = f"; {format_name!r} is for {', '.join(others)} concepts" if others else ""
        raise ConceptflowError(f"{concept_folder} is a {method} concept, which exports to "
                               f"{sorted(spec.exporters) or 'no format'}, not {format_name!r}{where}")
    return spec.exporter(format_name)(Path(concept_folder), Path(out_path))


def export_combination(fused_folder: Path, format_name: str, out_path: Path, base_model: str) -> Path:
    """Write the fused combination at ``fused_folder`` (fused on ``base_model``) in ``format_name``."""
    if format_name not in COMBINATION_EXPORTERS:
        raise ConceptflowError(f"a fused combination exports to {combination_formats()}, not {format_name!r}")
    module_name, _, attribute = COMBINATION_EXPORTERS[format_name].partition(":")
    exporter = getattr(importlib.import_module(module_name), attribute)
    return exporter(Path(fused_folder), Path(out_path), base_model)
