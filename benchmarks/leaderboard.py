"""Leaderboard: every registered training method x every registered sampler on the toy world,
in one table like ConceptFlow's Tables 1-2.

    HF_HUB_OFFLINE=1 python benchmarks/leaderboard.py [--quick] [--out DIR] [--threads 1] [--methods a,b] [--samplers c,d]

For each method of ``conceptflow.methods.METHODS`` the pipeline's own stages (ingest, mask,
train, fuse with catalog.yaml's gradient fusion) train every benchmark concept and fuse each
two-concept combination; for each sampler of ``conceptflow.sample.SAMPLERS`` its registry entry
point samples held-out prompts and seeds from each fused model, loaded as the generate stage
loads it. A method or sampler added to its registry gets its rows here with no edit to this
file: a method runs with its config's defaults plus the toy world's overrides that
``write_toy_catalog`` gives every concept (steps, token lr ``TOY_EMBEDDING_LR``, checkpoint
interval); a sampler with its defaults plus the settings ``write_toy_catalog`` writes
(ConceptFlow-M's ``TOY_LAYOUT_STEP_SIZE``), at 15 steps for every sampler (sized to the time
budget, see ``FULL``; ``--sample-steps 0``: each sampler's registry default).
``--quick`` is a smoke run (1 combination, 4 images per row, a few steps, average fusion).

Held out from the developers' tuning (``catalog.yaml``, ``TOY_EMBEDDING_LR`` and
``TOY_LAYOUT_STEP_SIZE`` were tuned on zigzag_star + quartered_heart, prompts "a <a> and a <b>"
and "... on the left ... on the right, on a sand background", seeds 0-3):
- concepts: none of the default catalog's two; each combination joins two class words;
- prompts: ``PROMPT_TEMPLATES`` (swapped sides, sizes, sky / grass-gradient / white / grey
  backgrounds, the world's "{background} with {objects}" template; never sand);
- seeds: from ``HELD_OUT_SEED`` (1000) on;
- identity references: 8 fresh views per concept rendered with seed ``HELD_OUT_SEED``, not the
  training views (seed 0).

Per (method, sampler) row, each with a 95% percentile-bootstrap interval
(``conceptflow.metrics.bootstrap``):
- identity (toy DINO): per image, the mean over its two concepts of the mean cosine of the
  toy identity embedding to the concept's reference views; bootstrap over images;
- prompt alignment (toy CLIP-T): cosine of the recogniser's image and text vectors, the
  prompt's <name> replaced by its class word (the evaluate stage's CLIP-T); over images;
- omission: per image the fraction of its two concepts not found (``omission_redundancy``);
  redundancy: per image 1 if it holds more objects than asked; over images;
- s/step: wall seconds of each training step of the method (every concept's steps, recorded
  through the train stage's ``run_training`` ``on_log`` hook with ``log_every: 1``; a step's
  time includes a checkpoint written just before it), pooled over the method's concepts;
  bootstrap over steps;
- adapter size: KB of a concept's saved tensors (``adapter.safetensors`` and any other
  safetensors file of its concept folder: what a user ships per concept), over the method's concepts;
- s/img: wall seconds of one call of the sampler's registry entry point on a batch, divided by
  the batch's images (ConceptFlow-M's entry point also samples the plain fused images of the
  same requests for comparison: its cost is in the figure), pooled over every method's fused
  models; bootstrap over batches.

Writes ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.png`` (bars with intervals) and
``samples.png`` (the first images of each row) to ``--out``. The last line is
``leaderboard rows = N``.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from conceptflow.metrics.bootstrap import Interval, bootstrap_mean

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 1000
# four toy concepts of four class words, none of the default catalog's; every star/heart + circle/ring pair
COMBINATIONS: dict[str, tuple[str, str]] = {
    "split_star+target_circle": ("split_star", "target_circle"),
    "eye_heart+cross_emblem": ("eye_heart", "cross_emblem"),
    "split_star+cross_emblem": ("split_star", "cross_emblem"),
    "eye_heart+target_circle": ("eye_heart", "target_circle"),
}
# {a}, {b}: the combination's concept names; none of these is a prompt of catalog.yaml
PROMPT_TEMPLATES = (
    "a <{b}> on the left and a <{a}> on the right, on a sky background",
    "a big <{a}> on the left and a small <{b}> on the right, on a white background",
    "a <{a}> on the left and a <{b}> on the right, on a grass gradient background",
    "a grey background with a <{b}> and a <{a}>",
)
# Sized for ~20 min on one core from CPU seconds measured on smoke runs (3 methods, 2 samplers, a busy
# CPU): s/step edlora 0.39, conceptflow_s 0.68, textual_inversion 0.29; s/img at 10 steps fused 0.52,
# conceptflow_m 1.48 (with its plain comparison images); a gradient fusion ~6 s. 100 training steps
# like catalog.yaml (~9 min for 4 concepts x 3 methods); 15 sampling steps for every sampler (~9 min
# for 6 rows x 64 images; ConceptFlow-M's default 50 would take ~25 min alone); fusions and stage
# overheads ~2 min; 4 combinations x 4 templates x 4 seeds = 64 images per row.
FULL = {"combinations": 4, "templates": 4, "seeds": 4, "train_steps": 100, "sample_steps": 15, "fuse": None}
# a smoke run (~25 CPU s per method): average fusion instead of catalog.yaml's gradient fusion saves ~5 s a fusion
QUICK = {"combinations": 1, "templates": 2, "seeds": 2, "train_steps": 3, "sample_steps": 5,
         "fuse": {"method": "average"}}
METRICS = (  # (key, column title, higher is better)
    ("identity", "identity (toy DINO)", True),
    ("alignment", "prompt alignment (toy CLIP-T)", True),
    ("omission", "omission", False),
    ("redundancy", "redundancy", False),
    ("seconds_per_step", "s/step (train)", False),
    ("adapter_kb", "adapter size (KB)", False),
    ("seconds_per_image", "s/img (sample)", False),
)


# --methods / --samplers: run a subset of the registries' rows (default: every row)
SELECTED: dict[str, list[str] | None] = {"methods": None, "samplers": None}


def _selected(kind: str, registered: list[str]) -> list[str]:
    chosen = SELECTED[kind]
    if chosen is None:
        return registered
    unknown = sorted(set(chosen) - set(registered))
    if unknown:
        raise SystemExit(f"--{kind}: unknown {unknown}; registered: {registered}")
    return [name for name in registered if name in chosen]


def method_names() -> list[str]:
    """Every registered training method (``conceptflow.methods.METHODS``), or the --methods subset."""
    from conceptflow.methods import METHODS

    return _selected("methods", list(METHODS))


def sampler_names() -> list[str]:
    """Every registered sampler (``conceptflow.sample.SAMPLERS``), or the --samplers subset."""
    from conceptflow.sample import SAMPLERS

    return _selected("samplers", list(SAMPLERS))


def held_out_prompts(pair: tuple[str, str], templates: int) -> list[str]:
    return [template.format(a=pair[0], b=pair[1]) for template in PROMPT_TEMPLATES[:templates]]


@dataclass
class Arm:
    """The per-image scores of one (method, sampler) row."""

    method: str
    sampler: str
    identity: list[float] = field(default_factory=list)
    alignment: list[float] = field(default_factory=list)
    omission: list[float] = field(default_factory=list)
    redundancy: list[float] = field(default_factory=list)
    samples: list = field(default_factory=list)  # a few images for samples.png


class PhaseClock:
    """Wall and CPU seconds spent per phase (ingest+mask, train, fuse, sample), for sizing runs:
    on a shared CPU the CPU seconds are close to what a run alone would take."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - wall
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - cpu

    def summary(self) -> str:
        return "time per phase (wall / CPU s): " + ", ".join(
            f"{phase} {self.wall[phase]:.0f} / {self.cpu[phase]:.0f}" for phase in self.wall)


@contextmanager
def recorded_step_seconds():
    """Inside, the train stage's ``run_training`` records each step's (wall, CPU) seconds
    (through its ``on_log`` hook, called every ``log_every`` steps; the benchmark catalog logs
    every step), for concepts learnt alone and for groups learnt together (``train_method``)."""
    import conceptflow.stages.train as train_stage

    original = train_stage.run_training
    seconds: list[tuple[float, float]] = []  # (wall, CPU) seconds per step

    def timed_run_training(*args, on_log=None, **kwargs):
        last = [time.perf_counter(), time.process_time()]

        def record(step, logs):
            now = [time.perf_counter(), time.process_time()]
            seconds.append((now[0] - last[0], now[1] - last[1]))
            last[:] = now
            if on_log is not None:
                on_log(step, logs)

        return original(*args, on_log=record, **kwargs)

    train_stage.run_training = timed_run_training
    try:
        yield seconds
    finally:
        train_stage.run_training = original


def write_method_catalog(folder: Path, method: str, combinations: dict, settings: dict, base: Path) -> Path:
    """The toy catalog ``write_toy_catalog`` writes, with every concept trained by ``method``
    (the toy overrides it sets, where ``method``'s config has the field, plus per-step logging),
    each combination's held-out prompts and seeds, and the default catalog's ``fuse`` settings
    (``settings["fuse"]`` in their place if given)."""
    from conceptflow.methods import get_method
    from conceptflow.toy.concepts import write_toy_catalog
    from conceptflow.toy.groups import write_toy_group_catalog

    concepts = list(dict.fromkeys(name for pair in combinations.values() for name in pair))
    seeds = list(range(HELD_OUT_SEED, HELD_OUT_SEED + settings["seeds"]))
    fields = get_method(method).config.model_fields
    if get_method(method).trains_groups:
        # a method that learns concepts from photos showing them together: the combinations' pairs
        # that share no concept become groups (toy photos of both, ground-truth masks)
        groups, grouped = {}, set()
        for pair in combinations.values():
            if not grouped & set(pair):
                groups[f"group{len(groups)}"] = pair
                grouped |= set(pair)
        left = [name for name in concepts if name not in grouped]
        path = write_toy_group_catalog(folder, groups, photos_per_group=5, base_model=str(base),
                                       train_steps=settings["train_steps"], single_concepts=left,
                                       combinations=combinations, prompt_seeds=seeds)
        catalog = yaml.safe_load(path.read_text())
        for spec in catalog["groups"].values():
            spec["train"] = {**{k: v for k, v in spec["train"].items() if k in fields}, "method": method,
                             "log_every": 1}
            for member in spec["concepts"]:  # the members write the group's settings too (dvc.yaml reads them)
                catalog["concepts"][member]["train"] = dict(spec["train"])
        for name in left:  # not in a group: learnt alone by the default method (none with these pairs)
            catalog["concepts"][name]["train"]["log_every"] = 1
    else:
        path = write_toy_catalog(folder, concepts, images_per_concept=5, base_model=str(base),
                                 train_steps=settings["train_steps"], combinations=combinations, prompt_seeds=seeds)
        catalog = yaml.safe_load(path.read_text())
        for spec in catalog["concepts"].values():
            spec["train"] = {**{k: v for k, v in spec["train"].items() if k in fields}, "method": method,
                             "log_every": 1}
    for key, spec in catalog["combinations"].items():
        spec["prompts"] = held_out_prompts(combinations[key], settings["templates"])
    # the default catalog's fusion (unless the run's settings name one)
    catalog["fuse"] = settings["fuse"] or yaml.safe_load((ROOT / "catalog.yaml").read_text())["fuse"]
    path.write_text(f"# benchmarks/leaderboard.py: the toy catalog with method {method}\n"
                    + yaml.safe_dump(catalog, sort_keys=False))
    return path


def sampler_settings(catalog, sampler: str, steps: int | None):
    """The catalog's generate settings for ``sampler``: its registry default steps (or ``steps``)."""
    from conceptflow.config import GenerateConfig
    from conceptflow.sample import SAMPLERS

    return GenerateConfig.model_validate({**catalog.generate.model_dump(exclude_unset=True), "sampler": sampler,
                                          "steps": steps or SAMPLERS[sampler].default_steps})


def score_images(arm: Arm, images, prompts, pair, class_words, evaluators, references) -> None:
    from conceptflow.metrics.scores import cosine_matrix, strip_concept_references
    from conceptflow.toy.evaluators import omission_redundancy

    recogniser, identity = evaluators
    embedded = identity.embed_images(images)
    per_concept = torch.stack([(embedded @ references[name].T).mean(dim=1) for name in pair])
    arm.identity += per_concept.mean(dim=0).tolist()
    texts = [strip_concept_references(prompt, class_words) for prompt in prompts]
    arm.alignment += cosine_matrix(recogniser.embed_images(images), recogniser.embed_texts(texts)).diagonal().tolist()
    for image in images:
        rates = omission_redundancy(recogniser, [image], [[class_words[name] for name in pair]])
        arm.omission.append(rates["omission_rate"])
        arm.redundancy.append(rates["redundancy_rate"])


def run_method(catalog, settings: dict, args, evaluators, references, arms: dict, sample_seconds: dict,
               progress, clock: PhaseClock) -> tuple[list[tuple[float, float]], list[float]]:
    """Train every concept of ``catalog`` (one method's), fuse and sample each combination;
    returns the method's (wall, CPU) seconds per training step and its concepts' adapter sizes (KB)."""
    from conceptflow.layout import Layout
    from conceptflow.sample.core import SampleRequest
    from conceptflow.stages.combination_model import CombinationModel
    from conceptflow.stages.fuse import fuse
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train

    method = catalog.concepts[0].train.method
    class_words = {concept.name: concept.class_word for concept in catalog.concepts}
    with recorded_step_seconds() as step_seconds:
        for concept in catalog.concepts:  # every concept's masks first: a group's training reads them all
            with clock("ingest+mask"):
                ingest(catalog, concept.name)
                mask(catalog, concept.name)
        for concept in catalog.concepts:
            progress.set_description(f"{method}: train {concept.name}")
            with clock("train"):
                train(catalog, concept.name)
            progress.update(1)
    adapter_kb = [sum(f.stat().st_size for f in Layout(catalog).adapter(concept.name).glob("*.safetensors")) / 1024
                  for concept in catalog.concepts]
    # a group's concepts are learnt in one run: its steps count once
    runs = {catalog.trained_with(concept.name): concept.train.steps for concept in catalog.concepts}
    expected = sum(runs.values())
    if len(step_seconds) != expected:
        raise RuntimeError(f"recorded {len(step_seconds)} training steps of {method}, expected {expected}: either "
                           "--workdir holds adapters of an earlier run (the train stage skipped them; use a fresh "
                           "folder) or the train stage no longer reports every step through run_training's on_log")
    for combination in catalog.combinations:
        progress.set_description(f"{method}: fuse {combination.name}")
        with clock("fuse"):
            fuse(catalog, combination.name)
        requests = [SampleRequest(prompt, seed, combination.layout) for prompt in combination.prompts
                    for seed in combination.seeds]
        for sampler in sampler_names():
            progress.set_description(f"{method}: {sampler} {combination.name}")
            generate = sampler_settings(catalog, sampler, settings["sample_steps"])
            with clock("load fused"):  # the fused model, or the separate adapters for a uses_adapters sampler
                model = CombinationModel(catalog, combination.name, sampler)
            arm = arms.setdefault((method, sampler), Arm(method, sampler))
            for start in range(0, len(requests), generate.batch_size):
                batch = requests[start:start + generate.batch_size]
                wall, cpu = time.perf_counter(), time.process_time()
                with clock(f"sample {sampler}"):
                    result = model.sample(generate, batch, f"{sampler} {combination.name}", plain=False)
                sample_seconds.setdefault(sampler, []).append(
                    ((time.perf_counter() - wall) / len(batch), (time.process_time() - cpu) / len(batch)))
                with clock("score"):
                    score_images(arm, result.images, [r.prompt for r in batch], combination.concepts, class_words,
                                 evaluators, references)
                if len(arm.samples) < args.sample_columns:
                    arm.samples += result.images[:args.sample_columns - len(arm.samples)]
                progress.update(1)
    return step_seconds, adapter_kb


def mean_cpu(seconds: list[tuple[float, float]]) -> float:
    return sum(cpu for _, cpu in seconds) / len(seconds)


def leaderboard_rows(arms: dict, step_seconds: dict, sample_seconds: dict, adapter_kb: dict) -> list[dict]:
    rows = []
    for (method, sampler), arm in arms.items():
        row = {"method": method, "sampler": sampler, "images": len(arm.identity)}
        for key in ("identity", "alignment", "omission", "redundancy"):
            row[key] = bootstrap_mean(getattr(arm, key))
        row["seconds_per_step"] = bootstrap_mean([wall for wall, _ in step_seconds[method]])
        row["adapter_kb"] = bootstrap_mean(adapter_kb[method])
        row["seconds_per_image"] = bootstrap_mean([wall for wall, _ in sample_seconds[sampler]])
        rows.append(row)
    return rows


def write_table(rows: list[dict], out: Path, header: list[str]) -> str:
    """The markdown table (also written to ``out/leaderboard.md``) and ``out/leaderboard.csv``."""
    titles = ["method", "sampler", "images"] + [title for _, title, _ in METRICS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        cells = [row["method"], row["sampler"], str(row["images"])]
        cells += [row[key].format({"seconds_per_step": 4, "seconds_per_image": 4, "adapter_kb": 1}.get(key, 3))
                  for key, _, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    arrows = ", ".join(f"{title} {'higher' if higher else 'lower'} is better" for _, title, higher in METRICS)
    (out / "leaderboard.md").write_text("# Leaderboard (toy world)\n\n" + "\n".join(f"- {h}" for h in header)
                                        + f"\n\nmean [95% bootstrap interval]; {arrows}.\n\n" + table + "\n")
    with open(out / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "sampler", "images"] + [f"{key}{part}" for key, _, _ in METRICS
                                                           for part in ("", "_low", "_high")])
        for row in rows:
            writer.writerow([row["method"], row["sampler"], row["images"]]
                            + [f"{value:.6g}" for key, _, _ in METRICS
                               for value in (row[key].mean, row[key].low, row[key].high)])
    return table


def save_chart(rows: list[dict], path: Path, title: str) -> None:
    """One panel per measure, one horizontal bar per row, its 95% interval as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = [f"{row['method']} / {row['sampler']}" for row in rows]
    figure, axes = plt.subplots(2, 4, figsize=(17, 2.2 + 0.9 * len(rows)), sharey=True)
    samplers = list(dict.fromkeys(row["sampler"] for row in rows))
    palette = plt.get_cmap("tab10").colors
    colours = [palette[samplers.index(row["sampler"]) % len(palette)] for row in rows]
    for axis, (key, name, higher) in zip(axes.flat, METRICS):
        intervals: list[Interval] = [row[key] for row in rows]
        means = [i.mean for i in intervals]
        errors = [[i.mean - i.low for i in intervals], [i.high - i.mean for i in intervals]]
        axis.barh(range(len(rows)), means, xerr=errors, capsize=4, color=colours)
        if key in ("omission", "redundancy"):
            axis.set_xlim(0, 1)
        axis.set_title(f"{name} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        axis.set_yticks(range(len(rows)), labels, fontsize=8)
        axis.invert_yaxis()
        axis.grid(axis="x", alpha=0.3)
        if key == "adapter_kb":
            axis.set_xscale("log")  # a residual of a few KB beside LoRAs of MBs
    for axis in axes.flat[len(METRICS):]:
        axis.set_visible(False)
    figure.legend(handles=[Patch(color=palette[i % len(palette)], label=name)
                           for i, name in enumerate(samplers)], loc="upper right", fontsize=8, title="sampler")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_samples(arms: dict, path: Path) -> None:
    """One row of images per (method, sampler), labelled."""
    from PIL import Image, ImageDraw

    size, label_width = 64, 190
    columns = max(len(arm.samples) for arm in arms.values())
    sheet = Image.new("RGB", (label_width + size * columns, size * len(arms)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, arm in enumerate(arms.values()):
        draw.text((4, row * size + size // 2 - 6), f"{arm.method} / {arm.sampler}", fill="black")
        for column, image in enumerate(arm.samples):
            sheet.paste(image.convert("RGB").resize((size, size)), (label_width + column * size, row * size))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 combination, 4 images per row, "
                        f"{QUICK['train_steps']} training and {QUICK['sample_steps']} sampling steps, average fusion")
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "toy-base")
    parser.add_argument("--evaluators", type=Path, default=None, help="default: BASE/evaluators")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "leaderboard",
                        help="default: outputs/leaderboard (git-ignored)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the catalogs and stage outputs here (default: a temporary folder, removed)")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=None,
                        help=f"default {FULL['sample_steps']} (--quick: {QUICK['sample_steps']}); 0: each sampler's "
                        "registry default")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per prompt")
    parser.add_argument("--sample-columns", type=int, default=8, help="images per row in samples.png")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=None, help="comma-separated subset of the registered methods")
    parser.add_argument("--samplers", default=None, help="comma-separated subset of the registered samplers")
    args = parser.parse_args()
    for kind in ("methods", "samplers"):
        if getattr(args, kind):
            SELECTED[kind] = [name.strip() for name in getattr(args, kind).split(",") if name.strip()]
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("train_steps", "sample_steps", "seeds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    combinations = dict(list(COMBINATIONS.items())[:settings["combinations"]])
    args.out.mkdir(parents=True, exist_ok=True)

    from conceptflow.config import load_catalog
    from conceptflow.toy.concepts import TOY_CONCEPTS, render_concept_images
    from conceptflow.toy.evaluators import ToyIdentityEncoder, ToyRecogniser

    methods, samplers = method_names(), sampler_names()
    evaluator_folder = args.evaluators or args.base / "evaluators"
    evaluators = ToyRecogniser(evaluator_folder / "recogniser"), ToyIdentityEncoder(evaluator_folder / "identity")
    references = {name: evaluators[1].embed_images([v.image for v in render_concept_images(
        TOY_CONCEPTS[name], 8, seed=HELD_OUT_SEED)]) for pair in combinations.values() for name in pair}
    images_per_arm = len(combinations) * settings["templates"] * settings["seeds"]
    arms: dict = {}
    step_seconds: dict = {}
    adapter_kb: dict = {}
    sample_seconds: dict = {}
    clock = PhaseClock()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="leaderboard-") as temporary:
        workdir = args.workdir or Path(temporary)
        catalogs = {method: load_catalog(write_method_catalog(workdir / method, method, combinations, settings,
                                                              args.base)) for method in methods}
        first = next(iter(catalogs.values()))
        generate = {name: sampler_settings(first, name, settings["sample_steps"]) for name in samplers}
        header = [
            f"methods: {', '.join(methods)}; samplers: {', '.join(samplers)}",
            f"combinations: {', '.join(combinations)} (toy concepts, none of catalog.yaml's)",
            f"training: {settings['train_steps']} steps per concept; each method's config defaults + the toy "
            f"catalog's {first.concepts[0].train.model_dump(exclude_unset=True, exclude={'method', 'log_every'})} "
            "(+ log_every 1, for the step times)",
            f"fusion: {first.fuse.model_dump()}" + ("" if settings["fuse"] else " (catalog.yaml's)"),
            "sampling: " + ", ".join(f"{name} {config.steps} steps" for name, config in generate.items())
            + f"; batch {first.generate.batch_size}, guidance {first.generate.guidance_scale}, the toy catalog's "
            f"{first.generate.model_dump(exclude_unset=True)}",
            f"held out: {settings['templates']} prompt templates x seeds {HELD_OUT_SEED}-"
            f"{HELD_OUT_SEED + settings['seeds'] - 1} per combination = {images_per_arm} images per row; "
            f"identity references: 8 views per concept rendered with seed {HELD_OUT_SEED}",
            "intervals: 95% percentile bootstrap (2000 resamples) over images; s/step over training steps; "
            "adapter size over concepts; "
            f"s/img over sampler batches; torch threads {args.threads}",
        ]
        print("\n".join(header), flush=True)
        batches = sum(-(-len(c.prompts) * len(c.seeds) // first.generate.batch_size) for c in first.combinations)
        total = len(methods) * (len(first.concepts) + len(samplers) * batches)
        with tqdm(total=total, desc="leaderboard", mininterval=2.0) as progress:
            for method, catalog in catalogs.items():
                step_seconds[method], adapter_kb[method] = run_method(catalog, settings, args, evaluators, references, arms,
                                                  sample_seconds, progress, clock)
    rows = leaderboard_rows(arms, step_seconds, sample_seconds, adapter_kb)
    table = write_table(rows, args.out, header)
    save_chart(rows, args.out / "leaderboard.png", f"toy-world leaderboard: {images_per_arm} images per row, "
               "95% bootstrap intervals")
    save_samples(arms, args.out / "samples.png")
    (args.out / "settings.json").write_text(json.dumps({"settings": settings, "combinations": combinations,
                                                        "prompt_templates": PROMPT_TEMPLATES,
                                                        "held_out_seed": HELD_OUT_SEED}, indent=2) + "\n")
    print(table)
    print(clock.summary())
    print("CPU s/step: " + ", ".join(f"{m} {mean_cpu(t):.3f}" for m, t in step_seconds.items())
          + "; CPU s/img: " + ", ".join(f"{m} {mean_cpu(t):.3f}" for m, t in sample_seconds.items()))
    print(f"(wrote {args.out}/leaderboard.md, .csv, .png and samples.png; {time.perf_counter() - started:.0f} s)")
    print(f"leaderboard rows = {len(rows)}")


if __name__ == "__main__":
    main()
