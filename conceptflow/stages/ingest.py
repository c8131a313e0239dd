"""Stage 1: ingest one concept's photos."""

from __future__ import annotations

from conceptflow.config import Catalog
from conceptflow.data.ingest import ingest_concept, list_concept_files
from conceptflow.fileio import file_md5
from conceptflow.stages.base import run_stage
from conceptflow.stages.table import stage


def source_md5(catalog: Catalog, concept_name: str) -> str:
    from hashlib import md5

    digest = md5()
    for path in list_concept_files(catalog.images_dir(catalog.concept(concept_name)), catalog.ingest.outside_symlinks):
        digest.update(f"{path.name}\0{file_md5(path)}\n".encode())
    return digest.hexdigest()


def ingest(catalog: Catalog, concept_name: str, force: bool = False):
    concept = catalog.concept(concept_name)
    source_dir = catalog.images_dir(concept)

    def produce(staging):
        manifest = ingest_concept(source_dir, staging, catalog.resolution, concept_name, catalog.ingest)
        return {
            "params": {"resolution": catalog.resolution, "source": str(concept.images)},
            "metrics": {"images": len(manifest["images"]),
                        "captions": sum(record["caption"] is not None for record in manifest["images"]),
                        "dropped_duplicates": len(manifest["dropped_duplicates"])},
        }

    row = stage("ingest")
    return run_stage(row.name, concept_name, row.folder(catalog, concept_name), row.config_hash(catalog, concept_name),
                     {"source": source_md5(catalog, concept_name)}, produce, force)
