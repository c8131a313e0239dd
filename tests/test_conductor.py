"""Concept Conductor building blocks: fusion equation, mask refinement, step scaling."""

import pytest
import torch

from conceptflow.errors import ConceptflowError
from conceptflow.sample.conductor.config import ConductorConfig
from conceptflow.sample.conductor.fusion import fuse, resize_mask
from conceptflow.sample.conductor.masks import (bounding_box, candidates_from_labels, choose_masks, refine_masks,
                                                refine_step, resolve_overlaps)


def test_fusion_equation_hand_made():
    base = torch.full((1, 4, 1), 1.0)
    customs = torch.stack([torch.full((1, 4, 1), 10.0), torch.full((1, 4, 1), 100.0)])
    masks = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0.5]])
    out = fuse(base, customs, masks)[0, :, 0].tolist()
    assert out == [10.0, 100.0, 1.0, 0.5 * 1 + 0.5 * 100]


def test_fusion_overlap_later_concept_wins_as_the_reference():
    # reference AttnProcessor.merge: out <- c_i*M_i + out*(1-M_i) for i = 1..K
    base = torch.full((1, 2, 1), 1.0)
    customs = torch.stack([torch.full((1, 2, 1), 10.0), torch.full((1, 2, 1), 100.0)])
    masks = torch.tensor([[1.0, 0.5], [1.0, 0.5]])
    out = fuse(base, customs, masks)[0, :, 0].tolist()
    # position 0: both masks 1 -> the second concept (the sum form would give -1 + 10 + 100)
    # position 1: 100*0.5 + (10*0.5 + 1*0.5)*0.5
    assert out == [100.0, 52.75]


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


def test_resize_mask_antialiases_when_shrinking():
    # row [0,1,1,0] -> 2: the antialiased triangle filter (support 2) weighs pixels .75,.75,.25 -> 1/1.75 > 0.5;
    # plain bilinear would sample 0.5 (between pixels 0 and 1) and give 0
    m = torch.tensor([0, 1, 1, 0.0]).repeat(4, 1)[None]
    assert resize_mask(m, 2).tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_choose_masks_best_iou_first_wins_and_bbox_fallback():
    # 3x3 grid; previous of concept 0 is an L shape, of concept 1 the bottom-right corner
    prev = torch.zeros(2, 9)
    prev[0, [0, 3, 6, 7]] = 1
    prev[1, 8] = 1
    cand = torch.zeros(3, 9)
    cand[0, [0, 3]] = 1   # IoU with L = 2/4
    cand[1, [6, 7]] = 1   # IoU with L = 2/4 (tie: the first, candidate 0, wins)
    cand[2, [5, 8]] = 1   # IoU with corner = 1/2
    out = choose_masks(cand, prev, overlap_threshold=0.5)
    assert torch.equal(out, cand[[0, 2]])
    out = choose_masks(cand, prev, overlap_threshold=0.6)  # both below: bounding boxes of the previous masks
    assert out[0].tolist() == [1, 1, 0, 1, 1, 0, 1, 1, 0] and out[1].tolist() == prev[1].tolist()
    assert torch.equal(bounding_box(prev[0], (3, 3)), out[0])
    boxes = torch.ones(2, 9)
    assert torch.equal(choose_masks(cand, prev, 0.6, boxes=boxes), boxes)  # an explicit box replaces the bbox
    # threshold 0 (the reference sample config): never falls back, even at IoU 0
    assert torch.equal(choose_masks(cand[:2], prev[1:], 0.0), cand[:1])


def test_resolve_overlaps_keeps_old_mask_where_two_claim():
    new = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0]])
    old = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 1]])
    assert resolve_overlaps(new, old).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]


def test_refine_step_unions_branch_and_base_choices_per_resolution():
    # 2x2 attention grid, 2 concepts; labels given (as if from k-means with 3 clusters)
    labels_base = torch.tensor([0, 1, 2, 2])
    labels_c0 = torch.tensor([0, 0, 1, 2])
    labels_c1 = torch.tensor([2, 1, 0, 0])
    cand = lambda lab: candidates_from_labels([lab], [3])
    prev = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]])
    fused_prev = {2: prev.clone(), 4: resize_mask(prev.reshape(2, 2, 2), 4)}
    custom, base, fused = refine_step([cand(labels_c0), cand(labels_c1)], cand(labels_base), prev, prev,
                                      fused_prev, overlap_threshold=0.4, size=(2, 2))
    assert custom.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]   # IoU 1/2 each
    assert base.tolist() == [[1, 0, 0, 0], [0, 0, 1, 1]]     # IoU 1 and 1/2
    # unions [1,1,0,0] and [0,0,1,1] are disjoint: taken as they are, at both resolutions
    assert fused[2].tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert torch.equal(fused[4], resize_mask(fused[2].reshape(2, 2, 2), 4))
    # concept 1's branch now takes [0,1,1,1] (IoU 1/3 >= 0.3), claiming position 1 too: there both keep
    # the old fusion mask (0 for both)
    labels_c1 = torch.tensor([2, 0, 0, 0])
    custom, _, fused = refine_step([cand(labels_c0), cand(labels_c1)], cand(labels_base), prev, prev,
                                   fused_prev, overlap_threshold=0.3, size=(2, 2))
    assert custom[1].tolist() == [0, 1, 1, 1]
    assert fused[2].tolist() == [[1, 0, 0, 0], [0, 0, 1, 1]]


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
    assert ConductorConfig().step_indices(200) == (61, list(range(50, 81, 5)))
    assert ConductorConfig().step_indices(20) == (7, [5, 6, 7, 8])
    assert ConductorConfig(alignment_end_fraction=0).step_indices(20)[0] == 0
