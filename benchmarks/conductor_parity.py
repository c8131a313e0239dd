"""Concept Conductor parity: the reference's mask refinement and attention-output fusion beside ours.

    python benchmarks/conductor_parity.py [--reference DIR] [--quick]

DIR (default: $CONDUCTOR_REFERENCE, else /tmp/conductor-ref) is a checkout of
Nihukat/Concept-Conductor; only ``concept_conductor/pipelines/attention_processor.py`` is read.
Its ``AttentionController`` class and ``AttnProcessor.merge`` are extracted from that file with
``ast`` at run time (nothing of it is copied here) and run on a stand-in controller, beside
``conceptflow.sample.conductor`` on the same random tensors:

- refinement (``update_custom_masks`` + ``refine_feature_masks``): several seeds, attention
  sizes, K = 2 and 3, overlap thresholds 0 / 0.5 / 0.7 / 0.9, three rounds each so previous masks
  become refined shapes. Both sides get the same k-means labels (ours, scikit-learn), so the
  IoU choice, the bounding-box fallback, the union of branch and base choices, the per-resolution
  resize and the overlap rule are compared exactly;
- mask resizing (``store_masks`` vs ``resize_mask``) on binary and soft masks;
- fusion (``merge`` vs ``fuse``) on binary overlapping and soft masks;
- k-means itself: the reference's torch_kmeans labels vs ours (a different algorithm and random
  init: reported as label agreement, not as a difference). Needs torch-kmeans importable, or
  installed in DIR/_deps (``pip install --no-deps --target DIR/_deps torch-kmeans==0.2.0``).

Last line: ``conductor parity max diff = x`` (the largest difference of the exact comparisons).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import itertools
import os
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from conceptflow.sample.conductor.fusion import fuse, resize_mask
from conceptflow.sample.conductor.masks import candidates_from_labels, kmeans_labels, refine_step

REFERENCE_FILE = Path("concept_conductor/pipelines/attention_processor.py")
MASK_LAYER = "up_blocks.2.attentions.2.transformer_blocks.0.attn1.processor"
FACTORS = (1, 2, 4, 8)  # the reference keeps masks at h_min * factor, the attention at factor 4
HOW_TO_GET = ("get the reference: git clone https://github.com/Nihukat/Concept-Conductor /tmp/conductor-ref "
              "(or the fetch tool + git archive into that folder); optional, for the k-means label agreement: "
              "pip install --no-deps --target /tmp/conductor-ref/_deps torch-kmeans==0.2.0")


def find_reference(path: str | None) -> Path | None:
    root = Path(path or os.environ.get("CONDUCTOR_REFERENCE") or "/tmp/conductor-ref")
    return root if (root / REFERENCE_FILE).is_file() else None


class _NoKMeans:
    def __init__(self, *a, **k):
        raise RuntimeError("torch_kmeans is not installed (the reference's k-means)")


def load_reference(root: Path) -> types.SimpleNamespace:
    """AttentionController and AttnProcessor.merge, compiled from the reference file at run time."""
    deps = root / "_deps"
    if deps.is_dir() and str(deps) not in sys.path:
        sys.path.insert(0, str(deps))
    try:
        from torch_kmeans import KMeans
    except ImportError:
        KMeans = _NoKMeans
    from PIL import Image
    from torchvision import transforms

    source = (root / REFERENCE_FILE).read_text()
    tree = ast.parse(source)
    wanted = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "AttentionController":
            wanted.append(node)
        if isinstance(node, ast.ClassDef) and node.name == "AttnProcessor":
            wanted += [f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "merge"]
    if len(wanted) != 2:
        raise SystemExit(f"{root / REFERENCE_FILE}: AttentionController / AttnProcessor.merge not found")
    # gc.collect() (called after every mask operation there) only frees memory: a no-op here, for speed
    namespace = {"torch": torch, "np": np, "gc": types.SimpleNamespace(collect=lambda: 0), "transforms": transforms, "KMeans": KMeans,
                 "Image": Image, "Path": Path, "gen_n_colors": None}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(root / REFERENCE_FILE), "exec"), namespace)
    return types.SimpleNamespace(Controller=namespace["AttentionController"], merge=namespace["merge"],
                                 has_kmeans=KMeans is not _NoKMeans)


def controller(ref, side: int, k: int, threshold: float = 0.5, n_init: int = 100):
    ops = defaultdict(lambda: defaultdict(list))
    ops[MASK_LAYER]["attention_probs"].append("mask")
    return ref.Controller(ops_dict=ops, w_min=side // 4, h_min=side // 4, all_token_ids=[[1]] * (k + 1),
                          mask_overlap_threshold=threshold, num_kmeans_init=n_init, device="cpu",
                          dtype=torch.float32)


# ---- synthetic inputs ---------------------------------------------------------------------------

def random_objects(side: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(k, 4) random ellipses (cy, cx, ry, rx) on a side x side grid, free to overlap."""
    centre = torch.rand(k, 2, generator=gen) * side * 0.6 + side * 0.2
    radii = torch.rand(k, 2, generator=gen) * side * 0.2 + side * 0.15
    return torch.cat([centre, radii], 1)


def layout(objects: torch.Tensor, side: int, jitter: float = 0.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """(side, side) region ids: the ellipses (later ones on top, centres moved by up to ``jitter``)
    on background 0 (non-rectangular shapes, so a bounding box differs from the shape)."""
    y, x = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    ids = torch.zeros(side, side, dtype=torch.long)
    for i, (cy, cx, ry, rx) in enumerate(objects.tolist(), start=1):
        if jitter:
            cy, cx = (torch.tensor([cy, cx]) + jitter * (2 * torch.rand(2, generator=gen) - 1)).tolist()
        ids[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = i
    return ids


def self_attention(ids: torch.Tensor, gen: torch.Generator, noise: float = 0.6) -> torch.Tensor:
    """(N, N) row-stochastic self-attention with blocks by region and a spatial falloff."""
    side = ids.shape[0]
    flat = ids.flatten()
    yx = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2).float()
    dist = torch.cdist(yx, yx) / side
    logits = 4.0 * (flat[:, None] == flat[None]).float() - 3.0 * dist + noise * torch.randn(len(flat), len(flat), generator=gen)
    return logits.softmax(-1)


def initial_masks(objects: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """(k, 2*side, 2*side) initial masks at the reference's init resolution (8 * h_min): each
    ellipse's box, grown or shrunk by up to a position per side (a rough layout box; boxes of
    nearby objects overlap)."""
    big = 2 * side
    out = torch.zeros(len(objects), big, big)
    for i, (cy, cx, ry, rx) in enumerate(objects.tolist()):
        d = torch.randint(-2, 3, (4,), generator=gen).tolist()
        y0, y1 = max(0, int(2 * (cy - ry)) + d[0]), min(big, int(2 * (cy + ry)) + d[1])
        x0, x1 = max(0, int(2 * (cx - rx)) + d[2]), min(big, int(2 * (cx + rx)) + d[3])
        out[i, y0:max(y1, y0 + 2), x0:max(x1, x0 + 2)] = 1
    return out


# ---- comparisons ---------------------------------------------------------------------------------

def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def compare_refinement(ref, side: int, k: int, seed: int, threshold: float, rounds: int = 3,
                       n_init: int = 4) -> dict:
    """Reference update_custom_masks + refine_feature_masks vs our refine_step, same k-means labels."""
    gen = torch.Generator().manual_seed(seed)
    objects = random_objects(side, k, gen)
    h_min = side // 4
    sides = [h_min * f for f in FACTORS]
    ctrl = controller(ref, side, k, threshold)
    init = initial_masks(objects, side, gen)
    ctrl.init_feature_masks(feature_masks=[m[None] for m in init], bs=1)
    # ours: the same initial state, resized by resize_mask
    custom_prev = base_prev = resize_mask(init, side)
    fused = {s: resize_mask(init, s) for s in sides}
    init_diff = max(_max_diff(fused[s][i], ctrl.extract(i + 1, "", f"feature_mask_{f}")[0, :, 0])
                    for f, s in zip(FACTORS, sides) for i in range(k))
    ks = list(range(k + 1, 2 * (k + 1)))
    diffs, fallbacks, choices = [init_diff], 0, 0
    for r in range(rounds):
        # branch 0 = base; every branch draws the objects a little elsewhere (its own layout)
        attns = [self_attention(layout(objects, side, jitter=side / 8, gen=gen), gen) for _ in range(k + 1)]
        labels = [{n: kmeans_labels(a, n, n_init=n_init, seed=seed + r) for n in ks} for a in attns]
        table = [(a, lab) for a, lab in zip(attns, labels)]

        def patched_kmeans(batch_attn, num_clusters=6):
            for a, lab in table:
                if torch.equal(batch_attn[0], a):
                    return lab[num_clusters][None]
            raise AssertionError("attention not found")

        ctrl.kmeans_cluster = patched_kmeans
        for b, a in enumerate(attns):
            ctrl.store(b, MASK_LAYER, "attention_probs", a[None])
        try:
            ctrl.refine_feature_masks()
        except IndexError:  # the reference's box fallback fails on an empty previous mask (ours keeps it empty)
            return {"diff": max(diffs), "choices": choices, "fallbacks": fallbacks, "reference_failed": 1}

        cands = [candidates_from_labels([lab[n] for n in ks], ks) for lab in labels]
        custom, base, fused = refine_step(cands[1:], cands[0], custom_prev, base_prev, fused, threshold, (side, side))
        custom_prev, base_prev = custom, base
        for i in range(k):
            diffs.append(_max_diff(custom[i], ctrl.extract(i + 1, "", "custom_feature_mask_4")[0, :, 0]))
            diffs.append(_max_diff(base[i], ctrl.extract(i + 1, "", "base_feature_mask_4")[0, :, 0]))
            for f, s in zip(FACTORS, sides):
                diffs.append(_max_diff(fused[s][i], ctrl.extract(i + 1, "", f"feature_mask_{f}")[0, :, 0]))
            for c, chosen in ((cands[i + 1], custom[i]), (cands[0], base[i])):
                choices += 1
                fallbacks += int(not any(torch.equal(chosen, row) for row in c))
    return {"diff": max(diffs), "choices": choices, "fallbacks": fallbacks, "reference_failed": 0}


def compare_resize(ref, side: int, k: int, seed: int) -> float:
    """Reference store_masks (torchvision Resize, > 0.5) vs resize_mask, binary and soft masks."""
    gen = torch.Generator().manual_seed(seed)
    h_min = side // 8
    worst = 0.0
    for soft in (False, True):
        m = torch.rand(k, side, side, generator=gen)
        if not soft:
            m = (torch.nn.functional.avg_pool2d(m[None], 3, 1, 1)[0] > 0.5).float()
        ctrl = controller(ref, 4 * h_min, k)
        ctrl.store_masks(1, m[None].clone())  # the reference binarises a same-size resize in place
        for f in FACTORS:
            theirs = ctrl.extract(1, "", f"feature_mask_{f}")[0].T  # (k, N)
            worst = max(worst, _max_diff(resize_mask(m, h_min * f), theirs))
    return worst


def compare_fusion(ref, side: int, k: int, seed: int, channels: int = 8) -> float:
    """Reference AttnProcessor.merge (cond+uncond batch) vs fuse, overlapping binary and soft masks."""
    gen = torch.Generator().manual_seed(seed)
    n = side * side
    worst = 0.0
    for soft in (False, True):
        base = torch.randn(2, n, channels, generator=gen)
        customs = torch.randn(k, 2, n, channels, generator=gen)
        masks = torch.rand(k, n, generator=gen)
        masks = masks if soft else (masks > 0.4).float()  # binary masks overlap in ~1/3 of positions
        ctrl = controller(ref, side, k)  # h_min = side // 4: this layer is at factor 4
        for b in (0, "ref"):
            ctrl.storage[b] = {}
        name = "up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
        for i in range(k):
            ctrl.store(i + 1, name, "feature_output", customs[i])
            ctrl.store(i + 1, "", "feature_mask_4", masks[i][None, :, None])
        stand_in = types.SimpleNamespace(attention_controller=ctrl, processor_name=name)
        worst = max(worst, _max_diff(ref.merge(stand_in, base, "feature_output"), fuse(base, customs, masks)))
    return worst


def label_agreement(ref, side: int, k: int, seed: int, n_init: int, noise: float) -> tuple[float, float]:
    """(best-permutation agreement, adjusted Rand index) of torch_kmeans (reference) vs ours."""
    gen = torch.Generator().manual_seed(seed)
    attn = self_attention(layout(random_objects(side, k, gen), side), gen, noise=noise)
    ctrl = controller(ref, side, k, n_init=n_init)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        theirs = ctrl.kmeans_cluster(attn[None], num_clusters=k + 1)[0].numpy()
    ours = kmeans_labels(attn, k + 1, n_init=n_init, seed=seed).numpy()
    table = np.zeros((k + 1, k + 1))
    np.add.at(table, (theirs, ours), 1)
    rows, cols = linear_sum_assignment(-table)
    return table[rows, cols].sum() / len(ours), adjusted_rand_score(theirs, ours)


def run(ref, quick: bool = False, out=print) -> float:
    seeds = [0, 1] if quick else [0, 1, 2, 3]
    sizes = [8] if quick else [8, 16]
    thresholds = [0.0, 0.7] if quick else [0.0, 0.5, 0.7, 0.9]
    worst = {"refinement": 0.0, "resize": 0.0, "fusion": 0.0}
    choices = fallbacks = failed = cases = 0
    for side, k, seed in itertools.product(sizes, (2, 3), seeds):
        for thr in thresholds:
            res = compare_refinement(ref, side, k, seed, thr, rounds=2 if quick else 3)
            worst["refinement"] = max(worst["refinement"], res["diff"])
            choices, fallbacks = choices + res["choices"], fallbacks + res["fallbacks"]
            cases, failed = cases + 1, failed + res["reference_failed"]
        worst["resize"] = max(worst["resize"], compare_resize(ref, 2 * side, k, seed))
        worst["fusion"] = max(worst["fusion"], compare_fusion(ref, side, k, seed))
    out(f"cases: attention sizes {sizes} (squared), K in (2, 3), seeds {seeds}, thresholds {thresholds}")
    out(f"refinement (choice, bbox fallback, union, resize, overlaps; same labels) max abs diff = "
        f"{worst['refinement']:g}   [{cases} cases, {choices} choices, {fallbacks} box fallbacks; {failed} cases "
        "cut short where the reference's box fallback raises on an empty previous mask]")
    out(f"mask resize + binarisation (store_masks vs resize_mask) max abs diff = {worst['resize']:g}")
    out(f"attention-output fusion (merge vs fuse, overlapping and soft masks) max abs diff = {worst['fusion']:g}")
    if ref.has_kmeans:
        n_init = 10 if quick else 100
        for noise in (0.6, 2.0):
            agree = [label_agreement(ref, side, k, seed, n_init, noise)
                     for side, k, seed in itertools.product(sizes, (2, 3), seeds)]
            out(f"k-means labels torch_kmeans (reference) vs scikit-learn (ours), n_init {n_init}, attention "
                f"noise {noise}: agreement mean {np.mean([a for a, _ in agree]):.3f} min {min(a for a, _ in agree):.3f}, "
                f"ARI mean {np.mean([r for _, r in agree]):.3f} min {min(r for _, r in agree):.3f} "
                "(not a diff: other algorithm and init)")
    else:
        out("k-means label agreement skipped: torch_kmeans not importable (" + HOW_TO_GET.split("; ")[1] + ")")
    total = max(worst.values())
    out(f"conductor parity max diff = {total:g}")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=None, help="Concept-Conductor checkout "
                        "(default: $CONDUCTOR_REFERENCE or /tmp/conductor-ref)")
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    args = parser.parse_args()
    root = find_reference(args.reference)
    if root is None:
        print(HOW_TO_GET)
        print("parity skipped: reference not found")
        return
    torch.manual_seed(0)
    run(load_reference(root), quick=args.quick)


if __name__ == "__main__":
    main()
