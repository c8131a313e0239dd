"""Stage 7, once per catalog: the HTML report of the catalog's current artifacts."""

from __future__ import annotations

from conceptflow.config import Catalog
from conceptflow.report import write_report
from conceptflow.stages.base import run_stage
from conceptflow.stages.table import stage, upstream_md5s


def report(catalog: Catalog, force: bool = False):
    upstream = upstream_md5s(catalog, "report")  # {"concepts/<c>/images": md5 or "missing", ...}

    def produce(staging):
        write_report(catalog, staging / "index.html")
        return {"params": {"concepts": len(catalog.concepts), "combinations": len(catalog.combinations)}}

    row = stage("report")
    return run_stage(row.name, catalog.project, row.folder(catalog), row.config_hash(catalog), upstream, produce, force)
