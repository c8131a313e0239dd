"""Layout boxes shared by the layout-aware samplers (Cones 2 layout guidance, Concept Conductor).

A box is (x0, y0, x1, y1) in relative image coordinates (0 <= x0 < x1 <= 1, same for y).
``default_boxes`` splits the image side by side (one full-height column per concept) for a
combination without a layout; ``box_masks`` turns boxes into (K, h, w) masks at any latent or
attention resolution (a position belongs to a box when its cell centre lies inside it).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from conceptflow.errors import ConceptflowError

Box = tuple[float, float, float, float]


def validate_box(name: str, box: Sequence[float]) -> Box:
    """The box as a float 4-tuple, or a ConceptflowError naming the concept and the fix."""
    if len(box) != 4:
        raise ConceptflowError(f"layout.{name}: a box is [x0, y0, x1, y1], got {list(box)!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ConceptflowError(f"layout.{name}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (relative "
                               f"coordinates), got {[x0, y0, x1, y1]!r}")
    return (x0, y0, x1, y1)


def default_boxes(concepts: Sequence[str]) -> dict[str, Box]:
    """Side-by-side full-height columns of equal width, in the given order (they partition the image)."""
    if not concepts:
        raise ConceptflowError("default_boxes needs at least one concept")
    k = len(concepts)
    return {name: (i / k, 0.0, (i + 1) / k, 1.0) for i, name in enumerate(concepts)}


def resolve_boxes(concepts: Sequence[str], boxes: Mapping[str, Sequence[float]] | None) -> dict[str, Box]:
    """The given boxes (validated, every concept needs one) or the default split."""
    if boxes is None:
        return default_boxes(concepts)
    missing = [name for name in concepts if name not in boxes]
    if missing:
        raise ConceptflowError(f"layout: no box for {missing}; give every concept of the prompt a box "
                               "or drop the layout for the default split")
    return {name: validate_box(name, boxes[name]) for name in concepts}


def box_masks(boxes: Mapping[str, Box], height: int, width: int | None = None) -> torch.Tensor:
    """(K, height, width) float {0, 1}: cell (r, c) is in a box when its centre is inside it."""
    width = height if width is None else width
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    masks = []
    for x0, y0, x1, y1 in boxes.values():
        inside_y = (ys >= y0) & (ys < y1)
        inside_x = (xs >= x0) & (xs < x1)
        masks.append((inside_y[:, None] & inside_x[None, :]).float())
    return torch.stack(masks)


def layer_masks(boxes: Mapping[str, Box], sequence_lengths: Sequence[int]) -> dict[int, torch.Tensor]:
    """Flattened (K, h*w) masks per attention sequence length (square maps, h = sqrt(length))."""
    out = {}
    for length in sequence_lengths:
        side = int(round(length ** 0.5))
        if side * side != length:
            raise ConceptflowError(f"attention sequence length {length} is not a square map")
        out[length] = box_masks(boxes, side).flatten(1)
    return out
