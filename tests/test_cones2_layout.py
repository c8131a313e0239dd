import pytest
import torch

from conceptflow.errors import ConceptflowError
from conceptflow.sample.boxes import box_masks, default_boxes, layer_masks, resolve_boxes


def test_default_split_partitions_the_image():
    for k in (1, 2, 3):
        masks = box_masks(default_boxes([f"c{i}" for i in range(k)]), 12)
        assert torch.equal(masks.sum(0), torch.ones(12, 12))
    assert default_boxes(["a", "b"]) == {"a": (0.0, 0.0, 0.5, 1.0), "b": (0.5, 0.0, 1.0, 1.0)}


def test_box_masks_hand_computed():
    masks = box_masks({"a": (0.0, 0.0, 0.5, 0.5)}, 4)
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 1
    assert torch.equal(masks[0], expected)
    assert layer_masks({"a": (0.0, 0.0, 0.5, 0.5)}, [16])[16].shape == (1, 16)


@pytest.mark.parametrize("box", [[0.5, 0, 0.2, 1], [0, 0, 1.5, 1], [0, 0, 1]])
def test_box_validation_errors(box):
    with pytest.raises(ConceptflowError, match="layout.a"):
        resolve_boxes(["a"], {"a": box})


def test_missing_box_is_an_error():
    with pytest.raises(ConceptflowError, match="no box"):
        resolve_boxes(["a", "b"], {"a": [0, 0, 1, 1]})
