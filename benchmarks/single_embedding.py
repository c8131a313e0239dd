"""What an ED-LoRA concept loses in plain diffusers: layer-wise tokens vs their single-embedding form.

    HF_HUB_OFFLINE=1 python benchmarks/single_embedding.py [--base assets/toy-base] [--images 32]
        [--train-steps 100] [--concept-folder data/adapters/zigzag_star]

A trained ED-LoRA toy concept (trained here through the ingest/mask/train stages, or reused with
``--concept-folder``) is sampled on the same prompts (held-out captioned views of the concept) and
the same initial noise in these arms:

* ``native``: conceptflow's sampler (``conceptflow.sample.fused``): LoRA merged, one embedding per
  cross-attention layer;
* ``diffusers/<form>``: the ``conceptflow export --format kohya`` files loaded in plain diffusers
  (``StableDiffusionPipeline.from_pretrained(base)`` + ``load_lora_weights`` +
  ``load_textual_inversion(token="<name>")``), for each single-embedding form
  (``conceptflow.adapters.embedding_files.SINGLE_FORMS``);
* ``base, class word``: the base prompted with the class word instead of the concept (the floor);
* with ``--fused``: the concept fused as a one-concept combination (the catalog's gradient fusion),
  sampled natively (``fused, native``) and as its ``conceptflow export --format diffusers`` folder
  loaded with plain ``StableDiffusionPipeline.from_pretrained`` (``fused, diffusers folder``; prompts
  as written in the catalog, ``a <name> ...``). Not part of the run below.

Score: toy identity (``conceptflow.toy.evaluators.ToyIdentityEncoder``, the DINO stand-in) of each
image = its mean cosine to held-out reference views of the instance; mean with a 95% percentile
bootstrap interval (``conceptflow.metrics.bootstrap``) over images, and the paired per-image
difference to ``native``. Count: images whose identity to the concept exceeds their identity to a
similar instance (same class, other look). A control checks the loader path: the exported files in
diffusers vs conceptflow's sampler given the same single embedding at every layer (max pixel
difference over a few images; ~0 means the gap above is the embedding form, not the loaders).

Measured once (toy base, zigzag_star, 100 training steps, 32 images per arm, 20 DPM-Solver++ steps,
guidance 7.5, one torch thread on a shared 2-core CPU: 518 s, 133 s of it training):

    arm                     identity [95% CI]        minus native [95% CI]    closer to concept
    native (layer-wise)     0.132 [0.027, 0.240]                              12/32
    diffusers, mean        -0.055 [-0.152, 0.046]    -0.187 [-0.339, -0.028]  15/32
    diffusers, middle       0.021 [-0.090, 0.141]    -0.111 [-0.232, 0.007]   15/32
    base, class word       -0.037 [-0.122, 0.049]    -0.169 [-0.322, -0.006]  17/32
    control (mean): max pixel difference over 4 images = 1/255

The loaders reproduce conceptflow's sampler (control: 1/255, rounding), so the gap is the single
embedding: ``middle`` (now the default) keeps a little of the identity, ``mean`` none beyond the
class word; neither is clearly above the base at this size. The "closer to concept" counts do not
separate the arms (the similar instance shares the class and half the look).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from conceptflow.adapters.embedding_files import DEFAULT_FORM, SINGLE_FORMS, concept_vectors, export_concept_embedding
from conceptflow.adapters.concept_io import EMBEDDING_PREFIX, read_adapter, split_prefix
from conceptflow.adapters.merge import apply_concepts
from conceptflow.exports.diffusers_folder import export_fused_pipeline
from conceptflow.adapters.tokens import class_word_prompt, concept_token_strings, write_embeddings
from conceptflow.methods import read_concept
from conceptflow.methods.edlora.kohya import export_kohya
from conceptflow.metrics.bootstrap import bootstrap_mean
from conceptflow.models.loading import load_base_pipeline, resolve_model_source
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.fused import sample_images
from conceptflow.toy.concepts import TOY_CONCEPTS, render_concept_images
from conceptflow.toy.evaluators import ToyIdentityEncoder

ROOT = Path(__file__).resolve().parents[1]
CONCEPT, SIMILAR = "zigzag_star", "split_star"
PROMPT_SEED, REFERENCE_SEED = 4242, 999  # held-out views: not the training renders (seed 0)


def train_concept(workdir: Path, base: str, steps: int, fused: bool) -> tuple[Path, Path | None]:
    """(the trained concept folder, the fused folder of a one-concept combination or None)."""
    from conceptflow.config import load_catalog
    from conceptflow.layout import Layout
    from conceptflow.stages.fuse import fuse
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train
    from conceptflow.toy.concepts import write_toy_catalog

    catalog = load_catalog(write_toy_catalog(workdir, [CONCEPT], images_per_concept=5, base_model=base,
                                             train_steps=steps, combinations={CONCEPT: (CONCEPT,)} if fused else {}))
    for stage in (ingest, mask, train):
        stage(catalog, CONCEPT)
    if fused:
        fuse(catalog, CONCEPT)  # the catalog's fusion (gradient, closed form) of the one concept
    layout = Layout(catalog)
    return layout.adapter(CONCEPT), layout.fused(CONCEPT) if fused else None


def plain_diffusers(base: str, lora: Path, embedding: Path):
    from diffusers import DPMSolverMultistepScheduler

    pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_source(base), safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipeline.load_textual_inversion(str(embedding), token=f"<{CONCEPT}>")
    return pipeline


def sample_plain(pipeline, requests, latents, resolution, steps, guidance, batch):
    images = []
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        images += pipeline([r.prompt for r in chunk], latents=latents[start:start + batch], height=resolution,
                           width=resolution, num_inference_steps=steps,
                           guidance_scale=guidance, output_type="pil").images
    return images


def identity_scores(encoder, images, references) -> np.ndarray:
    return (encoder.embed_images(images) @ encoder.embed_images(references).T).mean(dim=1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(ROOT / "assets" / "toy-base"))
    parser.add_argument("--evaluators", type=Path, default=ROOT / "assets" / "toy-base" / "evaluators")
    parser.add_argument("--concept-folder", type=Path, default=None, help="a trained edlora zigzag_star to reuse")
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--images", type=int, default=32, help="images per arm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64, help="the toy world's image size")
    parser.add_argument("--control-images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fused", action="store_true",
                        help="also fuse the concept (one-concept combination) and sample its `conceptflow export "
                        "--format diffusers` folder with plain from_pretrained (trains here; not with --concept-folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="single-embedding-") as tmp:
        workdir = Path(tmp)
        if args.concept_folder and args.fused:
            parser.error("--fused trains its own concept; drop --concept-folder")
        folder, fused_folder = ((args.concept_folder, None) if args.concept_folder else
                                train_concept(workdir, args.base, args.train_steps, args.fused))
        trained = time.perf_counter()
        concept = TOY_CONCEPTS[CONCEPT]
        views = render_concept_images(concept, args.images, seed=PROMPT_SEED)
        requests = [SampleRequest(view.caption, seed) for seed, view in enumerate(views)]
        references = [v.image for v in render_concept_images(concept, 8, seed=REFERENCE_SEED)]
        similar = [v.image for v in render_concept_images(TOY_CONCEPTS[SIMILAR], 8, seed=REFERENCE_SEED)]
        encoder = ToyIdentityEncoder(args.evaluators / "identity")

        native_pipeline = load_base_pipeline(args.base)
        resolution = args.resolution
        core = SamplingCore(native_pipeline)
        latents = core.initial_latents([r.seed for r in requests], resolution)
        apply_concepts(native_pipeline, [read_concept(folder, native_pipeline)])
        arms = {"native (layer-wise)": sample_images(core, requests, [CONCEPT], resolution, args.steps,
                                                     args.guidance, args.batch)}

        lora = export_kohya(folder, workdir / "export" / f"{CONCEPT}.safetensors")
        for form in SINGLE_FORMS:
            embedding = export_concept_embedding(folder, workdir / "export" / form / f"{CONCEPT}.safetensors", form)
            arms[f"diffusers, {form}"] = sample_plain(plain_diffusers(args.base, lora, embedding), requests, latents,
                                                      resolution, args.steps, args.guidance, args.batch)
        if fused_folder is not None:
            fused_native = load_base_pipeline(args.base)
            apply_concepts(fused_native, [read_concept(fused_folder, fused_native)])
            arms["fused, native"] = sample_images(fused_native, requests, [CONCEPT], resolution, args.steps,
                                                  args.guidance, args.batch)
            folder_export = export_fused_pipeline(fused_folder, workdir / "export" / "pipeline", args.base)
            exported = StableDiffusionPipeline.from_pretrained(str(folder_export), safety_checker=None,
                                                               requires_safety_checker=False)
            exported.set_progress_bar_config(disable=True)
            arms["fused, diffusers folder"] = sample_plain(exported, requests, latents, resolution, args.steps,
                                                            args.guidance, args.batch)
        base_pipeline = load_base_pipeline(args.base)
        class_requests = [SampleRequest(class_word_prompt(r.prompt, {CONCEPT: concept.class_word}), r.seed)
                          for r in requests]
        arms["base, class word"] = sample_images(base_pipeline, class_requests, [], resolution, args.steps,
                                                 args.guidance, args.batch)

        # control: the exported files in diffusers vs conceptflow's sampler with that single
        # embedding written into every layer token (same LoRA, same text at every layer)
        form = DEFAULT_FORM
        tensors, _ = read_adapter(folder)
        vectors = concept_vectors(split_prefix(tensors, EMBEDDING_PREFIX), CONCEPT, form)
        tokens = concept_token_strings(CONCEPT, core.n_layers)
        write_embeddings(native_pipeline.tokenizer, native_pipeline.text_encoder,
                         {token: vectors[index % 2] for index, token in enumerate(tokens)})
        control_requests = requests[:args.control_images]
        ours = sample_images(core, control_requests, [CONCEPT], resolution, args.steps, args.guidance, args.batch)
        theirs = arms[f"diffusers, {form}"][:args.control_images]
        control = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(ours, theirs))

    native = identity_scores(encoder, arms["native (layer-wise)"], references)
    print(f"concept {CONCEPT} from {folder if args.concept_folder else f'{args.train_steps} training steps'}; "
          f"{len(requests)} images per arm, {args.steps} steps, guidance {args.guidance}; "
          f"training {trained - started:.0f} s, total {time.perf_counter() - started:.0f} s")
    print(f"{'arm':<22} {'identity [95% CI]':>26} {'minus native [95% CI]':>28} {'closer to concept':>18}")
    for name, images in arms.items():
        scores = identity_scores(encoder, images, references)
        closer = int((scores > identity_scores(encoder, images, similar)).sum())
        difference = "" if name.startswith("native") else bootstrap_mean(scores - native).format()
        print(f"{name:<22} {bootstrap_mean(scores).format():>26} {difference:>28} {f'{closer}/{len(images)}':>18}")
    print(f"control ({form}): diffusers vs conceptflow sampler with the same single embedding, max pixel "
          f"difference over {len(control_requests)} images = {control}/255")
    cost = identity_scores(encoder, arms[f"diffusers, {DEFAULT_FORM}"], references) - native
    print(f"single-embedding identity cost ({DEFAULT_FORM}) = {float(cost.mean()):.3f}")


if __name__ == "__main__":
    main()
