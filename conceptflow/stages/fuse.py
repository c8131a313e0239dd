"""Stage 4: fuse the adapters of a combination into one model."""

from __future__ import annotations

from conceptflow.adapters.concept_io import save_adapter
from conceptflow.adapters.merge import base_weights, fused_runtime_tensors, fused_tensors, merged_embeddings
from conceptflow.methods import read_concept
from conceptflow.config import Catalog
from conceptflow.layout import Layout
from conceptflow.models.loading import load_base_pipeline, model_fingerprint
from conceptflow.stages.base import run_stage
from conceptflow.stages.table import stage, upstream_md5s


def fuse(catalog: Catalog, combination_name: str, force: bool = False):
    combination = catalog.combination(combination_name)
    layout = Layout(catalog)
    upstream = upstream_md5s(catalog, "fuse", combination_name)  # {"adapter.<concept>": md5}

    def produce(staging):
        pipeline = load_base_pipeline(catalog.base_model_source, catalog.device, catalog.dtype)
        concepts = [read_concept(layout.adapter(name), pipeline) for name in combination.concepts]
        paths = sorted({path for concept in concepts for path in concept.deltas})
        base = base_weights(pipeline, paths)
        if catalog.fuse.method == "gradient":
            from conceptflow.fuse.gradient import gradient_fuse

            weights, metrics = gradient_fuse(pipeline, catalog, combination, concepts, base)
        else:
            from conceptflow.fuse.average import average_fuse

            weights, metrics = average_fuse(base, concepts, catalog.fuse.adapter_scale), {}
        meta = {
            "kind": "fused", "name": combination_name, "method": catalog.fuse.method,
            "solver": catalog.fuse.solver if catalog.fuse.method == "gradient" else None,
            "adapter_scale": catalog.fuse.adapter_scale,
            "concepts": {c.meta["name"]: {"method": c.meta["method"], "md5": upstream[f"adapter.{c.meta['name']}"],
                                          "class_word": c.meta["class_word"]} for c in concepts},
            "base_model": catalog.base_model, "base_model_hash": model_fingerprint(catalog.base_model_source),
        }
        # run-time channels (ToVA token deltas, Cones 2 residuals) are not fused: carried as they are
        runtime, meta["runtime_parts"] = fused_runtime_tensors(concepts, catalog.fuse.adapter_scale)
        if not meta["runtime_parts"]:
            del meta["runtime_parts"]  # a fused model of mergeable concepts keeps its concept.json (and md5)
        save_adapter(staging, {**fused_tensors(weights, merged_embeddings(concepts)), **runtime}, meta)
        return {"params": {"method": catalog.fuse.method, "solver": meta["solver"] or "",
                           "adapter_scale": catalog.fuse.adapter_scale, "concepts": ",".join(combination.concepts)},
                "metrics": {"fused_layers": float(len(weights)), **metrics}}

    row = stage("fuse")
    return run_stage(row.name, combination_name, row.folder(catalog, combination_name),
                     row.config_hash(catalog, combination_name), upstream, produce, force)
