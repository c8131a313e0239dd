"""Ingest: decode check, EXIF orientation, RGB, square resize, duplicates, safe failure."""

import numpy as np
import pytest
from PIL import Image

from conceptflow.data.ingest import ingest_concept, ingested_captions, ingested_images
from conceptflow.errors import DataError


def photo(path, size=(80, 40), colour=(200, 30, 30), mode="RGB", exif_orientation=None):
    image = Image.new(mode, size, colour if mode == "RGB" else 128)
    image.paste((10, 200, 10) if mode == "RGB" else 20, (0, 0, size[0], size[1] // 2))  # green top half
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(path, **kwargs)
    return path


def test_normalises_and_drops_duplicates(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    photo(source / "a.jpg")
    photo(source / "b.png", mode="L")
    (source / "c.jpg").write_bytes((source / "a.jpg").read_bytes())  # byte-identical copy
    photo(source / "d.jpg", exif_orientation=6)  # rotated 90° by EXIF
    manifest = ingest_concept(source, tmp_path / "out", resolution=32)
    outputs = ingested_images(tmp_path / "out")
    assert len(outputs) == 3
    assert [d["duplicate_of"].endswith("a.jpg") for d in manifest["dropped_duplicates"]] == [True]
    for path in outputs:
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    # EXIF orientation 6 (rotate 90° clockwise): the green top half ends on the right.
    with Image.open(outputs[2]) as rotated:
        left, right = np.asarray(rotated)[16, 2], np.asarray(rotated)[16, 29]
    assert left[0] > 150 and right[1] > 150


def test_corrupt_file_names_file_and_keeps_previous_output(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    photo(source / "a.jpg")
    ingest_concept(source, tmp_path / "out", resolution=32)
    before = (tmp_path / "out" / "000.png").read_bytes()
    (source / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError) as error:
        ingest_concept(source, tmp_path / "out", resolution=32)
    assert "broken.jpg" in str(error.value) and "remove it" in str(error.value)
    assert (tmp_path / "out" / "000.png").read_bytes() == before


def test_non_image_file_and_empty_folder(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ingest_concept(source, tmp_path / "out", 32)
    (source / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        ingest_concept(source, tmp_path / "out", 32)
    with pytest.raises(DataError, match="does not exist"):
        ingest_concept(tmp_path / "missing", tmp_path / "out", 32)


def test_captions_beside_images_are_checked_and_kept_in_order(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    photo(source / "a.jpg")
    photo(source / "b.jpg", colour=(30, 30, 200))
    (source / "b.txt").write_text("a <mug> on a  wooden\ntable\n")
    manifest = ingest_concept(source, tmp_path / "out", 32, "mug")
    assert [record["caption"] for record in manifest["images"]] == [None, "a <mug> on a wooden table"]
    assert ingested_captions(ingested_images(tmp_path / "out")) == [None, "a <mug> on a wooden table"]


def test_bad_captions_name_the_file_and_keep_previous_output(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    photo(source / "a.jpg")
    ingest_concept(source, tmp_path / "out", 32, "mug")
    (source / "a.txt").write_text("a mug on a table")  # the concept is not referenced as <mug>
    with pytest.raises(DataError, match=r"a\.txt does not name the concept: write <mug>"):
        ingest_concept(source, tmp_path / "out", 32, "mug")
    (source / "a.txt").unlink()
    (source / "z.txt").write_text("a <mug>")  # no z.jpg beside it
    with pytest.raises(DataError, match=r"z\.txt has no image of the same name"):
        ingest_concept(source, tmp_path / "out", 32, "mug")
    assert ingested_captions(ingested_images(tmp_path / "out")) == [None]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming width x height (1-bit), with no real image data behind it."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(30000, 30000), (12000, 12000)])
def test_too_many_pixels_refused_before_decoding(tmp_path, monkeypatch, size):
    from PIL import ImageFile

    source = tmp_path / "src"
    source.mkdir()
    (source / "huge.png").write_bytes(png_claiming(*size))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(DataError, match=r"huge\.png has .* pixels, more than the limit of 64,000,000"):
        ingest_concept(source, tmp_path / "out", 32)


def test_small_images_refused_or_skipped(tmp_path):
    from conceptflow.config import IngestConfig

    source = tmp_path / "src"
    source.mkdir()
    photo(source / "a.png", size=(64, 64))
    photo(source / "b.png", size=(40, 15))  # shorter side 15 < 0.5 x 32
    with pytest.raises(DataError, match=r"b\.png is 40x15: its shorter side is below 16 px"):
        ingest_concept(source, tmp_path / "out", 32)
    assert not (tmp_path / "out").exists()
    manifest = ingest_concept(source, tmp_path / "out", 32, settings=IngestConfig(small_images="skip"))
    assert len(manifest["images"]) == 1 and manifest["skipped_small"][0]["size"] == [40, 15]


def test_symlinks_outside_the_folder_refused_inside_read(tmp_path):
    from conceptflow.config import IngestConfig

    source = tmp_path / "src"
    source.mkdir()
    photo(source / "a.png", size=(64, 64))
    (source / "alias.png").symlink_to("a.png")  # inside: read (and dropped as a duplicate)
    assert len(ingest_concept(source, tmp_path / "out", 32)["dropped_duplicates"]) == 1
    photo(tmp_path / "elsewhere.png", size=(64, 64), colour=(1, 2, 3))
    (source / "b.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(DataError, match=r"b\.png is a symlink to .*elsewhere\.png, outside the concept folder"):
        ingest_concept(source, tmp_path / "out", 32)
    followed = ingest_concept(source, tmp_path / "out", 32, settings=IngestConfig(outside_symlinks="follow"))
    assert len(followed["images"]) == 2
    (source / "b.png").unlink()
    (source / "c.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(DataError, match=r"c\.png is a broken symlink"):
        ingest_concept(source, tmp_path / "out", 32)
