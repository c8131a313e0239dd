"""The GPU check: SD-1.5-sized training, fusion and sampling on a CUDA device (``gpu_check.sh`` runs it).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_check.py [--steps 50] [--sample-steps 50] [--images 8]

On a machine with CUDA it builds (or finds) ``embedded:sd15-shaped``, trains an ED-LoRA and a
ConceptFlow-S concept at 512 px with ``train.mixed_precision: bf16`` (float32 weights and adapter,
bf16 autocast; float32 without autocast if this checkout's training config has no
``mixed_precision``), fuses them (Mix-of-Show gradient fusion), samples ``--images`` images of the
pair with the plain fused sampler and with ConceptFlow-M (the ``conceptflow_m`` sampler writes
both) in float16, and prints seconds per training step, seconds per image (the ConceptFlow paper
reports 9.3 s per 512x512 image on an A100), peak GPU memory per stage
(``torch.cuda.max_memory_allocated``) and whether the adapters, the fused weights and the final
latents are finite. Exits 1 when a stage fails or an output is not finite.

Without CUDA it says so and exits 0.

Training and sampling read two catalogs over one data folder: ``train.yaml`` (``dtype: float32``)
for ingest, mask, train and fuse, ``sample.yaml`` (``dtype: float16``) for generate, which reads
the fused model by its md5 only, so the float16 catalog does not retrain anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch

BASE = "embedded:sd15-shaped"
CONCEPTS = ("zigzag_star", "quartered_heart")
PAIR = "+".join(CONCEPTS)
METHODS = ("edlora", "conceptflow_s")
PAPER_SECONDS_PER_IMAGE = 9.3  # ConceptFlow, 512x512 on an A100
RESOLUTION = 512


def cuda_available() -> bool:
    return torch.cuda.is_available()


def write_catalogs(folder: Path, args) -> tuple[Path, Path]:
    import yaml

    from conceptflow.methods.base import ConceptTrainConfig
    from conceptflow.toy.concepts import write_toy_catalog

    path = write_toy_catalog(folder, list(CONCEPTS), images_per_concept=5, base_model=BASE,
                             combinations={PAIR: CONCEPTS}, prompt_seeds=tuple(range(args.images)))
    catalog = yaml.safe_load(path.read_text())
    fields = ConceptTrainConfig.model_fields
    for name, method in zip(CONCEPTS, METHODS):
        train = {"method": method, "steps": args.steps, "batch_size": 1, "checkpoint_every": 10_000, "log_every": 10}
        if "mixed_precision" in fields:
            train["mixed_precision"] = args.mixed_precision
        if "gradient_checkpointing" in fields and args.gradient_checkpointing:
            train["gradient_checkpointing"] = True
        catalog["concepts"][name]["train"] = train
    combination = catalog["combinations"][PAIR]
    combination["prompts"] = combination["prompts"][1:]  # "a <a> on the left and a <b> on the right, ..."
    catalog.update(device=args.device, dtype="float32", resolution=RESOLUTION, mask={"backend": "saliency"},
                   fuse={"method": "gradient", "solver": "closed_form"},
                   generate={"sampler": "conceptflow_m", "steps": args.sample_steps, "batch_size": args.batch_size,
                             "guidance_scale": 7.5})
    train_path, sample_path = folder / "train.yaml", folder / "sample.yaml"
    train_path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    sample_path.write_text(yaml.safe_dump({**catalog, "dtype": args.sample_dtype}, sort_keys=False))
    return train_path, sample_path


def _timed(function, bucket: dict, key: str):
    def wrapper(*a, **k):
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            return function(*a, **k)
        finally:
            torch.cuda.synchronize()
            bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - started
    return wrapper


def finite_file(path: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t.float()).all()) for t in load_file(str(path)).values())


def run_stage(catalog, name: str, item: str, times: dict, sampler: str | None = None) -> float:
    """Run one stage item; returns its peak GPU memory in GiB."""
    from conceptflow.stages.table import stage

    row = stage(name)
    module = importlib.import_module(row.function.split(":")[0])
    if name == "train" and not hasattr(module.run_training, "__wrapped_by_check__"):
        module.run_training = _timed(module.run_training, times, "training")
        module.run_training.__wrapped_by_check__ = True
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    row.call(catalog, item, sampler=sampler)
    torch.cuda.synchronize()
    times[f"{name}:{item}"] = time.perf_counter() - started
    return torch.cuda.max_memory_allocated() / 1024**3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps per concept")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--sample-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the outputs here (default: a temp folder)")
    args = parser.parse_args()
    if not cuda_available():
        print(f"GPU check: no CUDA device on this machine (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); nothing run. On a CUDA machine this trains ED-LoRA and ConceptFlow-S for "
              f"{args.steps} steps at 512 px ({args.mixed_precision}), fuses them and samples {args.images} images "
              f"with plain fused sampling and ConceptFlow-M at {args.sample_steps} steps on {BASE}.")
        return 0

    from conceptflow.config import load_catalog
    from conceptflow.layout import Layout
    from conceptflow.methods.base import ConceptTrainConfig
    from conceptflow.models.embedded import embedded_model_path
    from conceptflow.sample import registry
    from conceptflow.sample import core as sampling_core
    from conceptflow.sample.conceptflow_m import pipeline as conceptflow_m

    print(f"GPU check on {torch.cuda.get_device_name(args.device)} (torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}), base {BASE}, {RESOLUTION} px")
    if "mixed_precision" not in ConceptTrainConfig.model_fields:
        print("note: this checkout's training config has no mixed_precision: training runs in float32")
    started = time.perf_counter()
    print(f"base: {embedded_model_path(BASE)} ready in {time.perf_counter() - started:.0f} s")

    times: dict[str, float] = {}
    finite_latents: list[bool] = []
    decode = sampling_core.SamplingCore.decode

    def checked_decode(self, latents):
        finite_latents.append(bool(torch.isfinite(latents).all()))
        return decode(self, latents)

    sampling_core.SamplingCore.decode = checked_decode
    registry.SamplerSpec.sample = _timed(registry.SamplerSpec.sample, times, "sampling")
    conceptflow_m.sample_images = _timed(conceptflow_m.sample_images, times, "plain")

    context = tempfile.TemporaryDirectory(prefix="gpu-check-") if args.workdir is None else None
    workdir = Path(context.name) if context else args.workdir
    train_path, sample_path = write_catalogs(workdir, args)
    train_catalog, sample_catalog = load_catalog(train_path), load_catalog(sample_path)
    layout = Layout(train_catalog)
    ok, lines = True, []
    try:
        for name in CONCEPTS:
            run_stage(train_catalog, "ingest", name, times)
            run_stage(train_catalog, "mask", name, times)
        for name, method in zip(CONCEPTS, METHODS):
            times.pop("training", None)
            peak = run_stage(train_catalog, "train", name, times)
            finite = finite_file(layout.adapter(name) / "adapter.safetensors")
            ok &= finite
            lines.append(f"train {method:<14} {times['training'] / args.steps:6.2f} s/step   peak GPU {peak:6.2f} GiB"
                         f"   adapter finite: {finite}")
        peak = run_stage(train_catalog, "fuse", PAIR, times)
        finite = finite_file(layout.fused(PAIR) / "adapter.safetensors")
        ok &= finite
        lines.append(f"fuse (2 concepts)    {times[f'fuse:{PAIR}']:6.1f} s        peak GPU {peak:6.2f} GiB"
                     f"   fused weights finite: {finite}")
        peak = run_stage(sample_catalog, "generate", PAIR, times, sampler="conceptflow_m")
        plain, total = times["plain"], times["sampling"]
        lines.append(f"sample plain fused   {plain / args.images:6.2f} s/image  ({args.sample_dtype}, {args.sample_steps} "
                     f"steps; paper, ConceptFlow-M on an A100: {PAPER_SECONDS_PER_IMAGE} s/image)")
        lines.append(f"sample ConceptFlow-M {(total - plain) / args.images:6.2f} s/image  peak GPU {peak:6.2f} GiB"
                     f"   latents finite: {all(finite_latents)}")
        ok &= all(finite_latents)
    except Exception as error:  # report what ran, then the failure
        ok = False
        lines.append(f"FAILED: {type(error).__name__}: {error}")
        raise
    finally:
        print("\n".join(lines))
        print(f"gpu check {'ok' if ok else 'FAILED'}")
        if context:
            context.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
