"""ToVA on the toy world: single-concept identity against training steps and learning rate.

    HF_HUB_OFFLINE=1 python benchmarks/tova_steps.py [--concepts split_star,target_circle] [--seeds 8]
        [--arms tova:100:5e-4,tova:300:5e-4,tova:100:5e-3,tova:300:5e-3,edlora:100:]

Each concept (toy photos rendered with seed 0, as the leaderboard's) is trained by each arm
``method:steps:lr`` (lr: ToVA's ``lr_lora``; empty: the method's default, with the toy world's
token lr for ED-LoRA) through the pipeline's ingest, mask and train stages on the toy base, then
sampled alone ("a photo of a <name>", held-out seeds from 1000, the plain sampler, 15 steps,
guidance 7.5) with the concept applied at run time (``adapters.branched.runtime_concepts``: its
token deltas at its tokens). Identity: mean toy-DINO cosine of the images to 8 reference views
rendered with seed 1000; the base prompted with the class word is the floor. The leaderboard
trains every method for the same 100 steps; ToVA's own default is 300.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 1000


def arms_of(text: str) -> list[tuple[str, int, float | None]]:
    arms = []
    for item in text.split(","):
        method, steps, lr = item.split(":")
        arms.append((method, int(steps), float(lr) if lr else None))
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "toy-base")
    parser.add_argument("--concepts", default="split_star,target_circle")
    parser.add_argument("--arms", default="tova:100:5e-4,tova:300:5e-4,tova:100:5e-3,tova:300:5e-3,edlora:100:")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from conceptflow.adapters.branched import runtime_concepts
    from conceptflow.config import load_catalog
    from conceptflow.layout import Layout
    from conceptflow.methods import read_concept
    from conceptflow.models.loading import load_base_pipeline
    from conceptflow.sample.core import SampleRequest, SamplingCore
    from conceptflow.sample.fused import sample_images
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train
    from conceptflow.toy.concepts import TOY_CONCEPTS, render_concept_images, write_toy_catalog
    from conceptflow.toy.evaluators import ToyIdentityEncoder

    names = args.concepts.split(",")
    identity = ToyIdentityEncoder(args.base / "evaluators" / "identity")
    references = {name: identity.embed_images([view.image for view in render_concept_images(
        TOY_CONCEPTS[name], 8, seed=HELD_OUT_SEED)]) for name in names}
    seeds = list(range(HELD_OUT_SEED, HELD_OUT_SEED + args.seeds))

    def score(images, name: str) -> float:
        return float((identity.embed_images(images) @ references[name].T).mean())

    def sample(pipeline, prompt: str, concepts: list[str]):
        requests = [SampleRequest(prompt, seed) for seed in seeds]
        return sample_images(SamplingCore(pipeline), requests, concepts, 64, steps=args.sample_steps)

    rows = []
    with torch.no_grad():
        base = load_base_pipeline(str(args.base))
        for name in names:
            rows.append(("base (class word)", name, score(sample(base, f"a photo of a {TOY_CONCEPTS[name].class_word}", []),
                                                     name), None))
            print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="tova-steps-") as temporary:
        for method, steps, lr in arms_of(args.arms):
            folder = Path(temporary) / f"{method}-{steps}-{lr}"
            path = write_toy_catalog(folder, names, images_per_concept=5, base_model=str(args.base),
                                     train_steps=steps, combinations={})
            raw = yaml.safe_load(path.read_text())
            for spec in raw["concepts"].values():
                spec["train"]["method"] = method
                spec["train"]["checkpoint_every"] = steps
                if method != "edlora":
                    spec["train"].pop("lr_embeddings")
                if lr is not None:
                    spec["train"]["lr_lora"] = lr
            path.write_text(yaml.safe_dump(raw))
            catalog = load_catalog(path)
            for name in names:
                ingest(catalog, name)
                mask(catalog, name)
                started = time.process_time()
                train(catalog, name)
                cpu = time.process_time() - started
                pipeline = load_base_pipeline(str(args.base))
                concept = read_concept(Layout(catalog).adapter(name), pipeline)
                with torch.no_grad(), runtime_concepts(pipeline, [concept]):
                    images = sample(pipeline, f"a photo of a <{name}>", [name])
                rows.append((f"{method} {steps} steps lr {lr if lr is not None else 'default'}", name,
                             score(images, name), cpu))
                print(rows[-1], flush=True)
    print(f"\n| arm | concept | identity (toy DINO, {args.seeds} seeds) | train CPU s |\n|---|---|---|---|")
    for arm, name, value, cpu in rows:
        print(f"| {arm} | {name} | {value:.3f} | {'' if cpu is None else f'{cpu:.0f}'} |")


if __name__ == "__main__":
    main()
