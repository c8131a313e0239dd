"""A corpus of bad input, each kind run through the real CLI: exit 2, a message naming the file and
the field (or the image), no traceback; and the inputs that must stay accepted, exit 0.

Catalog-level kinds go through ``conceptflow validate`` (the checks ``conceptflow run`` and the
flow make before the first stage; a few through ``run`` itself, which refuses before Prefect
starts) or ``conceptflow ingest``; file-level kinds through ``conceptflow ingest`` after a good
ingest, which must survive the refused one byte for byte. Images are tiny; the huge ones are
PNG headers that are never decoded.
"""

from __future__ import annotations

import hashlib
import io
import struct
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conceptflow.cli import app

runner = CliRunner()
RESOLUTION = 64
cuda = pytest.importorskip("torch").cuda.is_available()


# ---------------------------------------------------------------- building blocks

def png_bytes(size=(48, 48), colour=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 128).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height (1-bit grey) with a few bytes of data: never to be decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def base_catalog() -> dict:
    return {
        "project": "corpus",
        "base_model": "embedded:tiny-sd",
        "resolution": RESOLUTION,
        "concepts": {"dog": {"class_word": "dog", "images": "photos/dog"},
                     "cat": {"class_word": "cat", "images": "photos/cat"}},
        "combinations": {"dog+cat": {"concepts": ["dog", "cat"], "prompts": ["a <dog> and a <cat>"], "seeds": [0, 1]}},
        "mask": {"backend": "saliency"},
    }


def make_project(root: Path, catalog: dict | str | bytes | None = None) -> Path:
    for name, colour in (("dog", (200, 30, 30)), ("cat", (30, 30, 200))):
        folder = root / "photos" / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(2):
            (folder / f"{index}.png").write_bytes(png_bytes((72, 64), tuple(c // (index + 1) for c in colour)))
    path = root / "catalog.yaml"
    catalog = base_catalog() if catalog is None else catalog
    if isinstance(catalog, dict):
        path.write_text(yaml.safe_dump(catalog, sort_keys=False, allow_unicode=True), encoding="utf-8")
    elif isinstance(catalog, bytes):
        path.write_bytes(catalog)
    else:
        path.write_text(catalog, encoding="utf-8")
    return path


def changed(**top) -> dict:
    catalog = base_catalog()
    catalog.update(top)
    return catalog


def with_concept(**fields) -> dict:
    catalog = base_catalog()
    catalog["concepts"]["dog"].update(fields)
    return catalog


def with_combination(name="dog+cat", **fields) -> dict:
    catalog = base_catalog()
    spec = {**catalog["combinations"]["dog+cat"], **fields}
    catalog["combinations"] = {name: spec}
    return catalog


def assert_clean_refusal(result, *fragments: str) -> None:
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}\n{result.exception!r}"
    assert "Traceback" not in output and (result.exception is None or isinstance(result.exception, SystemExit)), output
    assert "error:" in output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in: {output}"


def folder_state(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


GOOD = base_catalog()
LONG = " ".join(["red"] * 80)
BORDERLINE = "a <dog> and a <cat> and a <dog> with a <cat> " + " ".join(["big"] * 63)  # 70 + 2x4 concept tokens > 75
DUPLICATE_TOP = yaml.safe_dump(GOOD, sort_keys=False) + "resolution: 32\n"
DUPLICATE_CONCEPT = yaml.safe_dump(GOOD, sort_keys=False).replace(
    "concepts:\n", "concepts:\n  cat:\n    class_word: lion\n    images: photos/cat\n", 1)
DUPLICATE_NESTED = """project: corpus
concepts:
  dog: {class_word: dog, images: photos/dog, train: {method: edlora, steps: 5, steps: 50}}
"""


# ---------------------------------------------------------------- catalog-level kinds
# (id, catalog, command, fragments the message must hold besides the catalog file)
CATALOG_CASES = [
    ("yaml-syntax", "concepts: [\n", "validate", ["not valid YAML"]),
    ("yaml-tab-indent", "concepts:\n\tdog: {}\n", "validate", ["not valid YAML"]),
    ("yaml-list-top", "- a\n- b\n", "validate", ["must hold a mapping"]),
    ("yaml-empty-file", "", "validate", ["must hold a mapping"]),
    ("yaml-not-utf8", b"project: \xff\xfe corpus\n", "validate", ["not UTF-8"]),
    ("yaml-duplicate-top-key", DUPLICATE_TOP, "validate", ["line", "key 'resolution' is written twice"]),
    ("yaml-duplicate-concept", DUPLICATE_CONCEPT, "validate", ["line 1", "key 'cat' is written twice", "first on line"]),
    ("yaml-duplicate-nested-key", DUPLICATE_NESTED, "ingest", ["line 3", "key 'steps' is written twice"]),
    ("yaml-duplicate-via-ingest", DUPLICATE_TOP, "ingest", ["key 'resolution' is written twice"]),
    ("concept-name-uppercase", {**GOOD, "concepts": {"Dog": {"class_word": "dog", "images": "photos/dog"}},
                                "combinations": {}}, "validate", ["concepts.Dog.name", "must match"]),
    ("concept-name-slash", {**GOOD, "concepts": {"a/b": {"class_word": "dog", "images": "photos/dog"}},
                            "combinations": {}}, "ingest", ["concepts.a/b.name", "must match"]),
    ("concept-name-dotdot", {**GOOD, "concepts": {"../x": {"class_word": "dog", "images": "photos/dog"}},
                             "combinations": {}}, "ingest", ["concepts.../x.name"]),
    ("concept-name-too-long", {**GOOD, "concepts": {"d" * 33: {"class_word": "dog", "images": "photos/dog"}},
                               "combinations": {}}, "validate", ["must match"]),
    ("concept-name-unicode", {**GOOD, "concepts": {"hünd": {"class_word": "dog", "images": "photos/dog"}},
                              "combinations": {}}, "validate", ["must match"]),
    ("combination-escapes-data", with_combination("../ESCAPED_combo"), "ingest",
     ["combinations.../ESCAPED_combo", "combination name '../ESCAPED_combo' must match"]),
    ("combination-escapes-data-run", with_combination("../ESCAPED_combo"), "run", ["combination name"]),
    ("combination-name-slash", with_combination("dog/cat"), "validate", ["combination name 'dog/cat'"]),
    ("combination-name-absolute", with_combination("/tmp/x"), "validate", ["combination name '/tmp/x'"]),
    ("combination-name-space", with_combination("dog and cat"), "validate", ["combination name 'dog and cat'"]),
    ("combination-name-at", with_combination("dog@cat"), "validate", ["combination name 'dog@cat'"]),
    ("combination-name-dot", with_combination("."), "validate", ["combination name '.'"]),
    ("combination-name-dotdot", with_combination(".."), "validate", ["combination name '..'"]),
    ("combination-name-backslash", with_combination("dog\\cat"), "validate", ["combination name"]),
    ("combination-names-repeated", {**GOOD, "combinations": [
        {"concepts": ["dog", "cat"], "prompts": ["a <dog>"]},
        {"name": "dog+cat", "concepts": ["cat", "dog"], "prompts": ["a <cat>"]}]}, "validate",
     ["combination names must be unique", "dog+cat"]),
    ("project-name-slash", changed(project="a/b"), "validate", ["project", "project name 'a/b'"]),
    ("project-name-dotdot", changed(project="../x"), "validate", ["project name '../x'"]),
    ("project-name-empty", changed(project=""), "validate", ["project name ''"]),
    ("concept-twice-in-combination", with_combination(concepts=["dog", "dog"], prompts=["a <dog>"]), "validate",
     ["combinations.dog+cat.concepts", "listed more than once"]),
    ("combination-unknown-concept", with_combination(concepts=["dog", "cow"], prompts=["a <dog>"]), "validate",
     ["unknown concepts ['cow']"]),
    ("prompt-references-unlisted", with_combination(prompts=["a <dog> and a <cow>"]), "validate", ["references ['cow']"]),
    ("combination-no-concepts", with_combination(concepts=[]), "validate", ["combinations.dog+cat.concepts"]),
    ("combination-no-prompts", with_combination(prompts=[]), "validate", ["combinations.dog+cat.prompts"]),
    ("seeds-empty", with_combination(seeds=[]), "validate", ["combinations.dog+cat.seeds"]),
    ("seed-negative", with_combination(seeds=[0, -1]), "validate", ["seeds", "-1 is outside 0..4294967295"]),
    ("seed-past-2-32", with_combination(seeds=[2**32]), "validate", ["seeds", "4294967296 is outside"]),
    ("seed-not-int", with_combination(seeds=["abc"]), "validate", ["combinations.dog+cat.seeds.0"]),
    ("seeds-repeated", with_combination(seeds=[3, 3]), "validate", ["seeds [3] are listed more than once"]),
    ("catalog-seed-past-2-32", changed(seed=2**40), "validate", ["seed: seed 1099511627776 is outside"]),
    ("catalog-seed-negative", changed(seed=-5), "validate", ["seed: seed -5 is outside"]),
    ("no-concepts", changed(concepts={}, combinations={}), "validate", ["concepts"]),
    ("concepts-scalar", changed(concepts="dog", combinations={}), "validate", ["concepts"]),
    ("combination-spec-list", changed(combinations={"dog+cat": ["dog", "cat"]}), "validate", ["combinations"]),
    ("unknown-top-field", changed(colour="red"), "validate", ["colour"]),
    ("unknown-concept-field", with_concept(colour="red"), "validate", ["concepts.dog.colour"]),
    ("concept-no-class-word", {**GOOD, "concepts": {"dog": {"images": "photos/dog"}, "cat": GOOD["concepts"]["cat"]}},
     "validate", ["concepts.dog.class_word"]),
    ("unknown-method", with_concept(train={"method": "dreambooth"}), "validate", ["concepts.dog.train", "method"]),
    ("train-steps-string", with_concept(train={"method": "edlora", "steps": "many"}), "validate", ["steps"]),
    ("unknown-sampler", changed(generate={"sampler": "ddim"}), "validate", ["generate.sampler"]),
    ("generate-steps-zero", changed(generate={"steps": 0}), "validate", ["generate.steps"]),
    ("unknown-fuse-method", changed(fuse={"method": "median"}), "validate", ["fuse.method"]),
    ("unknown-mask-backend", changed(mask={"backend": "magic"}), "validate", ["mask.backend"]),
    ("resolution-too-small", changed(resolution=16), "validate", ["resolution"]),
    ("dtype-unknown", changed(dtype="float64"), "validate", ["dtype"]),
    ("ingest-small-images-policy", changed(ingest={"small_images": "upscale"}), "validate", ["ingest.small_images"]),
    ("ingest-max-pixels-past-pil", changed(ingest={"max_pixels": 10**9}), "validate", ["ingest.max_pixels"]),
    ("base-model-folder-missing", changed(base_model="./models/nope"), "validate",
     ["base_model", "does not exist"]),
    ("base-model-not-diffusers", changed(base_model="photos"), "validate", ["base_model", "no model_index.json"]),
    ("base-model-bad-syntax", changed(base_model="not a model!"), "validate", ["base_model", "neither a folder"]),
    ("base-model-unknown-embedded", changed(base_model="embedded:huge-sd"), "validate",
     ["base_model", "not an embedded model", "embedded:tiny-sd"]),
    ("base-model-missing-run", changed(base_model="./models/nope"), "run", ["base_model", "does not exist"]),
    ("clip-model-folder-missing", changed(evaluate={"clip_model": "./clip/nope"}), "validate",
     ["evaluate.clip_model", "does not exist"]),
    ("device-nonsense", changed(device="gpu"), "validate", ["device: 'gpu' is not a torch device string"]),
    ("device-bad-index", changed(device="cuda:x"), "validate", ["device", "not a torch device"]),
    ("device-unsupported-type", changed(device="meta"), "validate", ["device", "meta"]),
    pytest.param("device-cuda-without-gpu", changed(device="cuda"), "validate", ["device", "no CUDA GPU"],
                 marks=pytest.mark.skipif(cuda, reason="this machine has a GPU")),
    pytest.param("device-cuda-without-gpu-run", changed(device="cuda:1"), "run", ["device", "no CUDA GPU"],
                 marks=pytest.mark.skipif(cuda, reason="this machine has a GPU")),
    ("prompt-too-long", with_combination(prompts=[LONG]), "validate",
     ["combinations.dog+cat.prompts.0", "80 tokens", "takes 75", "cut it before 'red' (word 76)"]),
    ("prompt-too-long-after-expansion", with_combination(prompts=[BORDERLINE]), "validate",
     ["combinations.dog+cat.prompts.0", "78 tokens (each <name> as its 2 concept tokens)"]),
    ("toy-evaluators-missing", changed(evaluate={"toy_evaluators": "assets/nope"}), "validate",
     ["evaluate.toy_evaluators", "does not exist"]),
    ("toy-evaluators-incomplete", changed(evaluate={"toy_evaluators": "photos"}), "validate",
     ["evaluate.toy_evaluators", "no recogniser/ or identity/"]),
    ("images-folder-missing", with_concept(images="photos/nope"), "validate", ["concepts.dog.images", "does not exist"]),
    ("several-load-problems", with_combination(concepts=["dog", "dog"], seeds=[], prompts=["a <dog>"]), "validate",
     ["2 problems", "combinations.dog+cat.concepts", "combinations.dog+cat.seeds"]),
    ("several-run-time-problems", changed(base_model="./models/nope", device="gpu",
                                          evaluate={"toy_evaluators": "nope"}), "validate",
     ["3 problems", "  - base_model", "  - device", "  - evaluate.toy_evaluators"]),
]


@pytest.mark.parametrize("kind, catalog, command, fragments", CATALOG_CASES, ids=[
    case.id if hasattr(case, "id") else case[0] for case in CATALOG_CASES])
def test_bad_catalog_is_refused_cleanly(tmp_path, monkeypatch, kind, catalog, command, fragments):
    path = make_project(tmp_path / "project", catalog)
    if command == "run":  # refused before the flow (Prefect) is even imported
        monkeypatch.setitem(sys.modules, "flows.catalog",
                            SimpleNamespace(run_catalog=lambda *args, **kwargs: pytest.fail("the flow started")))
    result = runner.invoke(app, [command, "--catalog", str(path)])
    assert_clean_refusal(result, str(path), *fragments)
    assert not (tmp_path / "project" / "data").exists()  # refused before any stage wrote anything
    escaped = [p for p in tmp_path.rglob("*ESCAPED*")]
    assert not escaped, f"created outside data/: {escaped}"


def test_caption_too_long_for_the_text_encoder(tmp_path):
    path = make_project(tmp_path)
    (tmp_path / "photos" / "dog" / "0.txt").write_text("a <dog> " + " ".join(["red"] * 75))
    result = runner.invoke(app, ["validate", "--catalog", str(path)])
    assert_clean_refusal(result, str(path), "concepts.dog.images: caption", "0.txt", "78 tokens", "shorten the caption")


def test_missing_catalog_file(tmp_path):
    result = runner.invoke(app, ["validate", "--catalog", str(tmp_path / "nope.yaml")])
    assert_clean_refusal(result, "nope.yaml", "not found", "--catalog")


# ---------------------------------------------------------------- file-level kinds (ingest)

def corrupt_jpeg(folder):
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return "broken.jpg"


def truncated_png(folder):
    data = png_bytes((64, 64))
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return "cut.png"


def truncated_jpeg(folder):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, format="JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[:300])
    return "cut.jpg"


def text_as_jpeg(folder):
    (folder / "notes.jpg").write_text("hello, I am text")
    return "notes.jpg"


def zero_bytes(folder):
    (folder / "empty.png").write_bytes(b"")
    return "empty.png"


def png_named_webp_garbage(folder):
    (folder / "fake.webp").write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8 garbage")
    return "fake.webp"


def unknown_suffix(folder):
    (folder / "scan.pdf").write_bytes(b"%PDF-1.4\n")
    return "scan.pdf"


def bomb_30000(folder):
    (folder / "huge.png").write_bytes(png_header(30000, 30000))
    return "huge.png"


def big_12000(folder):
    (folder / "big.png").write_bytes(png_header(12000, 12000))
    return "big.png"


def big_9000x8000(folder):
    (folder / "big.png").write_bytes(png_header(9000, 8000))
    return "big.png"


def one_pixel(folder):
    (folder / "dot.png").write_bytes(png_bytes((1, 1)))
    return "dot.png"


def sixteen_pixels(folder):
    (folder / "small.png").write_bytes(png_bytes((16, 16)))
    return "small.png"


def thin_panorama(folder):
    (folder / "strip.png").write_bytes(png_bytes((400, 8)))
    return "strip.png"


def symlink_image_outside(folder):
    outside = folder.parent.parent / "elsewhere.png"
    outside.write_bytes(png_bytes((64, 64), (1, 2, 3)))
    (folder / "link.png").symlink_to(outside)
    return "link.png"


def symlink_caption_outside(folder):
    outside = folder.parent.parent / "caption.txt"
    outside.write_text("a <dog> on the grass")
    (folder / "0.txt").symlink_to(outside)
    return "0.txt"


def symlink_relative_escape(folder):
    (folder.parent / "cat" / "x.png").write_bytes(png_bytes((64, 64), (9, 9, 9)))
    (folder / "x.png").symlink_to(Path("..") / "cat" / "x.png")
    return "x.png"


def broken_symlink(folder):
    (folder / "gone.png").symlink_to(folder / "nothing-here.png")
    return "gone.png"


def caption_without_reference(folder):
    (folder / "0.txt").write_text("a dog on the grass")
    return "0.txt"


def orphan_caption(folder):
    (folder / "zzz.txt").write_text("a <dog>")
    return "zzz.txt"


def caption_not_utf8(folder):
    (folder / "0.txt").write_bytes(b"a <dog> \xff\xfe")
    return "0.txt"


FILE_CASES = [
    ("corrupt-jpeg", corrupt_jpeg, ["not a readable image"]),
    ("truncated-png", truncated_png, ["not a readable image"]),
    ("truncated-jpeg", truncated_jpeg, ["not a readable image"]),
    ("text-with-jpg-suffix", text_as_jpeg, ["not a readable image"]),
    ("zero-byte-png", zero_bytes, ["not a readable image"]),
    ("garbage-webp", png_named_webp_garbage, ["not a readable image"]),
    ("unknown-suffix", unknown_suffix, ["does not look like an image"]),
    ("decompression-bomb-30000", bomb_30000, ["more than", "limit of 64,000,000", "not decoded"]),
    ("big-12000", big_12000, ["12000x12000 = 144,000,000 pixels", "limit of 64,000,000"]),
    ("big-9000x8000", big_9000x8000, ["9000x8000", "ingest.max_pixels"]),
    ("one-pixel", one_pixel, ["1x1", "below 32 px", "small_images: skip"]),
    ("sixteen-pixels", sixteen_pixels, ["16x16", "below 32 px"]),
    ("thin-panorama", thin_panorama, ["400x8", "below 32 px"]),
    ("symlink-image-outside", symlink_image_outside, ["is a symlink to", "outside the concept folder"]),
    ("symlink-caption-outside", symlink_caption_outside, ["is a symlink to", "outside the concept folder"]),
    ("symlink-relative-escape", symlink_relative_escape, ["outside the concept folder"]),
    ("broken-symlink", broken_symlink, ["broken symlink"]),
    ("caption-without-reference", caption_without_reference, ["does not name the concept: write <dog>"]),
    ("orphan-caption", orphan_caption, ["has no image of the same name"]),
    ("caption-not-utf8", caption_not_utf8, ["not UTF-8"]),
]


@pytest.mark.parametrize("kind, spoil, fragments", FILE_CASES, ids=[case[0] for case in FILE_CASES])
def test_bad_file_is_refused_and_keeps_previous_output(tmp_path, kind, spoil, fragments):
    path = make_project(tmp_path / "project")
    first = runner.invoke(app, ["ingest", "--catalog", str(path), "--concept", "dog"])
    assert first.exit_code == 0, first.output
    output = tmp_path / "project" / "data" / "concepts" / "dog" / "images"
    before = folder_state(output)
    bad = spoil(tmp_path / "project" / "photos" / "dog")
    result = runner.invoke(app, ["ingest", "--catalog", str(path), "--concept", "dog"])
    assert_clean_refusal(result, bad, *fragments)
    assert folder_state(output) == before  # the refused ingest left the previous one as it was


def test_empty_and_missing_folders_are_refused(tmp_path):
    for kind, prepare, fragment in [
        ("empty", lambda folder: None, "holds no images"),
        ("hidden-only", lambda folder: (folder / ".hidden.png").write_bytes(png_bytes()), "holds no images"),
        ("missing", lambda folder: folder.rmdir(), "does not exist"),
        ("a-file", lambda folder: (folder.rmdir(), folder.write_text("x")), "does not exist"),
    ]:
        root = tmp_path / kind
        path = make_project(root)
        folder = root / "photos" / "dog"
        for item in folder.iterdir():
            item.unlink()
        prepare(folder)
        result = runner.invoke(app, ["ingest", "--catalog", str(path), "--concept", "dog"])
        assert_clean_refusal(result, "photos/dog", fragment)


def test_every_image_small_with_skip_is_refused(tmp_path):
    path = make_project(tmp_path, changed(ingest={"small_images": "skip"}))
    for item in (tmp_path / "photos" / "dog").iterdir():
        item.write_bytes(png_bytes((8, 8)))
    result = runner.invoke(app, ["ingest", "--catalog", str(path), "--concept", "dog"])
    assert_clean_refusal(result, "photos/dog", "every image was too small")


def test_corpus_has_at_least_60_kinds():
    kinds = len(CATALOG_CASES) + len(FILE_CASES) + 4 + 1 + 1 + 1  # + folders, skip-all, caption, no catalog
    assert kinds >= 60, kinds


# ---------------------------------------------------------------- what stays accepted

def cmyk_jpeg(folder):
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(folder / "cmyk.jpg")


def sixteen_bit_png(folder):
    Image.fromarray(np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)).save(folder / "deep.png")
    with Image.open(folder / "deep.png") as check:
        assert check.mode.startswith("I")


def palette_png(folder):
    Image.new("RGB", (64, 64), (10, 120, 240)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "pal.png")


def rgba_png(folder):
    Image.new("RGBA", (64, 64), (200, 100, 50, 128)).save(folder / "alpha.png")


def webp_image(folder):
    Image.new("RGB", (64, 64), (5, 250, 5)).save(folder / "leaf.webp")


def upper_case_suffixes(folder):
    Image.new("RGB", (64, 64), (250, 250, 5)).save(folder / "LOUD.JPG", format="JPEG")
    Image.new("RGB", (64, 64), (5, 250, 250)).save(folder / "LOUD2.PNG", format="PNG")


def unicode_names(folder):
    Image.new("RGB", (64, 64), (120, 5, 250)).save(folder / "hünd_ñ_犬_🐕.png")
    (folder / "hünd_ñ_犬_🐕.txt").write_text("a <dog> läuft", encoding="utf-8")


def grey_bmp_tiff(folder):
    Image.new("L", (64, 64), 90).save(folder / "grey.bmp")
    Image.new("RGB", (64, 64), (3, 60, 90)).save(folder / "scan.TIFF")


def one_bit(folder):
    Image.new("1", (64, 64), 1).save(folder / "mono.png")


def symlink_inside(folder):
    (folder / "sub").mkdir()
    Image.new("RGB", (64, 64), (77, 7, 7)).save(folder / "sub" / "real.png")
    (folder / "alias.png").symlink_to(Path("sub") / "real.png")


def exactly_min_size(folder):
    Image.new("RGB", (32, 300), (1, 99, 1)).save(folder / "edge.png")  # shorter side = 0.5 x 64: kept


def os_clutter(folder):
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\0")


def exif_rotated(folder):
    image = Image.new("RGB", (80, 40), (200, 30, 30))
    image.paste((10, 200, 10), (0, 0, 80, 20))  # green top half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise: the green half ends on the right
    image.save(folder / "rotated.jpg", exif=exif)


ACCEPTED_CASES = [cmyk_jpeg, sixteen_bit_png, palette_png, rgba_png, webp_image, upper_case_suffixes, unicode_names,
                  grey_bmp_tiff, one_bit, symlink_inside, exactly_min_size, os_clutter, exif_rotated]


@pytest.mark.parametrize("add", ACCEPTED_CASES, ids=[case.__name__ for case in ACCEPTED_CASES])
def test_accepted_inputs_stay_accepted(tmp_path, add):
    path = make_project(tmp_path)
    folder = tmp_path / "photos" / "dog"
    add(folder)
    result = runner.invoke(app, ["ingest", "--catalog", str(path), "--concept", "dog"])
    assert result.exit_code == 0, result.output
    images = sorted((tmp_path / "data" / "concepts" / "dog" / "images").glob("[0-9][0-9][0-9].png"))
    added = len([p for p in folder.iterdir() if p.suffix.lower() not in {".txt", ".db", ""} and p.is_file()
                 and not p.name.startswith(".")])
    assert len(images) == added
    for image_path in images:
        with Image.open(image_path) as image:
            assert image.size == (RESOLUTION, RESOLUTION) and image.mode == "RGB"
    if add is exif_rotated:
        manifest = yaml.safe_load((images[0].parent / "ingest.json").read_text())
        (record,) = [r for r in manifest["images"] if r["source"].endswith("rotated.jpg")]
        with Image.open(images[0].parent / record["output"]) as rotated:
            left, right = np.asarray(rotated)[32, 3], np.asarray(rotated)[32, 60]
        assert left[0] > 150 and right[1] > 150


def test_small_images_skipped_when_asked(tmp_path):
    path = make_project(tmp_path, changed(ingest={"small_images": "skip"}))
    (tmp_path / "photos" / "dog" / "tiny.png").write_bytes(png_bytes((16, 16)))
    result = runner.invoke(app, ["ingest", "--catalog", str(path), "--concept", "dog"])
    assert result.exit_code == 0, result.output
    manifest = yaml.safe_load((tmp_path / "data" / "concepts" / "dog" / "images" / "ingest.json").read_text())
    assert [(Path(s["source"]).name, s["size"]) for s in manifest["skipped_small"]] == [("tiny.png", [16, 16])]
    assert len(manifest["images"]) == 2


def test_outside_symlinks_followed_when_asked(tmp_path):
    path = make_project(tmp_path, changed(ingest={"outside_symlinks": "follow"}))
    outside = tmp_path / "shared.png"
    outside.write_bytes(png_bytes((64, 64), (4, 5, 6)))
    (tmp_path / "photos" / "dog" / "link.png").symlink_to(outside)
    result = runner.invoke(app, ["ingest", "--catalog", str(path), "--concept", "dog"])
    assert result.exit_code == 0, result.output


def test_good_catalogs_validate(tmp_path):
    root = Path(__file__).resolve().parents[1]
    for catalog in (root / "catalog.yaml", root / "catalogs" / "dreambooth.yaml", make_project(tmp_path)):
        result = runner.invoke(app, ["validate", "--catalog", str(catalog)])
        assert result.exit_code == 0 and "valid" in result.output, result.output


def test_merge_keys_may_override():
    """``<<: *anchor`` then a key of the anchor is YAML's override, not a duplicate."""
    from conceptflow.config import UniqueKeyLoader

    text = "base: &train {method: edlora, steps: 5}\ntrain: {<<: *train, steps: 7}\n"
    assert yaml.load(text, Loader=UniqueKeyLoader)["train"] == {"method": "edlora", "steps": 7}
