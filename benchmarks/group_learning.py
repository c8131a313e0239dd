"""Concepts learnt from photos showing them together (Textual Localization) vs learnt alone (ED-LoRA).

    HF_HUB_OFFLINE=1 python benchmarks/group_learning.py [--base assets/toy-base] [--steps 200]
        [--images 8] [--threads 1] [--out outputs/group_learning]

Six toy concepts (none of catalog.yaml's two), in three groups of two of different classes. Arms,
each through the pipeline's own stages (ingest, mask, train, fuse, generate) on the toy base:

* ``textual_localization hard`` / ``soft`` (``... noprior``: without class-prior images): each group
  learnt from 5 toy photos showing both of its concepts (``conceptflow.toy.groups``), 8 class-prior
  images per class word, masks from the world's ground truth (mask backend
  ``ground_truth``: the saliency fallback cannot separate two concepts, GroundingDINO has no
  weights here);
* ``edlora``: each concept learnt from 5 photos of it alone (saliency masks, as catalog.yaml);
* ``base``: the base model prompted with the class word (no concept).

Per concept, ``--images`` held-out prompts "a <c> ..." (one seed each) sampled with that concept
alone (its own folder: usable alone); identity = toy-DINO cosine to 8 held-out reference views,
per image. Prints each arm's mean identity with its 95% bootstrap interval over the images (6 x
``--images`` per arm) and the per-concept means; writes a chart and samples to ``--out``. Last
line: ``identity textual_localization hard vs edlora = a vs b``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from conceptflow.adapters.tokens import class_word_prompt
from conceptflow.config import load_catalog
from conceptflow.metrics.bootstrap import bootstrap_mean
from conceptflow.stages.chain import make_combination
from conceptflow.stages.generate import generated_images
from conceptflow.toy.concepts import TOY_CONCEPTS, render_concept_images, write_toy_catalog
from conceptflow.toy.evaluators import ToyIdentityEncoder
from conceptflow.toy.groups import write_toy_group_catalog

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 900_000
GROUPS = {"g0": ("split_star", "eye_heart"), "g1": ("target_star", "flag_circle"),
          "g2": ("target_circle", "cross_emblem")}
PROMPTS = ("a <{c}> in the center, on a sky background", "a big <{c}> on the left, on a grass background",
           "a small <{c}> on the right, on a sand background", "a <{c}>")


def solo_combinations(names, images: int) -> dict:
    return {f"solo_{name}": {"concepts": [name], "prompts": [PROMPTS[i % len(PROMPTS)].format(c=name)
                                                             for i in range(images)],
                             "seeds": [HELD_OUT_SEED]} for name in names}


def write_arm(folder: Path, arm: str, base: Path, steps: int, images: int) -> Path:
    names = [name for pair in GROUPS.values() for name in pair]
    if arm.startswith("textual_localization"):  # "textual_localization <hard|soft> [noprior]"
        words = arm.split()
        path = write_toy_group_catalog(folder, GROUPS, photos_per_group=5, base_model=str(base), train_steps=steps,
                                       train={"guidance": words[1], "prior_images": 0 if "noprior" in words else 8,
                                              "prior_steps": 20, "checkpoint_every": steps}, combinations={})
    else:
        path = write_toy_catalog(folder, names, images_per_concept=5, base_model=str(base), train_steps=steps,
                                 combinations={})
    catalog = yaml.safe_load(path.read_text())
    catalog["combinations"] = solo_combinations(names, images)
    catalog["generate"] = {"sampler": "fused", "steps": 20, "batch_size": 8}
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "toy-base")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=8, help="held-out images per concept and arm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "group_learning")
    parser.add_argument("--arms", default="textual_localization hard,textual_localization soft,edlora,base")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    encoder = ToyIdentityEncoder(args.base / "evaluators" / "identity")
    names = [name for pair in GROUPS.values() for name in pair]
    references = {name: encoder.embed_images([v.image for v in render_concept_images(TOY_CONCEPTS[name], 8,
                                                                                     seed=HELD_OUT_SEED)])
                  for name in names}
    scores: dict[str, dict[str, list[float]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="group-learning-") as workdir:
        for arm in args.arms.split(","):
            per_concept = scores.setdefault(arm, {})
            if arm == "base":
                from conceptflow.models.loading import load_base_pipeline
                from conceptflow.sample.core import SampleRequest
                from conceptflow.sample.fused import sample_images

                pipeline = load_base_pipeline(str(args.base))
                for name in names:
                    prompts = [class_word_prompt(PROMPTS[i % len(PROMPTS)].format(c=name),
                                                 {name: TOY_CONCEPTS[name].class_word}) for i in range(args.images)]
                    images = sample_images(pipeline, [SampleRequest(p, HELD_OUT_SEED) for p in prompts], (), 64,
                                           steps=20, batch_size=8)
                    per_concept[name] = (encoder.embed_images(images) @ references[name].T).mean(dim=1).tolist()
                continue
            catalog = load_catalog(write_arm(Path(workdir) / arm.replace(" ", "_"), arm, args.base, args.steps,
                                             args.images))
            for name in names:
                folder = make_combination(catalog, f"solo_{name}")
                images = [image for image, _ in generated_images(folder)]
                per_concept[name] = (encoder.embed_images(images) @ references[name].T).mean(dim=1).tolist()
                if name == names[0]:
                    images[0].save(args.out / f"{arm.replace(' ', '_')}_{name}.png")
            print(f"{arm}: done at {time.perf_counter() - started:.0f} s", flush=True)
    summary = {}
    print(f"\nidentity (toy DINO cosine to held-out views), {len(names)} concepts x {args.images} images per arm, "
          f"{args.steps} training steps, 95% bootstrap interval over images")
    for arm, per_concept in scores.items():
        pooled = [value for values in per_concept.values() for value in values]
        interval = bootstrap_mean(pooled)
        summary[arm] = {"mean": interval.mean, "low": interval.low, "high": interval.high, "n": len(pooled),
                        "per_concept": {name: sum(v) / len(v) for name, v in per_concept.items()}}
        concepts = ", ".join(f"{name} {sum(v) / len(v):.3f}" for name, v in per_concept.items())
        print(f"  {arm:28s} {interval.format()}  (n={len(pooled)}; {concepts})")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    arms = list(summary)
    means = [summary[a]["mean"] for a in arms]
    errors = [[summary[a]["mean"] - summary[a]["low"] for a in arms], [summary[a]["high"] - summary[a]["mean"] for a in arms]]
    axis.bar(range(len(arms)), means, yerr=errors, capsize=4, color="#4c78a8")
    axis.set_xticks(range(len(arms)), arms, rotation=15, fontsize=8)
    axis.set_ylabel("identity (toy DINO)")
    axis.set_title(f"concepts learnt together (groups) vs alone, {args.steps} steps")
    figure.tight_layout()
    figure.savefig(args.out / "identity.png", dpi=120)
    if "textual_localization hard" in summary and "edlora" in summary:
        print(f"identity textual_localization hard vs edlora = {summary['textual_localization hard']['mean']:.3f} "
              f"vs {summary['edlora']['mean']:.3f}")


if __name__ == "__main__":
    main()
