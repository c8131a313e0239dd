"""Per-image time of every registered sampler vs plain fused sampling, and ConceptFlow-M's parts.

    HF_HUB_OFFLINE=1 python benchmarks/sampling.py [--model embedded:tiny-sd] [--steps 50] [--repeats 2]

One combination of two concepts (random token embeddings stand in for trained ones), a batch
of 8 images (4 prompts x 2 seeds, the catalog's default seeds), the same base, steps and batch
for every variant, all in this one process. Time is this process's CPU time on one thread
(``time.process_time``), which other users of a shared CPU disturb far less than wall time;
variants run interleaved, ``--repeats`` times, and the fastest of each is kept. Every row of
``conceptflow.sample.SAMPLERS`` is timed through its registry entry point with its default
settings at the same steps and batch; an entry point that also samples the plain fused images of
the same requests (``plain_images``) has one plain run's time taken off, so each ratio is the
sampler's own images (not for Concept Conductor: its plain images are the layout references it
draws, part of its work). A ``uses_adapters`` sampler (Concept Conductor) gets each concept as a
separate adapter: the concept's tokens plus a random rank-4 ΔW on every attention linear of the
UNet and the text encoder (ED-LoRA's targets), applied per branch. Besides the headline, it prices each
part and each cost-saving of ConceptFlow-M by switching it off:

- sama only / layout only: the two components alone;
- references per image seed (``reference_seed: null``): one reference per (concept, seed), here
  4 for the batch instead of 2;
- no reference sharing: one reference branch per (image, concept), here 16 -- what sharing a
  reference trajectory saves;
- untruncated gradient pass: the guidance reads the maps of every cross-attention layer, so its
  gradient pass runs the whole UNet -- what stopping after the mid block saves.

The last line is ``ratios vs plain: <sampler> x, ...`` (every registered sampler).
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conceptflow.adapters.effects import ConceptEffects  # noqa: E402
from conceptflow.adapters.tokens import concept_token_strings, write_embeddings  # noqa: E402
from conceptflow.config import GenerateConfig  # noqa: E402
from conceptflow.models.loading import load_base_pipeline  # noqa: E402
from conceptflow.sample import SAMPLERS  # noqa: E402
from conceptflow.sample.conceptflow_m import pipeline as conceptflow_m  # noqa: E402
from conceptflow.sample.conceptflow_m.sama import BranchLayout  # noqa: E402
from conceptflow.sample.core import SampleRequest, SamplingCore  # noqa: E402
from conceptflow.sample.fused import sample_images  # noqa: E402

CONCEPTS = ("dog", "cat")
PROMPTS = ("a <dog> and a <cat> on the beach", "a <cat> sitting next to a <dog>",
           "a <dog> and a <cat> in a garden", "a painting of a <dog> and a <cat>")
SEEDS = (0, 1)


ATTENTION_LINEARS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj")


def concept_embeddings(pipeline, n_layers: int) -> dict[str, dict[str, torch.Tensor]]:
    """{concept: {token: row}}: random layer-wise token rows at the table's scale."""
    generator = torch.Generator().manual_seed(0)
    table = pipeline.text_encoder.get_input_embeddings().weight.detach()
    return {name: {token: torch.randn(table.shape[1], generator=generator) * float(table.std())
                   for token in concept_token_strings(name, n_layers)} for name in CONCEPTS}


def core_with_concepts(model_id: str) -> tuple[SamplingCore, dict[str, ConceptEffects]]:
    """The base with every concept's tokens written in, and each concept as a separate adapter
    (its tokens and a random rank-4 ΔW on every attention linear) for uses_adapters samplers."""
    core = SamplingCore(load_base_pipeline(model_id))
    pipeline = core.pipeline
    embeddings = concept_embeddings(pipeline, core.n_layers)
    write_embeddings(pipeline.tokenizer, pipeline.text_encoder,
                     {token: row for rows in embeddings.values() for token, row in rows.items()})
    generator = torch.Generator().manual_seed(1)
    adapters = {}
    for name in CONCEPTS:
        deltas = {}
        for model_name in ("unet", "text_encoder"):
            for path, module in getattr(pipeline, model_name).named_modules():
                if isinstance(module, torch.nn.Linear) and path.endswith(ATTENTION_LINEARS):
                    out_features, in_features = module.weight.shape
                    deltas[f"{model_name}.{path}"] = (torch.randn(out_features, 4, generator=generator)
                                                      @ torch.randn(4, in_features, generator=generator)) * 1e-3
        adapters[name] = ConceptEffects({"name": name, "method": "edlora", "class_word": name}, dict(embeddings[name]),
                                        deltas=deltas)
    return core, adapters


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

    core, adapters = core_with_concepts(args.model)
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
    def run_registered(name):
        spec = SAMPLERS[name]
        config = GenerateConfig(sampler=name, steps=args.steps, batch_size=batch)
        return spec.sample(core, requests, CONCEPTS, args.resolution, config, description=name,
                           adapters=adapters if spec.uses_adapters else None)

    registered = [name for name in SAMPLERS if name != "fused"]
    includes_plain = {}
    for name in registered:  # warm-up, and which entry points also sample the plain comparison
        # a uses_adapters sampler's own plain images are part of its work (Conductor's layout references)
        includes_plain[name] = run_registered(name).plain_images is not None and not SAMPLERS[name].uses_adapters
        variants[f"{name} (entry point)"] = lambda name=name: run_registered(name)
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
    ratios = {}
    for name in registered:
        own = best[f"{name} (entry point)"] - (best["plain"] if includes_plain[name] else 0.0)
        ratios[name] = own / best["plain"]
        print(f"{name:>28}: {own / batch * 1000:8.1f} ms/image CPU ({ratios[name]:4.2f} x plain)"
              + (" (entry point minus its plain comparison run)" if includes_plain[name] else ""))
    print("ratios vs plain: " + ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items()))


if __name__ == "__main__":
    main()
