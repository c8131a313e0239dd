"""Cones 2 layout guidance's settings and the seed project's three switches, measured on the toy world.

    HF_HUB_OFFLINE=1 python benchmarks/cones2_switches.py [--quick] [--method edlora] [--workdir DIR]

The leaderboard's held-out setting (``benchmarks/leaderboard.py``: its four toy combinations, prompt
templates, seeds from 1000, identity references, catalog.yaml's fusion, 100 training steps, 15 sampling
steps): one method's concepts are trained and fused once, then every variant samples the same requests
from the same fused models:

- ``fused``: plain fused sampling (no layout);
- ``cones2``: the reference settings (guidance_weight 0.05, +2.5 inside, -1e8 outside, all layers);
- ``cones2 gw0.08``: the reference example config's weight; ``cones2 gw0.3``, ``cones2 gw1.0``: stronger;
- ``+high_res``, ``+sigma_cfg``, ``+pad``: each seed-project switch alone on top of ``cones2``;
- ``+all3``: the three together.

The combinations have no layout, so the boxes are the default side-by-side columns in the prompt's
order of mention (the templates name the left object first where they name sides). Per variant, with
95% percentile-bootstrap intervals over images: omission, redundancy, identity (toy DINO), prompt
alignment (toy CLIP-T), the concepts' cross-attention share inside their boxes (mean over the image's
two concepts of the share of the concept's mean map inside its box; for ``fused`` the maps of an
unguided run, guidance_weight 0), and wall s/img (``fused``: the fused sampler's call alone). Writes
``cones2_switches.md`` and ``cones2_switches.png`` (the first 8 images per variant) to ``--out``; the last
line is ``cones2 switches: best omission = <variant> <mean>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import leaderboard as lb
from conceptflow.metrics.bootstrap import bootstrap_mean

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {"guidance_weight": 0.05}
VARIANTS: dict[str, dict | None] = {
    "fused": None,
    "cones2": {},
    "cones2 gw0.08": {"guidance_weight": 0.08},
    "cones2 gw0.3": {"guidance_weight": 0.3},
    "cones2 gw1.0": {"guidance_weight": 1.0},
    "+high_res": {"high_resolution_only": True},
    "+sigma_cfg": {"sigma_aware_cfg": True},
    "+pad": {"pad_prompts": True},
    "+all3": {"high_resolution_only": True, "sigma_aware_cfg": True, "pad_prompts": True},
}


def generate_settings(catalog, steps: int, variant: dict | None):
    from conceptflow.config import GenerateConfig

    cones2 = {**REFERENCE, **(variant or {})} if variant is not None else {"guidance_weight": 0.0}
    return GenerateConfig.model_validate({**catalog.generate.model_dump(exclude_unset=True), "sampler": "cones2_layout",
                                          "steps": steps, "cones2_layout": cones2})


def inside_share(batch) -> list[float]:
    """Per image: mean over its named concepts of the share of the concept's mean map inside its box."""
    from conceptflow.sample.boxes import box_masks

    raw = batch.raw_maps()
    shares = []
    for i, boxes in enumerate(batch.boxes):
        per_concept = []
        for k, name in enumerate(batch.concepts):
            if name in boxes:
                mask = box_masks({name: boxes[name]}, raw.shape[-1])[0]
                per_concept.append(float((raw[i, k] * mask).sum() / raw[i, k].sum()))
        shares.append(sum(per_concept) / len(per_concept))
    return shares


def sample_variant(model, requests, settings, plain: bool) -> tuple[list, list[float], float]:
    """Images (plain fused ones for ``plain``), the inside-box shares of a guided or unguided run and
    the wall seconds per image of sampling the images (for ``plain`` the fused sampler's call alone)."""
    from conceptflow.sample.cones2_layout.pipeline import Cones2LayoutBatch
    from conceptflow.sample.fused import sample_images

    core, concepts, resolution = model.core, model.combination.concepts, model.catalog.resolution
    with model._parts():
        wall = time.perf_counter()
        batch = Cones2LayoutBatch(core, requests, concepts, resolution, settings, want_maps=True)
        latents = batch.run()
        if plain:  # the fused sampler's own images (the unguided run above only gave the maps)
            wall = time.perf_counter()
            images = sample_images(core, requests, concepts, resolution, settings.steps, settings.guidance_scale,
                                   len(requests))
        else:
            images = core.decode(latents)
    return images, inside_share(batch), (time.perf_counter() - wall) / len(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--method", default="edlora")
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "toy-base")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "cones2_switches")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {list(VARIANTS)}")
    args = parser.parse_args()
    variants = VARIANTS if args.variants is None else {name: VARIANTS[name] for name in args.variants.split(",")}
    torch.set_num_threads(args.threads)
    settings = dict(lb.QUICK if args.quick else lb.FULL)
    combinations = dict(list(lb.COMBINATIONS.items())[: settings["combinations"]])
    args.out.mkdir(parents=True, exist_ok=True)

    from conceptflow.config import load_catalog
    from conceptflow.sample.core import SampleRequest
    from conceptflow.stages.combination_model import CombinationModel
    from conceptflow.stages.fuse import fuse
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train
    from conceptflow.toy.concepts import TOY_CONCEPTS, render_concept_images
    from conceptflow.toy.evaluators import ToyIdentityEncoder, ToyRecogniser

    evaluators = (ToyRecogniser(args.base / "evaluators" / "recogniser"),
                  ToyIdentityEncoder(args.base / "evaluators" / "identity"))
    references = {name: evaluators[1].embed_images([v.image for v in render_concept_images(
        TOY_CONCEPTS[name], 8, seed=lb.HELD_OUT_SEED)]) for pair in combinations.values() for name in pair}
    arms = {name: lb.Arm(args.method, name) for name in variants}
    shares: dict[str, list[float]] = {name: [] for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cones2-switches-") as temporary:
        workdir = args.workdir or Path(temporary)
        catalog = load_catalog(lb.write_method_catalog(workdir / args.method, args.method, combinations, settings,
                                                       args.base))
        class_words = {concept.name: concept.class_word for concept in catalog.concepts}
        for concept in catalog.concepts:
            ingest(catalog, concept.name)
            mask(catalog, concept.name)
            train(catalog, concept.name)
        print(f"trained {len(catalog.concepts)} concepts in {time.perf_counter() - started:.0f} s", flush=True)
        for combination in catalog.combinations:
            fuse(catalog, combination.name)
            model = CombinationModel(catalog, combination.name, "fused")
            requests = [SampleRequest(prompt, seed, combination.layout) for prompt in combination.prompts
                        for seed in combination.seeds]
            size = catalog.generate.batch_size
            for name, variant in variants.items():
                generate = generate_settings(catalog, settings["sample_steps"], variant)
                for start in range(0, len(requests), size):
                    batch = requests[start : start + size]
                    images, batch_shares, batch_seconds = sample_variant(model, batch, generate, variant is None)
                    seconds[name].append(batch_seconds)
                    shares[name] += batch_shares
                    lb.score_images(arms[name], images, [r.prompt for r in batch], combination.concepts,
                                    class_words, evaluators, references)
                    arms[name].samples += images[: max(0, 8 - len(arms[name].samples))]
            print(f"{combination.name} sampled ({time.perf_counter() - started:.0f} s)", flush=True)
    titles = ["variant", "images", "omission", "redundancy", "identity (toy DINO)", "prompt alignment (toy CLIP-T)",
              "attention inside box", "s/img"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    omission = {}
    for name, arm in arms.items():
        omission[name] = bootstrap_mean(arm.omission)
        cells = [name, str(len(arm.omission)), omission[name].format(), bootstrap_mean(arm.redundancy).format(),
                 bootstrap_mean(arm.identity).format(), bootstrap_mean(arm.alignment).format(),
                 bootstrap_mean(shares[name]).format(), bootstrap_mean(seconds[name]).format(3)]
        lines.append("| " + " | ".join(cells) + " |")
    header = (f"method {args.method}, {settings['train_steps']} training steps, combinations {', '.join(combinations)}, "
              f"{settings['templates']} templates x {settings['seeds']} seeds, {settings['sample_steps']} sampling steps, "
              f"default side-by-side boxes; wall {time.perf_counter() - started:.0f} s")
    table = "\n".join(lines)
    (args.out / "cones2_switches.md").write_text(f"# Cones 2 layout guidance switches (toy world)\n\n{header}\n\n"
                                                 f"mean [95% bootstrap interval]\n\n{table}\n")
    lb.save_samples(arms, args.out / "cones2_switches.png")
    print(header)
    print(table)
    best = min(omission, key=lambda name: omission[name].mean)
    print(f"cones2 switches: best omission = {best} {omission[best].mean:.3f}")


if __name__ == "__main__":
    main()
