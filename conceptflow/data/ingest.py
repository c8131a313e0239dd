"""Ingest: validate, normalise and de-duplicate one concept's photos.

Every file in the concept's folder must decode as an image; each is EXIF-rotated, converted
to RGB, centre-cropped to a square and resized to the training resolution, and written as
PNG with a manifest of where it came from. An image may have a caption beside it (``dog3.jpg``
and ``dog3.txt``, as kohya and Mix-of-Show datasets do) that names the concept as ``<name>``;
it is checked and written next to the normalised image (``000.txt``). Byte-identical and
pixel-identical duplicates are dropped (and listed). All files are checked before anything is written, and the output folder
is swapped in atomically, so a bad file stops the concept without touching what was ingested
before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from conceptflow.errors import DataError
from conceptflow.fileio import atomic_directory, file_md5, write_json_atomic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"
IGNORED_NAMES = {".DS_Store", "Thumbs.db"}


@dataclass(frozen=True)
class IngestedImage:
    source: str
    source_md5: str
    output: str
    original_size: tuple[int, int]
    caption: str | None = None


def load_normalised_image(path: Path, resolution: int) -> Image.Image:
    """Decode ``path``, apply EXIF orientation, convert to RGB, centre-crop and resize."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"{path} is not a readable image ({error.__class__.__name__}: {error}). "
            "Replace it with a valid JPEG/PNG or remove it from the concept folder, then run ingest again."
        ) from error
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS)


def list_concept_files(images_dir: Path) -> list[Path]:
    if not images_dir.is_dir():
        raise DataError(f"concept image folder {images_dir} does not exist: fix 'images:' in the catalog")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.name not in IGNORED_NAMES
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"{images_dir} holds no images: add 3-5 photos of the concept")
    return files


def read_caption(path: Path, concept_name: str) -> str:
    """The caption in ``path``: one line that references the concept as ``<concept_name>``."""
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except UnicodeDecodeError as error:
        raise DataError(f"caption {path} is not UTF-8 text ({error}); save it as UTF-8 and run ingest again.") from error
    if f"<{concept_name}>" not in text:
        raise DataError(
            f"caption {path} does not name the concept: write <{concept_name}> where the concept appears, "
            f"e.g. 'a <{concept_name}> on the beach' (got {text!r}), then run ingest again."
        )
    return text


def ingest_concept(images_dir: Path, output_dir: Path, resolution: int, concept_name: str | None = None) -> dict:
    """Normalise the images of ``images_dir`` (and the captions beside them, which need
    ``concept_name``) into ``output_dir``; return the manifest dict."""
    files = list_concept_files(images_dir)
    caption_files = {path.stem: path for path in files if path.suffix.lower() == CAPTION_SUFFIX}
    files = [path for path in files if path.suffix.lower() != CAPTION_SUFFIX]
    orphans = sorted(set(caption_files) - {path.stem for path in files})
    if orphans:
        raise DataError(f"caption {caption_files[orphans[0]]} has no image of the same name beside it: "
                        "rename it after its image or remove it, then run ingest again.")
    if caption_files and concept_name is None:
        raise DataError(f"{images_dir} holds captions but no concept name was given to check them against")
    decoded, dropped, seen_bytes, seen_pixels = [], [], {}, {}
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"{path} does not look like an image (suffix {path.suffix!r}). Remove it from the concept "
                f"folder or convert it to one of {sorted(IMAGE_SUFFIXES)}."
            )
        source_md5 = file_md5(path)
        image = load_normalised_image(path, resolution)
        pixel_hash = hashlib.md5(image.tobytes()).hexdigest()
        duplicate_of = seen_bytes.get(source_md5) or seen_pixels.get(pixel_hash)
        if duplicate_of:
            dropped.append({"source": str(path), "duplicate_of": duplicate_of})
            continue
        seen_bytes[source_md5] = seen_pixels[pixel_hash] = str(path)
        caption_file = caption_files.get(path.stem)
        decoded.append((path, source_md5, image, read_caption(caption_file, concept_name) if caption_file else None))

    records = []
    with atomic_directory(output_dir) as staging:
        for index, (path, source_md5, image, caption) in enumerate(decoded):
            name = f"{index:03d}.png"
            image.save(staging / name, format="PNG", optimize=False)
            if caption is not None:
                (staging / name).with_suffix(CAPTION_SUFFIX).write_text(caption + "\n", encoding="utf-8")
            records.append(IngestedImage(str(path), source_md5, name, image.size, caption).__dict__)
        manifest = {"resolution": resolution, "images": records, "dropped_duplicates": dropped}
        write_json_atomic(staging / "ingest.json", manifest)
    return manifest


def ingested_images(images_dir: Path) -> list[Path]:
    """The normalised PNGs an ingest wrote, in order."""
    paths = sorted(images_dir.glob("[0-9][0-9][0-9].png"))
    if not paths:
        raise DataError(f"no ingested images in {images_dir}: run `conceptflow ingest` first")
    return paths


def ingested_captions(image_paths: list[Path]) -> list[str | None]:
    """The caption beside each of ``image_paths`` (from ``ingested_images``), ``None`` where there is none."""
    caption_paths = [path.with_suffix(CAPTION_SUFFIX) for path in image_paths]
    return [path.read_text(encoding="utf-8").strip() if path.is_file() else None for path in caption_paths]
