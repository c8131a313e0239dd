"""Every pipeline stage at Stable Diffusion 1.5's dimensions (``embedded:sd15-shaped``), on this machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_size.py [--resolutions 256,512] [--quick]

Not in CI: at 512 px it takes tens of minutes on a CPU. For each resolution it writes a catalog of
four toy concepts (their 64 px renders, upscaled by ingest) on the SD-1.5-shaped base, trains one
concept per registered training method (``conceptflow.methods.METHODS``, cycled over the four),
fuses two and four of them (Mix-of-Show gradient fusion: the Gram matrices are the memory that
grows with the model), samples the two-concept combination with every registered sampler
(``conceptflow.sample.SAMPLERS``) and evaluates it. Each stage runs in its own subprocess
(``--worker``), so its peak resident memory (VmHWM) is its own.

Printed per stage: wall seconds, model-load seconds, peak RSS; seconds per training step, adapter
file size (beside the references' sizes), seconds per image, fusion seconds and the Gram matrices'
memory. Shortcuts, all printed: few training and sampling steps, and gradient fusion captures the
UNet inputs over ``--capture-steps`` denoising steps instead of its 20. The last line is
``real-size stages ok = k/n``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "embedded:sd15-shaped"
CONCEPTS = ("zigzag_star", "quartered_heart", "target_circle", "cross_emblem")
PAIR, QUAD = "+".join(CONCEPTS[:2]), "+".join(CONCEPTS)
EXTRA_CONCEPTS = ("split_star", "eye_heart", "flag_circle", "target_star")  # trained only: one per method beyond 4


def trained_concepts(n_methods: int) -> tuple[str, ...]:
    """The concepts trained: the four fused ones and, when more methods are registered, one more
    toy concept per extra method (each method trains at least one concept)."""
    return CONCEPTS + EXTRA_CONCEPTS[:max(0, n_methods - len(CONCEPTS))]
MB = 1024**2

# What the references report, for the adapter-size column (the tensors are saved in float32 here).
REFERENCE_SIZES = {
    "edlora": "LoRA rank 4 on SD 1.5 UNet + text-encoder attention: ~3 MB (1.09 M params; kohya fp16 ~2.2 MB)",
    "conceptflow_s": "Cones 2 residual: a few KB (for comparison; no published SD 1.5 KronA-WED size)",
    "textual_inversion": "textual inversion: 768 floats = 3 KB per token; P+ (16 layers x 2 tokens): 98 KB",
    "tova": "ToVA value LoRA rank 32 on the 16 cross-attention to_v: 0.79 M params, 3.2 MB in float32 (computed; "
            "ConceptSplit publishes no size)",
    "cones2": "Cones 2 residual embedding: 768 floats, 3 KB (the paper: 5 KB per residual)",
}


# ------------------------------------------------------------------------------------ the worker side
def _timed(function, bucket: dict, key: str):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - started
    return wrapper


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that across
    ``exec``, so a worker would report its parent's peak when that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gram_bytes(grams) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in grams.values())


def run_worker(args) -> None:
    """One stage for its items, in this process; prints a JSON line of measurements."""
    import importlib

    import torch

    torch.set_num_threads(args.threads)
    from conceptflow.config import load_catalog
    from conceptflow.layout import Layout
    from conceptflow.stages.table import stage

    catalog = load_catalog(args.catalog)
    row = stage(args.worker)
    module = importlib.import_module(row.function.split(":")[0])
    times: dict[str, float] = {}
    extra: dict = {}
    if hasattr(module, "load_base_pipeline"):
        module.load_base_pipeline = _timed(module.load_base_pipeline, times, "load")
    if args.worker == "train":
        module.run_training = _timed(module.run_training, times, "training")
    if args.worker == "fuse":
        from conceptflow.fuse import gradient

        gram_total = {"bytes": 0}

        def counting(capture, **fixed):
            def wrapper(*a, **k):
                grams = capture(*a, **{**k, **fixed})
                gram_total["bytes"] += _gram_bytes(grams)
                return grams
            return wrapper

        gradient.capture_text_encoder = counting(gradient.capture_text_encoder)
        gradient.capture_cross_attention_kv = counting(gradient.capture_cross_attention_kv)
        gradient.capture_unet = counting(gradient.capture_unet, steps=args.capture_steps)
        gradient.SAMPLING_PROMPTS = gradient.SAMPLING_PROMPTS[: args.capture_prompts]
        gradient.gradient_fuse = _timed(gradient.gradient_fuse, times, "fusion")
        extra["gram"] = gram_total
    if args.worker == "generate":
        import importlib

        from conceptflow.sample import SAMPLERS, registry

        registry.SamplerSpec.sample = _timed(registry.SamplerSpec.sample, times, "sampling")
        for spec in SAMPLERS.values():  # an entry point's own plain comparison, timed apart
            module = importlib.import_module(spec.entry_point.partition(":")[0])
            if spec.name != "fused" and hasattr(module, "sample_images"):
                module.sample_images = _timed(module.sample_images, times, "plain_sampling")

    items = args.item.split(",")
    started = time.perf_counter()
    for item in items:
        row.call(catalog, item, sampler=args.sampler)
    result = {"seconds": time.perf_counter() - started, **times,
              "maxrss": peak_rss_bytes()}
    layout = Layout(catalog)
    if args.worker == "train":
        from safetensors import safe_open

        path = layout.adapter(items[0]) / "adapter.safetensors"
        with safe_open(str(path), "pt") as handle:
            tensors = [handle.get_slice(key) for key in handle.keys()]
            result["adapter_params"] = sum(int(torch.Size(t.get_shape()).numel()) for t in tensors)
            result["adapter_dtypes"] = sorted({t.get_dtype() for t in tensors})
        result["adapter_bytes"] = path.stat().st_size
        result["steps"] = catalog.concept(items[0]).train.steps
    if args.worker == "fuse":
        result["gram_bytes"] = extra["gram"]["bytes"]
        result["fused_bytes"] = (layout.fused(items[0]) / "adapter.safetensors").stat().st_size
    if args.worker == "generate":
        images = len(catalog.combination(items[0]).prompts) * len(catalog.combination(items[0]).seeds)
        result["images"] = images
    print("WORKER-RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------ the parent side
def write_catalog(folder: Path, resolution: int, args) -> Path:
    import yaml

    from conceptflow.methods import METHODS
    from conceptflow.methods.base import ConceptTrainConfig
    from conceptflow.toy.concepts import write_toy_catalog

    methods = list(METHODS)
    trained = trained_concepts(len(methods))
    path = write_toy_catalog(folder, list(trained), images_per_concept=3, base_model=BASE,
                             combinations={PAIR: CONCEPTS[:2], QUAD: CONCEPTS}, prompt_seeds=(0,))
    catalog = yaml.safe_load(path.read_text())
    fields = ConceptTrainConfig.model_fields
    for index, name in enumerate(trained):
        train = {"method": methods[index % len(methods)], "steps": args.steps, "batch_size": 1,
                 "checkpoint_every": 10_000, "log_every": 1}
        if "mixed_precision" in fields:
            train["mixed_precision"] = args.mixed_precision
        elif args.mixed_precision != "no":
            raise SystemExit("this checkout's training config has no mixed_precision field")
        if "gradient_checkpointing" in fields:
            train["gradient_checkpointing"] = args.gradient_checkpointing
        elif args.gradient_checkpointing:
            raise SystemExit("this checkout's training config has no gradient_checkpointing field")
        catalog["concepts"][name]["train"] = train
    for combination in catalog["combinations"].values():
        combination["prompts"] = combination["prompts"][:1]
    catalog.update(resolution=resolution, fuse={"method": "gradient", "solver": "closed_form"},
                   mask={"backend": "saliency"},
                   ingest={"min_side_fraction": 0},  # the toy renders are 64 px: upscaled on purpose here
                   generate={"steps": args.sample_steps, "batch_size": 1, "guidance_scale": 7.5,
                             "conceptflow_m": {"sama_start_step": 1}})
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def run_stage_subprocess(stage_name: str, catalog: Path, items: str, args, sampler: str | None = None):
    command = [sys.executable, __file__, "--worker", stage_name, "--catalog", str(catalog), "--item", items,
               "--threads", str(args.threads), "--capture-steps", str(args.capture_steps),
               "--capture-prompts", str(args.capture_prompts)]
    if sampler:
        command += ["--sampler", sampler]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("WORKER-RESULT "):
            return json.loads(line.removeprefix("WORKER-RESULT ")), None
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-25:])
    return {"seconds": time.perf_counter() - started}, tail


def _mb(value) -> str:
    if value < 0.1 * MB:  # a residual embedding or a few token rows: KB, not "0.0 MB"
        return f"{value / 1024:,.1f} KB"
    return f"{value / MB:,.1f} MB" if value < 1024 * MB else f"{value / 1024**3:,.2f} GB"


def describe(stage_name: str, label: str, result: dict, method: str | None = None) -> str:
    parts = []
    if "training" in result:
        parts.append(f"{result['training'] / result['steps']:.1f} s/step ({result['steps']} steps)")
        parts.append(f"adapter {_mb(result['adapter_bytes'])} ({result['adapter_params']:,} params, "
                     f"{'/'.join(result['adapter_dtypes'])})")
        if method in REFERENCE_SIZES:
            parts.append(f"ref: {REFERENCE_SIZES[method]}")
    if "fusion" in result:
        parts.append(f"fusion {result['fusion']:.1f} s, Grams {_mb(result['gram_bytes'])} (float64), "
                     f"fused file {_mb(result['fused_bytes'])}")
    if "sampling" in result:
        images = result["images"]
        plain = result.get("plain_sampling", 0.0)
        if plain:
            parts.append(f"{(result['sampling'] - plain) / images:.1f} s/image sampler "
                         f"(+ {plain / images:.1f} s/image for its plain comparison)")
        else:
            parts.append(f"{result['sampling'] / images:.1f} s/image")
    return "; ".join(parts)


def base_sizes() -> str:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptflow.models import embedded

    with torch.device("meta"):
        counts = {
            "unet": UNet2DConditionModel.from_config(embedded.SD15_UNET_CONFIG),
            "vae": AutoencoderKL.from_config(embedded.SD15_VAE_CONFIG),
            "text encoder": CLIPTextModel(CLIPTextConfig(**embedded.SD15_TEXT_CONFIG)),
        }
    return ", ".join(f"{name} {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M"
                     for name, model in counts.items())


def embedded_cache_folder() -> Path:
    from conceptflow.models.embedded import EMBEDDED_VERSION, cache_root

    return cache_root() / f"{BASE.removeprefix('embedded:')}-v{EMBEDDED_VERSION}"


def build_base() -> str:
    """Build (or find) the base in a subprocess (a fresh process: its peak RSS is the build's)."""
    cached = (embedded_cache_folder() / ".complete").is_file()
    code = ("import time, torch; torch.set_num_threads(2); t = time.perf_counter();"
            "from conceptflow.models.embedded import embedded_model_path;"
            f"p = embedded_model_path({BASE!r});"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1];"
            "print(p, time.perf_counter() - t, int(hwm) * 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    folder, seconds, rss = done.stdout.split()[-3:]
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    how = "found in the cache" if cached else "built"
    return f"{folder}: {_mb(size)} on disk (float16), {how} in {float(seconds):.0f} s, peak RSS {_mb(int(rss))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", default="256,512")
    parser.add_argument("--quick", action="store_true", help="256 px only, 1 training step, 1 capture step")
    parser.add_argument("--steps", type=int, default=2, help="training steps per concept")
    parser.add_argument("--sample-steps", type=int, default=2, help="denoising steps per image")
    parser.add_argument("--capture-steps", type=int, default=2, help="gradient fusion's UNet capture steps (it uses 20)")
    parser.add_argument("--capture-prompts", type=int, default=1,
                        help="of gradient fusion's 3 UNet capture prompts, how many (the Grams' size does not depend on it)")
    parser.add_argument("--only", default=None,
                        help="comma-separated stages to run after ingest and mask (e.g. train); without fuse, one "
                             "concept per method is trained")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the outputs here (default: a temp folder)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--catalog", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--item", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sampler", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.quick:
        args.resolutions, args.steps, args.capture_steps = "256", 1, 1
    resolutions = [int(r) for r in args.resolutions.split(",")]

    import torch

    from conceptflow.methods import METHODS
    from conceptflow.sample import SAMPLERS

    load_before = os.getloadavg()
    print(f"real-size benchmark on {BASE}: torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads} torch threads, load average {load_before[0]:.1f} at start"
          + (" (shared CPU: other processes were busy, timings include their contention)"
             if load_before[0] > 1.5 else ""))
    print(f"settings: {args.steps} training steps (batch 1), {args.sample_steps} sampling steps, gradient fusion "
          f"capturing {args.capture_steps} UNet steps x {args.capture_prompts} prompts (it uses 20 x 3), "
          f"mixed_precision={args.mixed_precision}, "
          f"gradient_checkpointing={args.gradient_checkpointing}, float32 weights")
    print(f"base: {base_sizes()}")
    print(f"base: {build_base()}")

    rows, failures, loads = [], [], []
    workdir_context = tempfile.TemporaryDirectory(prefix="real-size-") if args.workdir is None else None
    workdir = Path(workdir_context.name) if workdir_context else args.workdir
    methods = list(METHODS)
    for resolution in resolutions:
        catalog = write_catalog(workdir / f"{resolution}px", resolution, args)
        trained = trained_concepts(len(methods))
        plan = [("ingest", ",".join(trained), f"{len(trained)} concepts", None, None),
                ("mask", ",".join(trained), f"{len(trained)} concepts", None, None)]
        plan += [("train", name, f"{name} ({methods[i % len(methods)]})", None, methods[i % len(methods)])
                 for i, name in enumerate(trained)]
        plan += [("fuse", PAIR, "2 concepts", None, None), ("fuse", QUAD, "4 concepts", None, None)]
        plan += [("generate", PAIR, f"sampler {name}", name, None) for name in SAMPLERS]
        plan += [("evaluate", PAIR, "2 concepts", None, None)]
        if args.only:
            only = set(args.only.split(","))
            plan = [entry for entry in plan if entry[0] in only | {"ingest", "mask"}]
            if "fuse" not in only:
                plan = [entry for entry in plan if entry[0] != "train" or entry[1] in trained[:len(methods)]]
        for stage_name, items, label, sampler, method in plan:
            result, error = run_stage_subprocess(stage_name, catalog, items, args, sampler)
            loads.append(os.getloadavg()[0])
            status = "ok" if error is None else "FAILED"
            detail = describe(stage_name, label, result, method) if error is None else error.splitlines()[-1]
            line = (f"{resolution:>4} px  {stage_name:<9} {label:<34} {status:<6} {result['seconds']:>7.1f} s"
                    f"  load {result['load'] if 'load' in result else 0:>5.1f} s  peak RSS "
                    f"{_mb(result['maxrss']) if 'maxrss' in result else '-':>9}  {detail}")
            print(line, flush=True)
            rows.append(line)
            if error is not None:
                failures.append((resolution, stage_name, label, error))
    for resolution, stage_name, label, error in failures:
        print(f"\n--- {resolution} px {stage_name} {label} failed:\n{error}")
    print(f"load average during the run: mean {sum(loads) / len(loads):.1f}, max {max(loads):.1f} "
          f"(2 cores; > 2 means other processes shared them)")
    if workdir_context:
        workdir_context.cleanup()
    print(f"real-size stages ok = {len(rows) - len(failures)}/{len(rows)}")


if __name__ == "__main__":
    main()
