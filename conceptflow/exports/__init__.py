"""Exports: a concept or a fused combination as files other tools load (A1111, ComfyUI, diffusers).

A concept's formats are its method's ``MethodSpec.exporters`` (``conceptflow.methods``); a fused
combination's are ``COMBINATION_EXPORTERS`` (``diffusers``: ``diffusers_folder``). The dispatcher
takes folders (``conceptflow.layout`` resolves catalog names to them, in the CLI).
"""

from conceptflow.exports.dispatch import (
    COMBINATION_EXPORTERS,
    combination_formats,
    concept_formats,
    export_combination,
    export_concept,
)

__all__ = ["COMBINATION_EXPORTERS", "combination_formats", "concept_formats", "export_combination", "export_concept"]
