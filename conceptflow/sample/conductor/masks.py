"""Mask refinement of Concept Conductor: k-means (scikit-learn) on self-attention rows; each concept
takes the cluster with the best IoU to its previous mask; below ``overlap_threshold`` it keeps its
box (fallback); positions claimed by two concepts keep the old mask."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def refine_masks(self_attention: torch.Tensor, previous: torch.Tensor, boxes: torch.Tensor,
                 n_prompts: int, overlap_threshold: float = 0.5, n_init: int = 100,
                 seed: int = 0) -> torch.Tensor:
    """self_attention (N, N) rows of one image (N = h*w); previous and boxes (K, N) binary masks.
    Tries n..2n-1 clusters (n = prompts incl. base) and returns the refined (K, N) binary masks."""
    rows = self_attention.detach().float().cpu().numpy()
    prev = previous.detach().cpu().numpy() > 0.5
    box = boxes.detach().cpu().numpy() > 0.5
    best = [(-1.0, None)] * prev.shape[0]
    for k in range(n_prompts, 2 * n_prompts):
        labels = KMeans(n_clusters=min(k, rows.shape[0]), n_init=n_init, random_state=seed).fit_predict(rows)
        for c in np.unique(labels):
            cluster = labels == c
            for i in range(prev.shape[0]):
                score = _iou(cluster, prev[i])
                if score > best[i][0]:
                    best[i] = (score, cluster)
    new = np.stack([cl if score >= overlap_threshold else box[i] for i, (score, cl) in enumerate(best)])
    overlap = new.sum(0) > 1
    new[:, overlap] = prev[:, overlap]
    return torch.from_numpy(new.astype(np.float32))
