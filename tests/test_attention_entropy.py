import math

import pytest
import torch

from conceptflow.metrics.attention_entropy import entropy_change, map_entropy


def test_uniform_map_has_log_n_entropy():
    assert map_entropy(torch.zeros(4, 4)).item() == pytest.approx(math.log(16))


def test_hand_computed_two_pixel_map():
    # softmax([0, log 3]) = [1/4, 3/4]
    m = torch.tensor([[0.0, math.log(3.0)]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert map_entropy(m).item() == pytest.approx(expected)


def test_entropy_change_is_mean_step_difference():
    steps = torch.stack([torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2)])
    h0 = math.log(2)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_change(steps).item() == pytest.approx(((h1 - h0) + (h0 - h1)) / 2)
    with pytest.raises(ValueError):
        entropy_change(torch.zeros(1, 2, 2))
