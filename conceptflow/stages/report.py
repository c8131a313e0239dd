"""Stage 8: the HTML report of the catalog's current artifacts."""

from __future__ import annotations

from conceptflow.config import Catalog
from conceptflow.layout import Layout
from conceptflow.report import write_report
from conceptflow.stages.base import read_manifest, run_stage


def report(catalog: Catalog, force: bool = False):
    layout = Layout(catalog)
    folders = [layout.images(c.name) for c in catalog.concepts] + [layout.masks(c.name) for c in catalog.concepts]
    folders += [layout.adapter(c.name) for c in catalog.concepts]
    folders += [f(c.name) for c in catalog.combinations for f in (layout.generated, layout.metrics)]
    upstream = {str(folder.relative_to(layout.data)): (m.md5 if (m := read_manifest(folder)) else "missing")
                for folder in folders}

    def produce(staging):
        write_report(catalog, staging / "index.html")
        return {"params": {"concepts": len(catalog.concepts), "combinations": len(catalog.combinations)}}

    return run_stage("report", catalog.project, layout.report(), catalog.project, upstream, produce, force)
