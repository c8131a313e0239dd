"""Masks given with the photos: the toy world's ground truth, or masks a user drew.

``mask.backend: ground_truth`` reads each concept's masks from its ``masks:`` folder (for a
group's concept, ``<group masks>/<concept>/``): one grey-scale image per photo, named as the
photo (any image suffix), white where the concept is. It is the backend for group photos in the
toy world, where the saliency fallback cannot tell two concepts apart and GroundingDINO has no
weights. A mask goes through the same EXIF orientation, centre crop and resize as its photo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from conceptflow.errors import DataError
from conceptflow.fileio import file_md5

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _source_mask(masks_dir: Path, source: Path) -> Path:
    for suffix in MASK_SUFFIXES:
        for candidate in (masks_dir / f"{source.stem}{suffix}", masks_dir / f"{source.stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise DataError(f"no mask for photo {source.name} in {masks_dir}: add {masks_dir / (source.stem + '.png')} "
                    "(white where the concept is), or use another mask.backend")


def ground_truth_masks(images_dir: Path, masks_dir: Path, resolution: int) -> dict[str, np.ndarray]:
    """{ingested image name: float32 mask in [0, 1] at the ingested size} for every ingested photo,
    read from ``masks_dir`` through ingest.json's record of each photo's source file."""
    if not masks_dir.is_dir():
        raise DataError(f"mask.backend ground_truth: masks folder {masks_dir} not found: give the concept (or its "
                        "group) a `masks:` folder holding one mask per photo, named as the photo")
    records = json.loads((images_dir / "ingest.json").read_text(encoding="utf-8"))["images"]
    masks = {}
    for record in records:
        path = _source_mask(masks_dir, Path(record["source"]))
        with Image.open(path) as opened:
            mask = ImageOps.exif_transpose(opened).convert("L")
        mask = ImageOps.fit(mask, (resolution, resolution), method=Image.Resampling.BILINEAR)
        masks[record["output"]] = np.asarray(mask, dtype=np.float32) / 255.0
    return masks


def masks_folder_md5(masks_dir: Path) -> str:
    """One md5 over the folder's mask files (names and contents), for the mask stage's cache key."""
    from hashlib import md5

    digest = md5()
    if masks_dir.is_dir():
        for path in sorted(p for p in masks_dir.iterdir() if p.suffix.lower() in MASK_SUFFIXES):
            digest.update(f"{path.name}\0{file_md5(path)}\n".encode())
    return digest.hexdigest()
