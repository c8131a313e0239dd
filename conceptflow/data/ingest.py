"""Ingest: validate, normalise and de-duplicate one concept's photos.

Every file in the concept's folder must decode as an image; each is EXIF-rotated, converted
to RGB, centre-cropped to a square and resized to the training resolution, and written as
PNG with a manifest of where it came from. An image may have a caption beside it (``dog3.jpg``
and ``dog3.txt``, as kohya and Mix-of-Show datasets do) that names the concept as ``<name>``;
it is checked and written next to the normalised image (``000.txt``). Byte-identical and
pixel-identical duplicates are dropped (and listed). All files are checked before anything is written, and the output folder
is swapped in atomically, so a bad file stops the concept without touching what was ingested
before.

What is refused (the catalog's ``ingest:`` settings, ``conceptflow.config.IngestConfig``):
- an image with more than ``max_pixels`` pixels (default 64,000,000), read from the file's
  header before anything is decoded (PIL's ``Image.open`` is lazy); files past PIL's own
  decompression-bomb limit get the same message;
- a small image, whose shorter side is below ``min_side_fraction`` x the training resolution
  (default 0.5: under 32 px at 64, under 256 px at 512), as it would be upscaled more than 2x;
  ``small_images: skip`` leaves such images out instead (logged, listed in ingest.json);
- a file of the folder that is a symlink to a file outside the folder (resolved), unless
  ``outside_symlinks: follow``; symlinks to files within the folder are read as usual; a
  broken symlink is refused.
Accepted and normalised: any mode PIL converts to RGB (CMYK, 16-bit, palette, RGBA, L),
EXIF orientation applied, suffixes in any case, any file name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from conceptflow.config import IngestConfig
from conceptflow.errors import DataError
from conceptflow.fileio import atomic_directory, file_md5, write_json_atomic

LOG = logging.getLogger(__name__)

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


class SmallImageError(DataError):
    """An image below the minimum size (``IngestConfig.min_side_fraction`` x resolution); ``size`` its (w, h)."""

    def __init__(self, message: str, size: tuple[int, int]):
        super().__init__(message)
        self.size = size


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(
        f"{path} is not a readable image ({error.__class__.__name__}: {error}). "
        "Replace it with a valid JPEG/PNG or remove it from the concept folder, then run ingest again."
    )


def _too_large(path: Path, pixels: str, max_pixels: int) -> DataError:
    return DataError(f"{path} has {pixels} pixels, more than the limit of {max_pixels:,} (ingest.max_pixels); "
                     "it is not decoded. Downscale it (the training resolution is far smaller) or remove it, "
                     "then run ingest again.")


def load_normalised_image(path: Path, resolution: int, settings: IngestConfig | None = None) -> Image.Image:
    """Decode ``path``, apply EXIF orientation, convert to RGB, centre-crop and resize.

    The size is checked from the header first: too many pixels is a ``DataError``, a shorter
    side below ``min_side_fraction * resolution`` a ``SmallImageError``; neither is decoded.
    """
    settings = settings or IngestConfig()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            opened = Image.open(path)
    except Image.DecompressionBombError as error:  # PIL refuses past 2 x Image.MAX_IMAGE_PIXELS
        raise _too_large(path, f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,}", settings.max_pixels) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise _unreadable(path, error) from error
    with opened:
        width, height = opened.size
        if width * height > settings.max_pixels:
            raise _too_large(path, f"{width}x{height} = {width * height:,}", settings.max_pixels)
        smallest = settings.min_side_fraction * resolution
        if min(width, height) < smallest:
            raise SmallImageError(
                f"{path} is {width}x{height}: its shorter side is below {smallest:g} px (ingest.min_side_fraction "
                f"{settings.min_side_fraction:g} x resolution {resolution}) and would be upscaled more than "
                f"{1 / settings.min_side_fraction:g}x. Use a larger photo, remove it, or set "
                "`ingest: {small_images: skip}` to leave such images out.", (width, height))
        try:
            opened.load()
            image = ImageOps.exif_transpose(opened).convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise _unreadable(path, error) from error
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS)


def _checked_symlink(path: Path, folder: Path, outside_symlinks: str) -> None:
    target = os.readlink(path)
    if not path.exists():
        raise DataError(f"{path} is a broken symlink (to {target}): fix or remove it, then run ingest again.")
    if outside_symlinks == "refuse" and not path.resolve().is_relative_to(folder):
        raise DataError(
            f"{path} is a symlink to {path.resolve()}, outside the concept folder {folder}: copy the file into the "
            "folder (or set `ingest: {outside_symlinks: follow}` to read such links), then run ingest again.")


def list_concept_files(images_dir: Path, outside_symlinks: str = "refuse") -> list[Path]:
    """The concept folder's files (images and captions), sorted; hidden files, .DS_Store/Thumbs.db
    and subfolders are left out. Symlinks: see the module docstring (``outside_symlinks``)."""
    if not images_dir.is_dir():
        raise DataError(f"concept image folder {images_dir} does not exist: fix 'images:' in the catalog")
    folder = images_dir.resolve()
    files = []
    for path in sorted(images_dir.iterdir()):
        if path.name in IGNORED_NAMES or path.name.startswith("."):
            continue
        if path.is_symlink():
            _checked_symlink(path, folder, outside_symlinks)
        if path.is_file():
            if not os.access(path, os.R_OK):
                raise DataError(f"{path} cannot be read (permission denied): make it readable (chmod a+r) or remove "
                                "it, then run ingest again.")
            files.append(path)
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


def ingest_concept(images_dir: Path, output_dir: Path, resolution: int, concept_name: str | None = None,
                   settings: IngestConfig | None = None) -> dict:
    """Normalise the images of ``images_dir`` (and the captions beside them, which need
    ``concept_name``) into ``output_dir``; return the manifest dict. ``settings``: the
    catalog's ``ingest:`` (limits, small images, symlinks; default ``IngestConfig()``)."""
    settings = settings or IngestConfig()
    files = list_concept_files(images_dir, settings.outside_symlinks)
    caption_files = {path.stem: path for path in files if path.suffix.lower() == CAPTION_SUFFIX}
    files = [path for path in files if path.suffix.lower() != CAPTION_SUFFIX]
    orphans = sorted(set(caption_files) - {path.stem for path in files})
    if orphans:
        raise DataError(f"caption {caption_files[orphans[0]]} has no image of the same name beside it: "
                        "rename it after its image or remove it, then run ingest again.")
    if caption_files and concept_name is None:
        raise DataError(f"{images_dir} holds captions but no concept name was given to check them against")
    decoded, dropped, skipped, seen_bytes, seen_pixels = [], [], [], {}, {}
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"{path} does not look like an image (suffix {path.suffix!r}). Remove it from the concept "
                f"folder or convert it to one of {sorted(IMAGE_SUFFIXES)}."
            )
        source_md5 = file_md5(path)
        try:
            image = load_normalised_image(path, resolution, settings)
        except SmallImageError as error:
            if settings.small_images == "refuse":
                raise
            LOG.warning("skipped %s", error)
            skipped.append({"source": str(path), "size": list(error.size)})
            continue
        pixel_hash = hashlib.md5(image.tobytes()).hexdigest()
        duplicate_of = seen_bytes.get(source_md5) or seen_pixels.get(pixel_hash)
        if duplicate_of:
            dropped.append({"source": str(path), "duplicate_of": duplicate_of})
            continue
        seen_bytes[source_md5] = seen_pixels[pixel_hash] = str(path)
        caption_file = caption_files.get(path.stem)
        decoded.append((path, source_md5, image, read_caption(caption_file, concept_name) if caption_file else None))

    if not decoded:
        raise DataError(f"{images_dir}: every image was too small and skipped (ingest.small_images: skip): add "
                        "larger photos of the concept")
    records = []
    with atomic_directory(output_dir) as staging:
        for index, (path, source_md5, image, caption) in enumerate(decoded):
            name = f"{index:03d}.png"
            image.save(staging / name, format="PNG", optimize=False)
            if caption is not None:
                (staging / name).with_suffix(CAPTION_SUFFIX).write_text(caption + "\n", encoding="utf-8")
            records.append(IngestedImage(str(path), source_md5, name, image.size, caption).__dict__)
        manifest = {"resolution": resolution, "images": records, "dropped_duplicates": dropped}
        if skipped:  # only then: an ingest without skips keeps the bytes it always had
            manifest["skipped_small"] = skipped
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
