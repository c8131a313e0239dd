"""Which stage items are up to date, decided before a run submits anything.

A no-change rerun of a large catalog spends most of its time submitting, tracking and finishing
one orchestration task per item that then finds its output up to date. ``up_to_date_items`` makes
the same decision as each stage's own ``run_stage`` (the manifest key a run would produce, from the
stage table's config hash and the upstream md5s on disk, and unchanged content) for every item of a
plan, in plan order: an item is up to date when its own output is and every item it reads from is,
so nothing downstream of an item that will run is skipped. The flow submits only the others; a
skipped item's summary is its manifest, exactly what the stage would have returned.
"""

from __future__ import annotations

from typing import Iterable

from conceptflow import __version__
from conceptflow.config import Catalog
from conceptflow.errors import ConceptflowError
from conceptflow.manifest import Manifest
from conceptflow.stages.base import up_to_date
from conceptflow.stages.table import Stage, stage, upstream_items, upstream_md5s


def _upstream(catalog: Catalog, row: Stage, item: str) -> dict[str, str]:
    if row.name == "ingest":  # its upstream is the photos themselves
        from conceptflow.stages.ingest import source_md5

        return {"source": source_md5(catalog, item)}
    return upstream_md5s(catalog, row.name, item)


def current_manifest(catalog: Catalog, row: Stage, item: str, options: dict | None = None) -> Manifest | None:
    """The item's manifest when its output is up to date as the stage would judge it now, else None."""
    passed = {key: value for key, value in (options or {}).items() if key in row.options}
    try:
        upstream = _upstream(catalog, row, item)
        config_hash = f"{row.config_hash(catalog, item, **passed)}:{__version__}"
    except (ConceptflowError, OSError):  # an upstream output missing, a photo unreadable: let the stage say so
        return None
    folder = row.folder(catalog, item)
    wanted = Manifest(stage=row.name, name=item, path=folder, md5="", config_hash=config_hash, upstream=upstream)
    return up_to_date(folder, wanted)


def up_to_date_items(catalog: Catalog, jobs: Iterable[tuple[Stage, str]],
                     options: dict | None = None) -> dict[str, Manifest]:
    """``{"<stage>:<item>": manifest}`` of the jobs (in plan order) that a run would skip."""
    skipped: dict[str, Manifest] = {}
    for row, item in jobs:
        reads = [f"{name}:{upstream_item}" for name in row.upstream
                 for upstream_item in upstream_items(catalog, row, stage(name), item)]
        if not all(label in skipped for label in reads):
            continue
        manifest = current_manifest(catalog, row, item, options)
        if manifest is not None:
            skipped[f"{row.name}:{item}"] = manifest
    return skipped
