"""Toy-world identity of ConceptFlow-S with KronA-WED's weight decomposition over rows vs columns.

    HF_HUB_OFFLINE=1 python benchmarks/wd_axis.py [--concepts split_star target_circle eye_heart]
        [--train-steps 60] [--seeds 8] [--threads 1]

For each axis (``train.weight_decompose``: "rows" = norm and m per output row, "columns" = per
input column) the same toy concepts (conceptflow/toy/concepts.py; by default three beyond the
default catalog's two) are trained with ConceptFlow-S on the toy base through the pipeline's own
stages (ingest, mask, train, fuse (``average``: a single concept's own update), generate with
the plain fused sampler, 20 steps), one single-concept combination each, two prompts ("a <c>", "a <c> on the left, on a sand background") × ``--seeds``
seeds. Identity of an image = mean cosine (toy DINO, ``conceptflow.toy.evaluators``) to held-out
reference views of the concept (rendered with another seed than the training images). Both axes
see the same prompts and seeds, so besides each axis's mean with its 95% percentile-bootstrap
interval over images (``conceptflow.metrics.bootstrap``) the script reports the paired
difference columns − rows per image with its interval. The base model prompted with the class
word gives the scale (identity without any concept).

Last line: ``wd_axis identity rows = m [lo, hi], columns = m [lo, hi], columns - rows = d [lo, hi] (n = N)``.

Measured once (2 shared cores, 1 thread, ``--train-steps 40``, 3 concepts × 8 images per axis,
11 min): rows 0.539 [0.378, 0.684], columns 0.540 [0.379, 0.684], columns − rows 0.001
[−0.002, 0.007] (n = 24); per concept the paired differences were 0.005 (split_star, which
neither axis learnt: 0.09 against the class word's 0.14), 0.001 (target_circle), −0.002
(eye_heart). No difference between the axes at this size, so the default stayed "rows".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from conceptflow.adapters.tokens import class_word_prompt
from conceptflow.metrics.bootstrap import bootstrap_mean
from conceptflow.stages.chain import make_combination
from conceptflow.stages.generate import generated_images
from conceptflow.toy.concepts import TOY_CONCEPTS, TOY_EMBEDDING_LR, render_concept_images, write_toy_catalog
from conceptflow.toy.evaluators import ToyIdentityEncoder

ROOT = Path(__file__).resolve().parents[1]
AXES = ("rows", "columns")
DEFAULT_CONCEPTS = ("split_star", "target_circle", "eye_heart")
REFERENCE_SEED = 1000  # held-out reference views: the training images are rendered with seed 0


def write_axis_catalog(folder: Path, concepts, axis: str, args) -> Path:
    """A toy catalog whose concepts train ConceptFlow-S with ``weight_decompose: axis``."""
    path = write_toy_catalog(folder, list(concepts), images_per_concept=args.images, base_model=str(args.base),
                             train_steps=args.train_steps, combinations={name: (name,) for name in concepts},
                             prompt_seeds=list(range(args.seeds)))
    catalog = yaml.safe_load(path.read_text())
    for spec in catalog["concepts"].values():
        spec["train"] = {"method": "conceptflow_s", "steps": args.train_steps, "lr_embeddings": TOY_EMBEDDING_LR,
                         "checkpoint_every": args.train_steps, "weight_decompose": axis}
    catalog["fuse"] = {"method": "average"}  # one concept: W0 + its ΔW, without gradient fusion's capture
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def per_image_identity(encoder: ToyIdentityEncoder, images, references) -> np.ndarray:
    """Each image's mean cosine to the reference views."""
    return (encoder.embed_images(images) @ encoder.embed_images(references).T).mean(dim=1).numpy()


def base_images(base: Path, prompts: list[str], seeds: list[int], steps: int) -> list:
    from conceptflow.models.loading import load_base_pipeline

    pipeline = load_base_pipeline(str(base))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=generators,
                    output_type="pil").images


def main() -> None:
    from conceptflow.config import load_catalog

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "toy-base")
    parser.add_argument("--concepts", nargs="+", default=list(DEFAULT_CONCEPTS), choices=sorted(TOY_CONCEPTS))
    parser.add_argument("--images", type=int, default=5, help="training images per concept")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (two prompts per concept)")
    parser.add_argument("--base-steps", type=int, default=20, help="sampling steps of the class-word baseline")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = ToyIdentityEncoder(args.base / "evaluators" / "identity")
    references = {name: [v.image for v in render_concept_images(TOY_CONCEPTS[name], 5, seed=REFERENCE_SEED)]
                  for name in args.concepts}

    scores: dict[str, dict[str, np.ndarray]] = {axis: {} for axis in AXES}
    prompts: dict[str, list[str]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wd-axis-") as workdir:
        catalogs = {axis: load_catalog(write_axis_catalog(Path(workdir) / axis, args.concepts, axis, args))
                    for axis in AXES}
        for name in args.concepts:  # both axes per concept, so a stopped run still has paired results
            for axis in AXES:
                pairs = generated_images(make_combination(catalogs[axis], name, "fused"))
                prompts[name] = [prompt for _, prompt in pairs]
                scores[axis][name] = per_image_identity(encoder, [image for image, _ in pairs], references[name])
                print(f"({name}, {axis}: identity {scores[axis][name].mean():.3f} over {len(pairs)} images, "
                      f"{time.perf_counter() - started:.0f} s)", flush=True)

    baseline = {}
    for name in args.concepts:
        seeds = [seed for _ in range(2) for seed in range(args.seeds)]
        class_prompts = [class_word_prompt(p, {name: TOY_CONCEPTS[name].class_word}) for p in prompts[name]]
        baseline[name] = per_image_identity(encoder, base_images(args.base, class_prompts, seeds[:len(class_prompts)],
                                                                 args.base_steps), references[name])

    print(f"{'concept':<16} {'rows':>22} {'columns':>22} {'columns - rows':>24} {'base, class word':>18}")
    for name in args.concepts:
        rows, columns = scores["rows"][name], scores["columns"][name]
        print(f"{name:<16} {bootstrap_mean(rows).format():>22} {bootstrap_mean(columns).format():>22} "
              f"{bootstrap_mean(columns - rows).format():>24} {baseline[name].mean():>18.3f}")
    every = {axis: np.concatenate([scores[axis][name] for name in args.concepts]) for axis in AXES}
    base_all = np.concatenate([baseline[name] for name in args.concepts])
    rows_interval, columns_interval = bootstrap_mean(every["rows"]), bootstrap_mean(every["columns"])
    difference = bootstrap_mean(every["columns"] - every["rows"])
    print(f"{'all':<16} {rows_interval.format():>22} {columns_interval.format():>22} {difference.format():>24} "
          f"{base_all.mean():>18.3f}")
    print(f"(concepts: {', '.join(args.concepts)}; {args.train_steps} steps; {len(every['rows'])} images per axis; "
          f"95% percentile bootstrap over images; {time.perf_counter() - started:.0f} s)")
    print(f"wd_axis identity rows = {rows_interval.format()}, columns = {columns_interval.format()}, "
          f"columns - rows = {difference.format()} (n = {difference.n})")


if __name__ == "__main__":
    main()
