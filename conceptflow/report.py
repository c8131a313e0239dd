"""One self-contained HTML page of a catalog run: what went in and what came out.

Per concept: the ingested photos with their masks and the training curve; per combination:
the generated images with prompts and seeds (and cross-attention maps when the sampler saved
them) and the evaluation scores. Images are embedded as data URIs so the page can be mailed
or logged to MLflow as a single file.
"""

from __future__ import annotations

import base64
import html
import json
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
img.curve{width:auto;height:auto;max-width:420px;border:none;image-rendering:auto}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.meta{font-size:12px;color:#666}
"""


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def figure(path: Path, caption: str, css_class: str = "") -> str:
    klass = f' class="{css_class}"' if css_class else ""
    return f'<figure><img{klass} src="{data_uri(path)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def concept_section(layout: Layout, catalog: Catalog, name: str) -> str:
    concept = catalog.concept(name)
    parts = [f"<h2>Concept &lt;{html.escape(name)}&gt; <span class='meta'>class: {html.escape(concept.class_word)}, "
             f"method: {concept.train.method}</span></h2>"]
    images = sorted(layout.images(name).glob("[0-9][0-9][0-9].png"))
    if images:
        parts.append("<h3>Training photos and masks</h3><div class='row'>")
        for image in images:
            parts.append(figure(image, image.name))
            mask = layout.masks(name) / image.name
            if mask.is_file():
                parts.append(figure(mask, f"mask {image.name}"))
        parts.append("</div>")
    curve = layout.adapter(name) / "loss.png"
    if curve.is_file():
        record = _read_json(layout.adapter(name) / "stage.json")
        final = record.get("metrics", {})
        parts.append(f"<h3>Training</h3><div class='row'>{figure(curve, 'loss', 'curve')}</div>")
        if final:
            parts.append("<p class='meta'>" + ", ".join(f"{k} = {v:.4g}" for k, v in final.items()) + "</p>")
    return "\n".join(parts)


def scores_table(metrics: dict) -> str:
    from conceptflow.stages.base import flat_params

    rows = [f"<tr><td>{html.escape(key)}</td><td>{value:.4f}</td></tr>" for key, value in flat_params("", metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return "<table><tr><th>metric</th><th>value</th></tr>" + "".join(rows) + "</table>" if rows else ""


def combination_section(layout: Layout, name: str) -> str:
    parts = [f"<h2>Combination {html.escape(name)}</h2>"]
    listing = _read_json(layout.generated(name) / "images.json")
    folder = layout.generated(name)
    if listing:
        sampler = listing.get("sampler", "")
        parts.append(f"<h3>Generated ({html.escape(sampler)})</h3>")
        for row in listing["images"]:
            caption = f"{row['prompt']} (seed {row['seed']})"
            cells = []
            if row.get("plain_file"):
                cells.append(figure(folder / row["plain_file"], "plain fused"))
            cells.append(figure(folder / row["file"], sampler))
            for concept_name, map_file in (row.get("attention") or {}).items():
                cells.append(figure(folder / map_file, f"<{concept_name}> attention"))
            parts.append(f"<p class='meta'>{html.escape(caption)}</p><div class='row'>{''.join(cells)}</div>")
    metrics = _read_json(layout.metrics(name) / "metrics.json")
    if metrics:
        parts.append("<h3>Scores</h3>" + scores_table(metrics))
    return "\n".join(parts)


def write_report(catalog: Catalog, destination: Path | None = None) -> Path:
    layout = Layout(catalog)
    destination = destination or layout.report() / "index.html"
    body = [f"<h1>conceptflow report: {html.escape(catalog.project)}</h1>",
            f"<p class='meta'>base model: {html.escape(catalog.base_model)} · resolution {catalog.resolution}px · "
            f"seed {catalog.seed}</p>"]
    body += [concept_section(layout, catalog, concept.name) for concept in catalog.concepts]
    body += [combination_section(layout, combination.name) for combination in catalog.combinations]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>conceptflow: {html.escape(catalog.project)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    return write_text_atomic(Path(destination), page)
