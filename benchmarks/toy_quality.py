"""Quality of the pretrained toy base, of personalisation and of multi-concept sampling, measured
by the toy evaluators (``conceptflow.toy.evaluators``) on held-out prompts.

    HF_HUB_OFFLINE=1 python benchmarks/toy_quality.py [--base assets/toy-base] [--prompts 48]

1. Base model: the fraction of held-out single-object prompts whose (shape, colour) the
   recogniser finds in the image (goal >= 0.8), and of two-object prompts with both objects.
   The recogniser's score on the ground-truth renders of the same prompts is its ceiling.
2. Personalisation: ED-LoRA fine-tunes a toy concept through the pipeline's own stages
   (ingest, mask, train, fuse, generate); identity (toy DINO: cosine to the concept's reference
   views) of its images vs the base prompted with the class word, and vs a similar concept's
   views (same class, different instance) as a specificity check.
3. Multi-concept: toy omission / redundancy rates of plain fused sampling vs ConceptFlow-M on
   the same prompts and seeds (the generate stage writes both).

Prints a table; the last line is ``single_object_accuracy = <x>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from conceptflow.adapters.tokens import class_word_prompt
from conceptflow.stages.chain import make_combination
from conceptflow.stages.generate import generated_images
from conceptflow.toy.concepts import TOY_CONCEPTS, render_concept_images, write_toy_catalog
from conceptflow.toy.evaluators import (
    ToyIdentityEncoder,
    ToyRecogniser,
    attribute_recall,
    identity_similarity,
    omission_redundancy,
    prompt_alignment,
    prompt_pairs,
)
from conceptflow.toy.world import make_scene

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 900_000  # scene seeds far from any the pretraining stream drew from
PERSONAL_CONCEPT, SIMILAR_CONCEPT, SECOND_CONCEPT = "zigzag_star", "split_star", "quartered_heart"


def sample_base(pipeline, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 16):
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                           output_type="pil").images
    return images


def both_present(recogniser, images, prompts) -> float:
    recognition = recogniser.recognise(images)
    hits = [all(recognition.has(i, shape, colour) for shape, colour in prompt_pairs(p)) for i, p in enumerate(prompts)]
    return sum(hits) / len(hits)


def base_quality(args, recogniser, rows: list) -> float:
    from conceptflow.models.loading import load_base_pipeline

    pipeline = load_base_pipeline(str(args.base))
    single = [make_scene(HELD_OUT_SEED + i, object_count=1) for i in range(args.prompts)]
    double = [make_scene(HELD_OUT_SEED + 10_000 + i, object_count=2) for i in range(args.prompts)]
    started = time.perf_counter()
    single_images = sample_base(pipeline, [s.caption for s in single], 0, args.steps, args.guidance)
    double_images = sample_base(pipeline, [s.caption for s in double], 0, args.steps, args.guidance)
    seconds = time.perf_counter() - started
    single_accuracy = prompt_alignment(recogniser, single_images, [s.caption for s in single])
    unbound = attribute_recall(recogniser, single_images, [s.caption for s in single])
    unbound_truth = attribute_recall(recogniser, [s.image for s in single], [s.caption for s in single])
    rows += [
        ("base: single-object prompts, shape recognised", unbound["shape"], unbound_truth["shape"]),
        ("base: single-object prompts, colour recognised", unbound["colour"], unbound_truth["colour"]),
        ("base: single-object prompts, shape+colour recognised", single_accuracy,
         prompt_alignment(recogniser, [s.image for s in single], [s.caption for s in single])),
        ("base: two-object prompts, both objects recognised", both_present(recogniser, double_images,
                                                                           [s.caption for s in double]),
         both_present(recogniser, [s.image for s in double], [s.caption for s in double])),
    ]
    if args.save_images:
        save_grid(single_images[:16], args.save_images / "base_single.png")
        save_grid(double_images[:16], args.save_images / "base_double.png")
    print(f"(sampled {2 * args.prompts} base images in {seconds:.0f} s)")
    return single_accuracy


def save_grid(images, path: Path, columns: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (64 * columns, 64 * rows), "white")
    for index, image in enumerate(images):
        grid.paste(image.resize((64, 64)), (64 * (index % columns), 64 * (index // columns)))
    grid.save(path)


def images_only(pairs) -> list[Image.Image]:
    return [image for image, _ in pairs]


def personalisation(args, workdir: Path, identity, recogniser, rows: list) -> None:
    from conceptflow.config import load_catalog
    from conceptflow.models.loading import load_base_pipeline

    seeds = list(range(args.seeds))
    combinations = {PERSONAL_CONCEPT: (PERSONAL_CONCEPT,), f"{PERSONAL_CONCEPT}+{SECOND_CONCEPT}":
                    (PERSONAL_CONCEPT, SECOND_CONCEPT)}
    catalog = load_catalog(write_toy_catalog(workdir, [PERSONAL_CONCEPT, SECOND_CONCEPT], images_per_concept=5,
                                             base_model=str(args.base), train_steps=args.train_steps,
                                             combinations=combinations, prompt_seeds=seeds))
    references = [v.image for v in render_concept_images(TOY_CONCEPTS[PERSONAL_CONCEPT], 5)]
    similar = [v.image for v in render_concept_images(TOY_CONCEPTS[SIMILAR_CONCEPT], 5)]

    started = time.perf_counter()
    tuned_pairs = generated_images(make_combination(catalog, PERSONAL_CONCEPT, "fused"))
    tuned = images_only(tuned_pairs)
    # the base gets the same prompts with the class word in place of the concept ("a star on the left, ...")
    class_words = {PERSONAL_CONCEPT: TOY_CONCEPTS[PERSONAL_CONCEPT].class_word}
    base = sample_base(load_base_pipeline(str(args.base)), [class_word_prompt(p, class_words) for _, p in tuned_pairs],
                       0, args.steps, args.guidance)
    rows += [
        (f"identity to <{PERSONAL_CONCEPT}>: fine-tuned", identity_similarity(identity, tuned, references), None),
        (f"identity to <{PERSONAL_CONCEPT}>: base, class word", identity_similarity(identity, base, references), None),
        (f"identity of fine-tuned to similar <{SIMILAR_CONCEPT}>", identity_similarity(identity, tuned, similar),
         None),
        ("identity between the concept's own reference views",
         identity_similarity(identity, references[:2], references[2:]), None),
    ]
    pair = f"{PERSONAL_CONCEPT}+{SECOND_CONCEPT}"
    folder = make_combination(catalog, pair, "conceptflow_m")
    flow_images = images_only(generated_images(folder))
    plain_images = images_only(generated_images(folder, "plain_file"))
    classes = [[TOY_CONCEPTS[PERSONAL_CONCEPT].class_word, TOY_CONCEPTS[SECOND_CONCEPT].class_word]] * len(flow_images)
    plain_rates = omission_redundancy(recogniser, plain_images, classes)
    flow_rates = omission_redundancy(recogniser, flow_images, classes)
    rows += [
        ("multi-concept omission rate: plain fused", plain_rates["omission_rate"], None),
        ("multi-concept omission rate: ConceptFlow-M", flow_rates["omission_rate"], None),
        ("multi-concept redundancy rate: plain fused", plain_rates["redundancy_rate"], None),
        ("multi-concept redundancy rate: ConceptFlow-M", flow_rates["redundancy_rate"], None),
    ]
    if args.save_images:
        save_grid(tuned + base, args.save_images / "personalisation.png")
        save_grid(plain_images + flow_images, args.save_images / "multi_concept.png")
    print(f"(personalisation and multi-concept stages took {time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "toy-base")
    parser.add_argument("--evaluators", type=Path, default=None, help="default: BASE/evaluators")
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts per kind")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per personalisation/multi-concept prompt")
    parser.add_argument("--skip-personalisation", action="store_true")
    parser.add_argument("--save-images", type=Path, default=None, help="folder for sample grids")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    evaluators = args.evaluators or args.base / "evaluators"
    recogniser, identity = ToyRecogniser(evaluators / "recogniser"), ToyIdentityEncoder(evaluators / "identity")

    rows: list = []
    single_accuracy = base_quality(args, recogniser, rows)
    if not args.skip_personalisation:
        with tempfile.TemporaryDirectory(prefix="toy-quality-") as workdir:
            personalisation(args, Path(workdir), identity, recogniser, rows)

    print(f"{'measure':<62} {'value':>7} {'on ground truth':>16}")
    for name, value, ceiling in rows:
        print(f"{name:<62} {value:>7.3f} {'' if ceiling is None else f'{ceiling:.3f}':>16}")
    print(f"single_object_accuracy = {single_accuracy:.3f}")


if __name__ == "__main__":
    main()
