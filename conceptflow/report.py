"""One self-contained HTML page of a catalog run: what went in and what came out.

Per concept: the ingested photos with their masks and the training curve; per combination:
the generated images with prompts and seeds (beside them the plain fused images of the same
prompts and seeds, and the cross-attention maps, when the sampler saved them), a table with a
row per sampler when more than one sampler's images were scored (the sampler's and the plain
fused comparison today), and all evaluation scores. Images are embedded as data URIs so the
page can be mailed or logged to MLflow as a single file.

The page is marked up for checking as well as reading (tests/test_report_browser.py opens it
in headless Chromium): each concept is a ``<section class="concept" data-concept=NAME>``, each
combination a ``<section class="combination" data-combination=NAME>``; figures carry their
kind as a class (``photo``, ``mask``, ``curve``, ``generated``, ``plain``, ``attention``),
each generated prompt/seed is a ``<div class="sample">``, the sampler table is
``<table class="samplers">`` (a ``<tr data-sampler=NAME>`` per sampler) and the full scores
``<table class="scores">``.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

from conceptflow.config import Catalog
from conceptflow.fileio import write_text_atomic
from conceptflow.layout import Layout

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:16px 0 6px}
.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;text-align:center;font-size:11px;color:#555;max-width:180px}
figure img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc;display:block;margin:auto}
figure.curve{max-width:none}figure.curve img{width:auto;height:auto;max-width:420px;border:none;image-rendering:auto}
table{border-collapse:collapse;font-size:12px;margin:4px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
td.best{font-weight:bold;background:#eef6ee}
.meta{font-size:12px;color:#666}
"""

# Column headers for the metric keys evaluate writes (conceptflow.metrics.evaluate), in table order;
# keys not named here follow in the order metrics.json lists them, under their own names.
METRIC_LABELS = {
    "dino": "identity",
    "clip_t": "prompt alignment",
    "omission_rate": "omission",
    "redundancy_rate": "redundancy",
    "segsim": "SegSim",
    "clip_i": "image similarity",
    "kid": "KID",
    "lpips_diversity": "diversity",
}
PLAIN_LABEL = "plain fused"  # the SamplingResult.plain_images beside a sampler's own (images.json "plain_file")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def figure(path: Path, caption: str, kind: str, **data: str) -> str:
    """A captioned image; ``kind`` is the figure's class, ``data`` its ``data-*`` attributes."""
    attributes = "".join(f' data-{key}="{html.escape(value)}"' for key, value in data.items())
    return (f'<figure class="{kind}"{attributes}><img src="{data_uri(path)}" alt="{html.escape(caption)}">'
            f'<figcaption>{html.escape(caption)}</figcaption></figure>')


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def concept_section(layout: Layout, catalog: Catalog, name: str) -> str:
    concept = catalog.concept(name)
    parts = [f"<section class='concept' data-concept='{html.escape(name)}'>",
             f"<h2>Concept &lt;{html.escape(name)}&gt; <span class='meta'>class: {html.escape(concept.class_word)}, "
             f"method: {html.escape(concept.train.method)}</span></h2>"]
    if concept.group is not None:
        others = [other for other in catalog.group(concept.group).concepts if other != name]
        parts.append(f"<p class='meta group'>learnt together with {html.escape(', '.join(others))} from group "
                     f"{html.escape(concept.group)}'s photos (masks below: this concept's)</p>")
    images = sorted(layout.images(name).glob("[0-9][0-9][0-9].png"))
    if images:
        parts.append("<h3>Training photos and masks</h3><div class='row'>")
        for image in images:
            parts.append(figure(image, image.name, "photo"))
            mask = layout.masks(name) / image.name
            if mask.is_file():
                parts.append(figure(mask, f"mask {image.name}", "mask"))
        parts.append("</div>")
    curve = layout.adapter(name) / "loss.png"
    if curve.is_file():
        record = _read_json(layout.adapter(name) / "stage.json")
        final = record.get("metrics", {})
        parts.append(f"<h3>Training</h3><div class='row'>{figure(curve, 'loss', 'curve')}</div>")
        if final:
            parts.append("<p class='meta'>" + ", ".join(f"{k} = {v:.4g}" for k, v in final.items()) + "</p>")
    parts.append("</section>")
    return "\n".join(parts)


def scores_table(metrics: dict) -> str:
    from conceptflow.stages.base import flat_params

    rows = [f"<tr><td>{html.escape(key)}</td><td>{value if isinstance(value, int) else f'{value:.4f}'}</td></tr>"
            for key, value in flat_params("", metrics).items() if _number(value)]
    return "<table class='scores'><tr><th>metric</th><th>value</th></tr>" + "".join(rows) + "</table>" if rows else ""


@dataclass(frozen=True)
class SamplerScores:
    """One row of a combination's sampler table: who made the images and their overall scores."""

    sampler: str
    summary: str
    scores: dict


def sampler_scores(listing: dict, metrics: dict) -> list[SamplerScores]:
    """The scored image sets of one combination, as the generate and evaluate stages wrote them:
    the sampler named in images.json with metrics.json's ``overall``, and, when the rows hold
    ``plain_file`` images and metrics.json their ``plain`` scores, the plain fused comparison."""
    from conceptflow.sample import SAMPLERS

    rows = []
    sampler = listing.get("sampler")
    if sampler and metrics.get("overall"):
        spec = SAMPLERS.get(sampler)
        rows.append(SamplerScores(sampler, spec.summary if spec else "", metrics["overall"]))
    if metrics.get("plain") and all(row.get("plain_file") for row in listing.get("images", [])):
        rows.append(SamplerScores(PLAIN_LABEL, f"the same prompts and seeds without {sampler}'s hooks",
                                  metrics["plain"]))
    return rows


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sampler_table(rows: list[SamplerScores], higher_is_better: dict[str, bool]) -> str:
    """A leaderboard of ``rows`` (one per sampler), a column per metric that ``higher_is_better``
    names and some row has, the best value of each column in bold; empty with fewer than two rows."""
    if len(rows) < 2:
        return ""
    ordered = [key for key in METRIC_LABELS if key in higher_is_better] + [k for k in higher_is_better if k not in METRIC_LABELS]
    columns = [key for key in ordered if any(_number(row.scores.get(key)) for row in rows)]
    best = {}
    for key in columns:
        values = [row.scores[key] for row in rows if _number(row.scores.get(key))]
        best[key] = max(values) if higher_is_better[key] else min(values)
    header = "".join(f"<th>{html.escape(METRIC_LABELS.get(key, key))} {'↑' if higher_is_better[key] else '↓'}"
                     f"<br><span class='meta'>{html.escape(key)}</span></th>" for key in columns)
    body = []
    for row in rows:
        cells = []
        for key in columns:
            value = row.scores.get(key)
            if not _number(value):
                cells.append("<td>–</td>")
                continue
            text = f"{value:.4f}"
            if key == "kid" and _number(row.scores.get("kid_std")):
                text += f" ± {row.scores['kid_std']:.4f}"
            cells.append(f"<td{' class=best' if value == best[key] else ''} data-metric='{html.escape(key)}'>{text}</td>")
        body.append(f"<tr data-sampler='{html.escape(row.sampler)}'><td title='{html.escape(row.summary)}'>"
                    f"{html.escape(row.sampler)}</td>{''.join(cells)}</tr>")
    return f"<table class='samplers'><tr><th>sampler</th>{header}</tr>{''.join(body)}</table>"


def _short(name: str) -> str:
    """An encoder's id for a caption: hub ids as they are, local folders by their last two parts."""
    path = Path(name)
    return "/".join(path.parts[-2:]) if path.is_absolute() else name


def combination_section(layout: Layout, catalog: Catalog, name: str) -> str:
    parts = [f"<section class='combination' data-combination='{html.escape(name)}'>",
             f"<h2>Combination {html.escape(name)}</h2>"]
    listing = _read_json(layout.generated(name) / "images.json")
    metrics = _read_json(layout.metrics(name) / "metrics.json")
    folder = layout.generated(name)
    order = list(catalog.combination(name).concepts)
    table = sampler_table(sampler_scores(listing, metrics), metrics.get("higher_is_better", {}))
    if table:
        encoders = ", ".join(f"{key} = {_short(value)}" for key, value in metrics.get("encoders", {}).items()
                             if key in ("clip", "dino"))
        parts.append("<h3>Samplers</h3>" + table + "<p class='meta'>overall scores of each sampler's images of the same "
                     f"prompts and seeds, best per column in bold; scored with {html.escape(encoders or 'unrecorded encoders')}"
                     "</p>")
    if listing:
        sampler = listing.get("sampler", "")
        parts.append(f"<h3>Generated ({html.escape(sampler)})</h3>")
        for row in listing["images"]:
            caption = f"{row['prompt']} (seed {row['seed']})"
            cells = []
            if row.get("plain_file"):
                cells.append(figure(folder / row["plain_file"], PLAIN_LABEL, "plain"))
            cells.append(figure(folder / row["file"], sampler, "generated", sampler=sampler))
            ordered = lambda names: sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))
            maps = row.get("attention") or {}
            for concept_name in ordered(maps):
                map_file = maps[concept_name]
                cells.append(figure(folder / map_file, f"<{concept_name}> attention", "attention", concept=concept_name))
            masks = row.get("masks") or {}  # a sampler's final per-concept masks (Concept Conductor's refined ones)
            for concept_name in ordered(masks):
                cells.append(figure(folder / masks[concept_name], f"<{concept_name}> mask", "sampler-mask", concept=concept_name))
            parts.append(f"<div class='sample' data-prompt='{html.escape(row['prompt'])}' data-seed='{row['seed']}'>"
                         f"<p class='meta prompt'>{html.escape(caption)}</p><div class='row'>{''.join(cells)}</div></div>")
    if metrics:
        parts.append("<h3>Scores</h3>" + scores_table(metrics))
    parts.append("</section>")
    return "\n".join(parts)


def write_report(catalog: Catalog, destination: Path | None = None) -> Path:
    layout = Layout(catalog)
    destination = destination or layout.report() / "index.html"
    body = [f"<h1>conceptflow report: {html.escape(catalog.project)}</h1>",
            f"<p class='meta'>base model: {html.escape(catalog.base_model)} · resolution {catalog.resolution}px · "
            f"seed {catalog.seed}</p>"]
    body += [concept_section(layout, catalog, concept.name) for concept in catalog.concepts]
    body += [combination_section(layout, catalog, combination.name) for combination in catalog.combinations]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>conceptflow: {html.escape(catalog.project)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    return write_text_atomic(Path(destination), page)
