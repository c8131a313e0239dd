"""Per-image time of ConceptFlow-M (2 concepts, SAMA + layout guidance) vs plain fused sampling.

    HF_HUB_OFFLINE=1 python benchmarks/sampling.py [--model embedded:tiny-sd] [--steps 50] [--repeats 2]

One combination of two concepts (random token embeddings stand in for trained ones), a batch
of 8 images (4 prompts x 2 seeds, the catalog's default seeds), the same base, steps and batch
for every variant, all in this one process. Time is this process's CPU time on one thread
(``time.process_time``), which other users of a shared CPU disturb far less than wall time;
variants run interleaved, ``--repeats`` times, and the fastest of each is kept. Besides the headline, it prices each
part and each cost-saving by switching it off:

- sama only / layout only: the two components alone;
- references per image seed (``reference_seed: null``): one reference per (concept, seed), here
  4 for the batch instead of 2;
- no reference sharing: one reference branch per (image, concept), here 16 -- what sharing a
  reference trajectory saves;
- untruncated gradient pass: the guidance reads the maps of every cross-attention layer, so its
  gradient pass runs the whole UNet -- what stopping after the mid block saves.

The last line is ``ratio conceptflow_m/plain = <x>``.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conceptflow.adapters.tokens import concept_token_strings, write_embeddings  # noqa: E402
from conceptflow.config import GenerateConfig  # noqa: E402
from conceptflow.models.loading import load_base_pipeline  # noqa: E402
from conceptflow.sample.conceptflow_m import pipeline as conceptflow_m  # noqa: E402
from conceptflow.sample.conceptflow_m.sama import BranchLayout  # noqa: E402
from conceptflow.sample.core import SampleRequest, SamplingCore  # noqa: E402
from conceptflow.sample.fused import sample_images  # noqa: E402

CONCEPTS = ("dog", "cat")
PROMPTS = ("a <dog> and a <cat> on the beach", "a <cat> sitting next to a <dog>",
           "a <dog> and a <cat> in a garden", "a painting of a <dog> and a <cat>")
SEEDS = (0, 1)


def core_with_concepts(model_id: str) -> SamplingCore:
    core = SamplingCore(load_base_pipeline(model_id))
    pipeline, n_layers = core.pipeline, core.n_layers
    generator = torch.Generator().manual_seed(0)
    width = pipeline.text_encoder.get_input_embeddings().weight.shape[1]
    scale = float(pipeline.text_encoder.get_input_embeddings().weight.detach().std())
    write_embeddings(pipeline.tokenizer, pipeline.text_encoder,
                     {token: torch.randn(width, generator=generator) * scale
                      for name in CONCEPTS for token in concept_token_strings(name, n_layers)})
    return core


def unshared_references(seeds, valid, concepts, reference_seed):
    """plan_references without sharing: one reference branch per (image, concept)."""
    keys, index = [], torch.zeros(valid.shape, dtype=torch.long)
    for i, seed in enumerate(seeds):
        for k, name in enumerate(concepts):
            if valid[i, k]:
                index[i, k] = len(keys)
                keys.append((name, int(seed if reference_seed is None else reference_seed)))
    return keys, BranchLayout(len(keys), len(seeds), index, valid)


@contextmanager
def without_reference_sharing():
    shared = conceptflow_m.plan_references
    conceptflow_m.plan_references = unshared_references
    try:
        yield
    finally:
        conceptflow_m.plan_references = shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:tiny-sd")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=GenerateConfig(sampler="conceptflow_m").steps)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is summed over them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    core = core_with_concepts(args.model)
    requests = [SampleRequest(prompt, seed) for prompt in PROMPTS for seed in SEEDS]
    batch = len(requests)

    def settings(**conceptflow_m_config):
        return GenerateConfig(sampler="conceptflow_m", steps=args.steps, batch_size=batch,
                              conceptflow_m=conceptflow_m_config)

    def run_conceptflow_m(config):
        conceptflow_m.sample_conceptflow_m(core, requests, CONCEPTS, args.resolution, config, attention_maps=False)

    def run_no_sharing():
        with without_reference_sharing():
            run_conceptflow_m(settings(reference_seed=None))

    variants = {
        "plain": lambda: sample_images(core, requests, CONCEPTS, args.resolution, args.steps, 7.5, batch),
        "conceptflow_m": lambda: run_conceptflow_m(settings()),
        "sama only": lambda: run_conceptflow_m(settings(layout_guidance=False)),
        "layout only": lambda: run_conceptflow_m(settings(sama=False)),
        "no reference sharing": run_no_sharing,
        "references per image seed": lambda: run_conceptflow_m(settings(reference_seed=None)),
        "untruncated gradient pass": lambda: run_conceptflow_m(settings(layout_last_block="up_blocks")),
    }
    variants["plain"]()  # warm-up (first calls allocate)
    best = {name: float("inf") for name in variants}
    wall = {name: float("inf") for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            start, start_wall = time.process_time(), time.perf_counter()
            run()
            best[name] = min(best[name], time.process_time() - start)
            wall[name] = min(wall[name], time.perf_counter() - start_wall)

    load = os.getloadavg()
    print(f"{args.model}, {args.resolution} px, {args.steps} DPM-Solver steps, batch of {batch} images "
          f"({len(PROMPTS)} prompts x {len(SEEDS)} seeds), 2 concepts, {args.threads} threads, "
          f"best of {args.repeats}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    plain = best["plain"] / batch
    for name, seconds in best.items():
        per_image = seconds / batch
        print(f"{name:>28}: {per_image * 1000:8.1f} ms/image CPU ({per_image / plain:4.2f} x plain), "
              f"{wall[name] / batch * 1000:8.1f} ms/image wall")
    print(f"ratio conceptflow_m/plain = {best['conceptflow_m'] / best['plain']:.2f}")


if __name__ == "__main__":
    main()
