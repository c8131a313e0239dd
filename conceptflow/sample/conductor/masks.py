"""Mask refinement of Concept Conductor, with the semantics of the reference
(Nihukat/Concept-Conductor ``attention_processor.py``: ``get_masks_from_attn``, ``choose_mask``,
``update_custom_masks``, ``refine_feature_masks``; checked by ``benchmarks/conductor_parity.py``).

k-means (scikit-learn; the reference uses torch_kmeans, so labels may differ) on the rows of the
head-averaged self-attention, for n..2n-1 clusters (n = prompts incl. base); each concept takes the
candidate cluster with the best IoU to its previous mask (first best wins); below
``overlap_threshold`` it takes the bounding box of its previous mask (or the given box). In the full
step (``refine_step``) a concept's mask is the union of the choice on its own branch's attention and
the choice on the base branch's attention, and positions claimed by two concepts keep the old mask,
at each resolution after resizing."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from conceptflow.errors import ConceptflowError
from conceptflow.sample.conductor.fusion import resize_mask


def kmeans_labels(self_attention: torch.Tensor, n_clusters: int, n_init: int = 100, seed: int = 0) -> torch.Tensor:
    """(N,) cluster labels of the N rows of one image's (N, N) self-attention."""
    rows = self_attention.detach().float().cpu().numpy()
    labels = KMeans(n_clusters=min(n_clusters, rows.shape[0]), n_init=n_init, random_state=seed).fit_predict(rows)
    return torch.from_numpy(labels.astype(np.int64))


def candidates_from_labels(labels: list[torch.Tensor], n_clusters: list[int]) -> torch.Tensor:
    """(C, N) binary candidate masks in the reference order: cluster counts ascending, labels
    0..k-1 within each (an empty label gives an empty candidate, as in the reference)."""
    return torch.cat([torch.stack([(lab == c).float() for c in range(k)]) for lab, k in zip(labels, n_clusters)])


def cluster_candidates(self_attention: torch.Tensor, n_prompts: int, n_init: int = 100,
                       seed: int = 0) -> torch.Tensor:
    """(C, N) candidates of k-means with n_prompts..2*n_prompts-1 clusters."""
    ks = list(range(n_prompts, 2 * n_prompts))
    return candidates_from_labels([kmeans_labels(self_attention, k, n_init, seed) for k in ks], ks)


def bounding_box(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The (N,) filled bounding box of an (N,) binary mask on an (h, w) grid (empty stays empty)."""
    grid = mask.reshape(size)
    box = torch.zeros_like(grid)
    nz = torch.nonzero(grid)
    if len(nz):
        (y0, x0), (y1, x1) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
        box[y0:y1 + 1, x0:x1 + 1] = 1
    return box.flatten()


def _side(n: int) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ConceptflowError(f"masks of {n} positions are not square: give size=(h, w)")
    return side, side


def choose_masks(candidates: torch.Tensor, previous: torch.Tensor, overlap_threshold: float,
                 boxes: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(K, N): per concept the candidate with the best IoU to its previous mask (strictly better
    replaces, so the first best wins), or, below ``overlap_threshold``, ``boxes[i]`` when given,
    else the bounding box of the previous mask (the reference)."""
    cand = (candidates > 0.5).float()
    prev = (previous > 0.5).float()
    inter = prev @ cand.T  # (K, C)
    union = prev.sum(1, keepdim=True) + cand.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    best, idx = iou.max(1)  # torch.max returns the first maximal index
    out = []
    for i in range(prev.shape[0]):
        if best[i] >= overlap_threshold:
            out.append(cand[idx[i]])
        elif boxes is not None:
            out.append((boxes[i] > 0.5).float())
        else:
            out.append(bounding_box(prev[i], size or _side(prev.shape[1])))
    return torch.stack(out)


def resolve_overlaps(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(K, N): where two or more new masks claim a position, every concept keeps its old mask there."""
    overlap = ((new > 0.5).float().sum(0) > 1).float()
    return old * overlap + new * (1 - overlap)


def refine_masks(self_attention: torch.Tensor, previous: torch.Tensor, boxes: torch.Tensor | None,
                 n_prompts: int, overlap_threshold: float = 0.5, n_init: int = 100,
                 seed: int = 0) -> torch.Tensor:
    """One attention source: self_attention (N, N) rows of one image (N = h*w); previous (K, N)
    and boxes (K, N) binary masks or None (fallback: bounding box of the previous mask).
    Returns the refined (K, N) binary masks, overlaps keeping the previous mask."""
    cand = cluster_candidates(self_attention, n_prompts, n_init, seed)
    prev = (previous.detach().cpu().float() > 0.5).float()
    new = choose_masks(cand, prev, overlap_threshold, None if boxes is None else boxes.detach().cpu())
    return resolve_overlaps(new, prev)


def refine_step(custom_candidates: list[torch.Tensor], base_candidates: torch.Tensor,
                custom_prev: torch.Tensor, base_prev: torch.Tensor, fused_prev: dict[int, torch.Tensor],
                overlap_threshold: float, size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """The reference's refinement step for K concepts at the attention resolution ``size`` (h, w).

    custom_candidates[i] (C, N): candidates of concept i's branch attention; base_candidates (C, N):
    of the base branch; custom_prev / base_prev (K, N): each source's previous choice; fused_prev
    {side: (K, side*side)}: the fusion masks at each square resolution. Returns the new custom and
    base choices and the new fusion masks: at each resolution the union of both choices resized
    (bilinear, antialiased, > 0.5), overlaps keeping that resolution's old mask."""
    custom = torch.stack([choose_masks(c, custom_prev[i:i + 1], overlap_threshold, size=size)[0]
                          for i, c in enumerate(custom_candidates)])
    base = choose_masks(base_candidates, base_prev, overlap_threshold, size=size)
    fused = {}
    for side, old in fused_prev.items():
        union = (resize_mask(custom.reshape(-1, *size), side) + resize_mask(base.reshape(-1, *size), side)).clamp(max=1)
        fused[side] = resolve_overlaps(union, old)
    return custom, base, fused
