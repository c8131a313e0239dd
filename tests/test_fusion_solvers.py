"""Gradient fusion math: closed form (Eq. 3) vs the stacked least-squares problem, gradient
descent and L-BFGS; GramRecorder against the inputs it saw. All in float64 on tiny matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conceptflow.fuse.gram import GramRecorder
from conceptflow.fuse.solvers import closed_form_fuse, fusion_objective, lbfgs_fuse

D_OUT, D_IN = 5, 8


def random_inputs(generator: torch.Generator, rank: int, tokens: int, d_in: int = D_IN) -> torch.Tensor:
    """X (d_in × tokens) of exactly ``rank`` (exactly in float64: a product of two thin factors)."""
    left = torch.randn(d_in, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, tokens, generator=generator, dtype=torch.float64)
    return left @ right


def make_problem(seed: int, ranks: tuple[int, ...], tokens: int = 6, d_in: int = D_IN):
    """W0, LoRA-like deltas (rank 2) and per-concept inputs X_i of the given ranks."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(D_OUT, d_in, generator=generator, dtype=torch.float64)
    deltas = [torch.randn(D_OUT, 2, generator=generator, dtype=torch.float64)
              @ torch.randn(2, d_in, generator=generator, dtype=torch.float64) for _ in ranks]
    inputs = [random_inputs(generator, rank, tokens, d_in) for rank in ranks]
    return base, deltas, inputs


def grams_of(inputs):
    return [x @ x.T for x in inputs]


def nearest_minimiser_by_lstsq(base, deltas, inputs):
    """Minimum-norm least squares of the stacked problem  D [X_1 … X_k] = [ΔW_1 X_1 … ΔW_k X_k]."""
    stacked_inputs = torch.cat(inputs, dim=1)
    stacked_targets = torch.cat([delta @ x for delta, x in zip(deltas, inputs)], dim=1)
    solution = torch.linalg.lstsq(stacked_inputs.T, stacked_targets.T, driver="gelsd").solution
    return base + solution.T


# (seed, input ranks per concept): total rank 8 = full, 5 and 3 = rank-deficient
PROBLEMS = [(0, (4, 4, 4)), (1, (2, 2, 1)), (2, (1, 2))]


@pytest.mark.parametrize("seed, ranks", PROBLEMS)
def test_closed_form_is_the_minimum_norm_least_squares_solution(seed, ranks):
    base, deltas, inputs = make_problem(seed, ranks)
    fused = closed_form_fuse(base, deltas, grams_of(inputs))
    expected = nearest_minimiser_by_lstsq(base, deltas, inputs)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed, ranks", PROBLEMS)
def test_closed_form_equals_long_gradient_descent_from_w0(seed, ranks):
    """Gradient steps from W0 stay in W0 + row space of G, so they converge to the nearest minimiser."""
    base, deltas, inputs = make_problem(seed, ranks)
    grams = grams_of(inputs)
    eigenvalues = torch.linalg.eigvalsh(sum(grams))
    positive = eigenvalues[eigenvalues > 1e-9 * eigenvalues[-1]]
    step = 1 / (2 * eigenvalues[-1])
    steps = int(40 * eigenvalues[-1] / positive[0]) + 1  # contraction (1 - λmin/λmax)^steps < e^-40
    weight = base.clone()
    for _ in range(min(steps, 200_000)):
        gradient = 2 * sum((weight - base - delta) @ gram for delta, gram in zip(deltas, grams))
        weight -= step * gradient
    torch.testing.assert_close(closed_form_fuse(base, deltas, grams), weight, rtol=0, atol=1e-8)


def test_rounding_noise_of_float32_inputs_is_cut_off_not_inverted():
    """Two concepts whose inputs span the same 2-d subspace conflict there; computed in float32
    the inputs are full rank up to ~1e-7 noise, and an exact pseudo-inverse "resolves" the
    conflict by fitting the noise with huge weights. The default cutoff gives the exact-rank answer."""
    generator = torch.Generator().manual_seed(3)
    base, deltas, _ = make_problem(3, (2, 2))
    shared = torch.randn(D_IN, 2, generator=generator, dtype=torch.float64)
    exact_inputs = [shared @ torch.randn(2, 10, generator=generator, dtype=torch.float64) for _ in deltas]
    float32_inputs = [x.float().double() for x in exact_inputs]
    fused = closed_form_fuse(base, deltas, grams_of(float32_inputs))
    unregularised = closed_form_fuse(base, deltas, grams_of(float32_inputs), rcond=0.0)
    assert (unregularised - base).norm() > 1e3 * (fused - base).norm()
    torch.testing.assert_close(fused, nearest_minimiser_by_lstsq(base, deltas, exact_inputs), rtol=0, atol=1e-5)


def test_fused_linear_reproduces_each_concept_on_orthogonal_input_subspaces():
    """Concepts whose inputs span orthogonal subspaces do not conflict: the fused layer gives every
    concept's own outputs on its inputs and W0's outputs on the rest."""
    generator = torch.Generator().manual_seed(4)
    d_in = 12
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)).Q
    subspaces = [basis[:, 3 * i: 3 * i + 3] for i in range(3)]  # the last 3 directions stay unused
    base_layer = nn.Linear(d_in, D_OUT).double()
    concept_layers, grams, concept_inputs = [], [], []
    for subspace in subspaces:
        layer = nn.Linear(d_in, D_OUT).double()
        layer.load_state_dict(base_layer.state_dict())
        with torch.no_grad():
            layer.weight += torch.randn(D_OUT, 2, generator=generator, dtype=torch.float64) @ torch.randn(
                2, d_in, generator=generator, dtype=torch.float64)
        inputs = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64) @ subspace.T  # (batch, tokens, d_in)
        with GramRecorder({"layer": base_layer}) as recorder:
            base_layer(inputs)
        concept_layers.append(layer)
        grams.append(recorder.grams["layer"])
        concept_inputs.append(inputs)

    deltas = [layer.weight.detach() - base_layer.weight.detach() for layer in concept_layers]
    fused_layer = nn.Linear(d_in, D_OUT).double()
    fused_layer.load_state_dict(base_layer.state_dict())
    with torch.no_grad():
        fused_layer.weight.copy_(closed_form_fuse(base_layer.weight, deltas, grams))
        for layer, inputs in zip(concept_layers, concept_inputs):
            torch.testing.assert_close(fused_layer(inputs), layer(inputs), rtol=0, atol=1e-10)
        unused = torch.randn(7, 3, generator=generator, dtype=torch.float64) @ basis[:, 9:].T
        torch.testing.assert_close(fused_layer(unused), base_layer(unused), rtol=0, atol=1e-10)
    assert fusion_objective(fused_layer.weight, base_layer.weight, deltas, grams) < 1e-18


def test_fusing_one_full_rank_concept_returns_its_merged_weight():
    base, deltas, inputs = make_problem(5, (8,), tokens=12)
    fused = closed_form_fuse(base, deltas, grams_of(inputs))
    torch.testing.assert_close(fused, base + deltas[0], rtol=0, atol=1e-10)


def test_fusing_one_rank_deficient_concept_merges_it_on_its_input_span_only():
    base, deltas, inputs = make_problem(6, (3,))
    fused = closed_form_fuse(base, deltas, grams_of(inputs))
    projector = inputs[0] @ torch.linalg.pinv(inputs[0])  # onto the span of the concept's inputs
    torch.testing.assert_close(fused, base + deltas[0] @ projector, rtol=0, atol=1e-10)
    torch.testing.assert_close(fused @ inputs[0], (base + deltas[0]) @ inputs[0], rtol=0, atol=1e-9)


def test_missing_delta_means_the_concept_keeps_w0_on_its_inputs():
    base, deltas, inputs = make_problem(7, (4, 4))
    fused_with_none = closed_form_fuse(base, [deltas[0], None], grams_of(inputs))
    fused_with_zero = closed_form_fuse(base, [deltas[0], torch.zeros_like(base)], grams_of(inputs))
    torch.testing.assert_close(fused_with_none, fused_with_zero, rtol=0, atol=0)


@pytest.mark.parametrize("seed, ranks", PROBLEMS)
def test_lbfgs_reaches_the_closed_form_optimum(seed, ranks):
    base, deltas, inputs = make_problem(seed, ranks)
    grams = grams_of(inputs)
    exact = closed_form_fuse(base, deltas, grams)
    iterative = lbfgs_fuse(base, deltas, grams, iterations=500, token_counts=[x.shape[1] for x in inputs])
    exact_objective = fusion_objective(exact, base, deltas, grams)
    start_objective = fusion_objective(base, base, deltas, grams)
    assert start_objective > 1.0  # the problem has something to solve
    assert fusion_objective(iterative, base, deltas, grams) <= exact_objective + 1e-9 * start_objective
    # L-BFGS directions are combinations of gradients, so it too stays nearest W0.
    torch.testing.assert_close(iterative, exact, rtol=0, atol=1e-5)


def test_fusion_objective_is_the_sum_of_squared_output_errors():
    base, deltas, inputs = make_problem(8, (3, 5))
    weight = base + torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expected = sum(((weight - base - delta) @ x).square().sum() for delta, x in zip(deltas, inputs))
    assert fusion_objective(weight, base, deltas, grams_of(inputs)) == pytest.approx(float(expected), rel=1e-12)


class ScaledAdapter(nn.Module):
    """A custom adapter around a linear layer, called with a keyword argument."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.up = nn.Linear(linear.in_features, linear.out_features, bias=False)

    def forward(self, hidden_states):
        return self.linear(hidden_states) + self.up(hidden_states)


def test_gram_recorder_accumulates_x_xt_over_all_rows_and_calls():
    torch.manual_seed(9)
    layer = nn.Linear(D_IN, D_OUT)
    first, second = torch.randn(2, 5, D_IN), torch.randn(3, D_IN)
    with GramRecorder({"layer": layer}) as recorder:
        layer(first)
        layer(second)
    layer(torch.randn(4, D_IN))  # after the context: not recorded
    rows = torch.cat([first.reshape(-1, D_IN), second]).double()
    torch.testing.assert_close(recorder.grams["layer"], rows.T @ rows, rtol=1e-12, atol=1e-12)
    assert recorder.counts["layer"] == 13 and recorder.grams["layer"].dtype == torch.float64


def test_gram_recorder_on_peft_lora_and_custom_adapters_and_with_a_token_mask():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(10)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(D_IN, D_OUT))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), model)
    adapter = ScaledAdapter(nn.Linear(D_IN, D_OUT))
    inputs = torch.randn(2, 6, D_IN)
    mask = torch.rand(2, 6) > 0.5
    with GramRecorder({"lora": model.proj, "lora_base": model.proj.base_layer, "adapter": adapter}) as recorder:
        model(inputs)
        adapter(hidden_states=inputs)
        with recorder.masked(mask):
            adapter(inputs)
    rows = inputs.reshape(-1, D_IN).double()
    for name in ("lora", "lora_base"):
        torch.testing.assert_close(recorder.grams[name], rows.T @ rows, rtol=1e-12, atol=1e-12)
    kept = inputs[mask].double()
    torch.testing.assert_close(recorder.grams["adapter"], rows.T @ rows + kept.T @ kept, rtol=1e-12, atol=1e-12)
    assert recorder.counts["adapter"] == 12 + int(mask.sum())
