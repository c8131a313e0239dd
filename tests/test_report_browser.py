"""The report as a person sees it: data/report/index.html opened in headless Chromium.

A small real project: the default catalog's two toy concepts ingested and masked by the real
stages, a training record and loss curve per concept and a generated folder for the
combination written the way the train and generate stages write them (images.json with the
ConceptFlow-M images, the plain fused images beside them and attention maps; the images are
the concepts' own photos put side by side, so nothing needs a diffusion model), scored by the
real evaluate stage with the toy evaluators and written by the real report stage.

The browser check: a copy of the page gets a script that, on the window's load event (which
waits for every image to decode or fail), writes what it sees into a ``<pre>``; Chromium's
``--dump-dom`` prints the DOM after that, and the test reads it back. Every ``<img>`` must
have decoded (``complete`` and ``naturalWidth > 0``: a broken data URI gives 0) and each
section must hold what it should. Skips only when no Chromium is installed (.ci/run installs
Debian's ``chromium``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH: install Debian's chromium (apt-get install -y chromium; .ci/run does)")
# The flags that work here as root with no network (see the machine notes); --user-data-dir is added per run.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")
DEFAULT = yaml.safe_load((ROOT / "catalog.yaml").read_text())
COMBO = next(iter(DEFAULT["combinations"]))
CONCEPTS = DEFAULT["combinations"][COMBO]["concepts"]
SAMPLER = "conceptflow_m"

# Runs in the page after every image has loaded or failed; its JSON is what the test reads.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const figures = (root, kind) => [...root.querySelectorAll("figure." + kind)].map(f => f.dataset.concept || "");
  const result = {
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                           height: i.naturalHeight, scheme: i.src.slice(0, 22)})),
    concepts: [...document.querySelectorAll("section.concept")].map(s => ({
      name: s.dataset.concept, photos: figures(s, "photo").length, masks: figures(s, "mask").length,
      curves: figures(s, "curve").length})),
    combinations: [...document.querySelectorAll("section.combination")].map(s => ({
      name: s.dataset.combination,
      samples: [...s.querySelectorAll("div.sample")].map(d => ({
        prompt: d.dataset.prompt, seed: d.dataset.seed,
        caption: (d.querySelector(".prompt") || {}).textContent || "",
        generated: figures(d, "generated").length, plain: figures(d, "plain").length,
        attention: figures(d, "attention")})),
      samplers: [...s.querySelectorAll("table.samplers tr[data-sampler]")].map(r => ({
        sampler: r.dataset.sampler,
        scores: Object.fromEntries([...r.querySelectorAll("td[data-metric]")].map(
          c => [c.dataset.metric, parseFloat(c.textContent)]))})),
      scores: s.querySelectorAll("table.scores tr").length})),
  };
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments],
                          capture_output=True, text=True, timeout=120)


def browser_view(page: Path, work: Path) -> dict:
    """What Chromium sees in ``page``: CHECK_SCRIPT's result, read from the dumped DOM."""
    checked = work / f"checked-{page.name}"
    text = page.read_text()
    assert text.count("</body>") == 1, "the report should end with one </body>"
    checked.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"))
    result = chromium("--dump-dom", checked.resolve().as_uri(), profile=work / "profile")
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', result.stdout, re.S)
    assert found, (f"Chromium's DOM has no check result (exit {result.returncode}); "
                   f"stderr tail:\n{result.stderr[-2000:]}")
    import html

    return json.loads(html.unescape(found.group(1)))


def _side_by_side(photos: list[Path], size: int) -> Image.Image:
    canvas = Image.new("RGB", (size, size), (200, 190, 150))
    for index, photo in enumerate(photos):
        with Image.open(photo) as opened:
            tile = opened.convert("RGB").resize((size // 2, size // 2))
        canvas.paste(tile, ((size // 2) * index, size // 4))
    return canvas


def _blob(size: int, centre_x: float) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] / size
    return np.exp(-((xs - centre_x) ** 2 + (ys - 0.5) ** 2) / 0.02)


def _write_training(catalog, name: str) -> None:
    """A concept's training output as the train stage leaves it, minus the adapter tensors."""
    from conceptflow.plots import save_curve
    from conceptflow.stages.base import run_stage
    from conceptflow.stages.table import stage

    history = [{"step": step, "loss": 0.5 / (1 + step), "loss_mask": 0.3 / (1 + step)} for step in range(1, 7)]

    def produce(staging):
        save_curve(history, staging / "loss.png", f"{name} ({catalog.concept(name).train.method})")
        return {"params": {"method": catalog.concept(name).train.method},
                "metrics": {k: v for k, v in history[-1].items() if k != "step"}, "history": history}

    row = stage("train")
    run_stage(row.name, name, row.folder(catalog, name), "report-browser-test", {}, produce, force=True)


def _write_generated(catalog, combination_name: str) -> None:
    """The combination's generated folder as the generate stage writes it for ConceptFlow-M:
    images, plain/ (the plain fused images of the same prompts and seeds), attention/, images.json."""
    from conceptflow.data.ingest import ingested_images
    from conceptflow.fileio import write_json_atomic
    from conceptflow.layout import Layout
    from conceptflow.plots import save_heatmap
    from conceptflow.stages.base import run_stage
    from conceptflow.stages.table import stage

    layout, combination = Layout(catalog), catalog.combination(combination_name)
    photos = {name: ingested_images(layout.images(name)) for name in combination.concepts}
    size = catalog.resolution

    def produce(staging):
        (staging / "plain").mkdir()
        records = []
        for index, (prompt, seed) in enumerate((p, s) for p in combination.prompts for s in combination.seeds):
            record = {"file": f"{index:03d}.png", "prompt": prompt, "seed": seed,
                      "plain_file": f"plain/{index:03d}.png", "attention": {}}
            chosen = [photos[name][(index + seed) % len(photos[name])] for name in combination.concepts]
            _side_by_side(chosen, size).save(staging / record["file"])
            _side_by_side(chosen[:1], size).save(staging / record["plain_file"])  # the plain image omits one concept
            for position, name in enumerate(combination.concepts):
                record["attention"][name] = f"attention/{index:03d}_{name}.png"
                save_heatmap(_blob(16, 0.25 + 0.5 * position), staging / record["attention"][name], size)
            records.append(record)
        write_json_atomic(staging / "images.json", {"sampler": SAMPLER, "images": records})
        return {"params": {"sampler": SAMPLER}, "metrics": {"images": float(len(records))}}

    row = stage("generate")
    run_stage(row.name, combination_name, row.folder(catalog, combination_name), "report-browser-test", {}, produce,
              force=True)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory, one_torch_thread) -> Path:
    from conceptflow.config import load_catalog
    from conceptflow.stages.evaluate import evaluate
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.report import report

    project = tmp_path_factory.mktemp("report-project")
    raw = {key: DEFAULT[key] for key in ("project", "base_model", "resolution", "seed", "mask", "generate", "evaluate")}
    raw["base_model"] = str(ROOT / DEFAULT["base_model"])
    raw["evaluate"] = {**DEFAULT["evaluate"], "toy_evaluators": str(ROOT / DEFAULT["evaluate"]["toy_evaluators"]),
                       "attention_entropy": False}  # the generated images are written here, no fused model
    raw["concepts"] = {name: {**DEFAULT["concepts"][name], "images": str(ROOT / DEFAULT["concepts"][name]["images"])}
                       for name in CONCEPTS}
    raw["combinations"] = {COMBO: DEFAULT["combinations"][COMBO]}
    (project / "catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    catalog = load_catalog(project / "catalog.yaml")
    for name in CONCEPTS:
        ingest(catalog, name)
        mask(catalog, name)
        _write_training(catalog, name)
    _write_generated(catalog, COMBO)
    evaluate(catalog, COMBO)
    report(catalog)
    return project / "data" / "report" / "index.html"


@needs_chromium
def test_every_image_loads_and_every_section_is_there(report_page, tmp_path):
    view = browser_view(report_page, tmp_path)
    photos = {name: len(list((report_page.parents[1] / "concepts" / name / "images").glob("*.png"))) for name in CONCEPTS}
    prompts = DEFAULT["combinations"][COMBO]["prompts"]
    seeds = DEFAULT["combinations"][COMBO]["seeds"]

    broken = [image for image in view["images"] if not (image["complete"] and image["width"] > 0 and image["height"] > 0)]
    assert not broken, f"images that did not load in Chromium: {broken}"
    assert {image["scheme"] for image in view["images"]} == {"data:image/png;base64,"}
    per_sample = 1 + 1 + len(CONCEPTS)  # the sampler's image, the plain one, an attention map per concept
    assert len(view["images"]) == sum(2 * n + 1 for n in photos.values()) + len(prompts) * len(seeds) * per_sample

    assert [concept["name"] for concept in view["concepts"]] == CONCEPTS
    for concept in view["concepts"]:
        assert concept == {"name": concept["name"], "photos": photos[concept["name"]],
                           "masks": photos[concept["name"]], "curves": 1}

    (combination,) = view["combinations"]
    assert combination["name"] == COMBO
    assert [(s["prompt"], s["seed"]) for s in combination["samples"]] == [(p, str(s)) for p in prompts for s in seeds]
    for sample in combination["samples"]:
        assert sample["caption"] == f"{sample['prompt']} (seed {sample['seed']})"
        assert (sample["generated"], sample["plain"]) == (1, 1)
        assert sample["attention"] == CONCEPTS  # in the combination's order
    assert combination["scores"] > 10

    metrics = json.loads((report_page.parents[1] / "metrics" / COMBO / "metrics.json").read_text())
    samplers = {row["sampler"]: row["scores"] for row in combination["samplers"]}
    assert list(samplers) == [SAMPLER, "plain fused"]
    for key in ("dino", "clip_t", "clip_i"):  # identity and prompt alignment, both arms
        assert samplers[SAMPLER][key] == pytest.approx(metrics["overall"][key], abs=1e-4)
        assert samplers["plain fused"][key] == pytest.approx(metrics["plain"][key], abs=1e-4)


@needs_chromium
def test_a_broken_data_uri_fails_the_check(report_page, tmp_path):
    page = report_page.read_text()
    first = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    corrupted = tmp_path / "corrupted.html"
    corrupted.write_text(page[:first] + "AAAA" + page[first + 4:])  # the PNG signature overwritten
    images = browser_view(corrupted, tmp_path)["images"]
    assert [image["width"] for image in images].count(0) == 1 and images[0]["width"] == 0


@needs_chromium
def test_screenshot_of_the_report(report_page, tmp_path):
    shot = tmp_path / "report.png"
    result = chromium("--window-size=1280,2400", f"--screenshot={shot}", report_page.resolve().as_uri(),
                      profile=tmp_path / "profile")
    assert shot.is_file(), f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").resize((64, 120)).getcolors(64 * 120)
    assert colours is not None and len(colours) > 50, "the screenshot is (nearly) blank"


def test_sampler_table_needs_two_scored_samplers():
    from conceptflow.report import sampler_scores, sampler_table

    better = {"dino": True, "kid": False}
    listing = {"sampler": SAMPLER, "images": [{"file": "000.png", "plain_file": "plain/000.png"}]}
    metrics = {"overall": {"dino": 0.8, "kid": 0.2, "kid_std": 0.01}, "plain": {"dino": 0.6, "kid": 0.1},
               "higher_is_better": better}
    table = sampler_table(sampler_scores(listing, metrics), better)
    assert table.count("<tr data-sampler=") == 2
    assert "<td class=best data-metric='dino'>0.8000</td>" in table  # higher is better
    assert "<td class=best data-metric='kid'>0.1000</td>" in table  # lower is better
    assert "0.2000 ± 0.0100" in table
    assert sampler_table(sampler_scores(listing, {"overall": metrics["overall"]}), better) == ""
    plain_only = {"sampler": "fused", "images": [{"file": "000.png"}]}
    assert sampler_table(sampler_scores(plain_only, metrics), better) == ""
