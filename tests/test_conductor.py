"""Concept Conductor building blocks: fusion equation, mask refinement, step scaling."""

import pytest
import torch

from conceptflow.errors import ConceptflowError
from conceptflow.sample.conductor.config import ConductorConfig
from conceptflow.sample.conductor.fusion import fuse, resize_mask
from conceptflow.sample.conductor.masks import refine_masks


def test_fusion_equation_hand_made():
    base = torch.full((1, 4, 1), 1.0)
    customs = torch.stack([torch.full((1, 4, 1), 10.0), torch.full((1, 4, 1), 100.0)])
    masks = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0.5]])
    out = fuse(base, customs, masks)[0, :, 0].tolist()
    assert out == [10.0, 100.0, 1.0, 0.5 * 1 + 0.5 * 100]


def test_fusion_masks_zero_gives_base_and_bad_shapes_raise():
    base = torch.randn(2, 4, 3)
    assert torch.equal(fuse(base, torch.randn(1, 2, 4, 3), torch.zeros(1, 4)), base)
    with pytest.raises(ConceptflowError, match="masks"):
        fuse(base, torch.randn(1, 2, 4, 3), torch.zeros(1, 5))


def test_resize_mask_binarises():
    m = torch.zeros(1, 2, 2)
    m[0, 0, 0] = 1
    out = resize_mask(m, 4).reshape(4, 4)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert out[0, 0] == 1 and out[3, 3] == 0


def test_refine_masks_finds_blocks_and_masks_partition():
    # 16 positions: 0-5 one object, 6-11 another, 12-15 background; self-attention rows by block
    groups = torch.tensor([0] * 6 + [1] * 6 + [2] * 4)
    attention = (groups[:, None] == groups[None]).float() + 0.01 * torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    prev = torch.zeros(2, 16)
    prev[0, :5] = 1
    prev[1, 7:12] = 1
    boxes = prev.clone()
    new = refine_masks(attention, prev, boxes, n_prompts=3, n_init=5)
    assert new[0].nonzero().flatten().tolist() == list(range(6))
    assert new[1].nonzero().flatten().tolist() == list(range(6, 12))
    assert (new.sum(0) <= 1).all()  # disjoint: with the base's remainder they partition the image


def test_refine_masks_low_overlap_falls_back_to_box():
    attention = torch.eye(8)
    prev = torch.zeros(1, 8)
    prev[0, :4] = 1
    boxes = torch.zeros(1, 8)
    boxes[0, 4:] = 1
    new = refine_masks(attention, prev, boxes, n_prompts=2, overlap_threshold=0.9, n_init=2)
    assert torch.equal(new, boxes)


def test_step_indices_scale_to_step_count():
    assert ConductorConfig().step_indices(200) == (60, list(range(50, 81, 5)))
    assert ConductorConfig().step_indices(20) == (6, [5, 6, 7, 8])
