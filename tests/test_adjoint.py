"""Gradients through a solve equal autograd through serial inversion, at the cost of one graph per block."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from arflow_solvers import Flow, GSJacobi, Jacobi, Permute, Serial, init, solve, solve_inverse
from arflow_solvers.adapters.made import MADE
from arflow_solvers.adjoint import AdjointError, update

F64 = torch.float64


def serial_with_graph(flow, z, cond=None):
    """The reference: serial inversion written with out-of-place ops, differentiated by autograd."""
    x = z
    for step in flow:
        if not hasattr(step, "seq_len"):
            x = step(x, cond)
            continue
        rows = torch.zeros_like(x)
        for t in range(x.shape[1]):
            row = update(step, rows, x, cond)[:, t:t + 1]
            rows = torch.cat([rows[:, :t], row, rows[:, t + 1:]], dim=1)
        x = rows
    return x


def made(features, hidden, seed, context=None):
    torch.manual_seed(seed)
    block = MADE(features, hidden, context_features=context).to(F64)
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(1.5)  # away from the near-identity initialisation, so gradients are not trivial
    return block


def gradients(x, inputs, seed=0):
    weights = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((weights * x).sum() + (x**2).sum(), inputs)


def assert_close(got, expected, tol=1e-8):
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= tol * (1 + b.abs().max()), (a - b).abs().max()


solvers = st.one_of(
    st.just(Serial()),
    st.builds(lambda tol, i: Jacobi(tol=tol, init=i), st.sampled_from([0.0, 1e-13]),
              st.sampled_from([init.noise, init.zeros, init.zeros_first_exact])),
    st.builds(lambda m: GSJacobi(m, tol=0.0), st.integers(1, 5)),
)


@settings(max_examples=20, deadline=None)
@given(features=st.integers(2, 7), hidden=st.lists(st.integers(4, 12), min_size=1, max_size=2),
       batch=st.integers(1, 3), solver=solvers, seed=st.integers(0, 1000))
def test_gradients_equal_autograd_through_serial_for_any_solver(features, hidden, batch, solver, seed):
    block = made(features, hidden, seed)
    z = torch.randn(batch, features, 1, dtype=F64, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    inputs = [z, *block.parameters()]
    expected = gradients(serial_with_graph(Flow([block]), z), inputs, seed)
    got = gradients(solve(block, z, solver).x, inputs, seed)
    assert_close(got, expected)


def test_the_adjoint_is_solved_on_the_forward_plans_segments_last_first():
    from arflow_solvers.adjoint import adjoint_segments

    block = made(6, [10], 3)
    z = torch.randn(2, 6, 1, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    inputs = [z, *block.parameters()]
    expected = gradients(serial_with_graph(Flow([block]), z), inputs)
    solution = solve(block, z, GSJacobi(6, tol=0.0))  # one row per segment: one iteration each
    assert_close(gradients(solution.x, inputs), expected)
    assert solution.adjoint[0].iterations == 6
    assert adjoint_segments(Serial(), tuple((t, t + 1) for t in range(6)), 6) == ((0, 6),)


def test_gradients_flow_through_conditioning_and_a_whole_flow_with_permutations():
    first, second = made(5, [10], 1, context=3), made(5, [10], 2, context=3)
    flow = Flow([first, Permute([4, 2, 0, 1, 3]), second, lambda x, cond=None: 2.0 * x])
    z = torch.randn(4, 5, 1, dtype=F64, requires_grad=True)
    cond = torch.randn(4, 3, dtype=F64, requires_grad=True)
    inputs = [z, cond, *first.parameters(), *second.parameters()]
    expected = gradients(serial_with_graph(flow, z, cond), inputs)
    sol = solve(flow, z, GSJacobi(2, tol=0.0), cond=cond)
    assert_close(gradients(sol.x, inputs), expected)
    assert [a.iterations is not None and a.iterations <= 5 for a in sol.adjoint] == [True, True]


def test_gradcheck_on_a_small_block():
    block = made(4, [6], 3)

    def sample(z):
        return solve_inverse(block, z, Jacobi(tol=0.0))

    z = torch.randn(2, 4, 1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(sample, (z,))


def test_a_tolerance_stopped_adjoint_is_within_its_tolerance():
    block = made(12, [24], 4)
    z = torch.randn(3, 12, 1, dtype=F64, requires_grad=True)
    inputs = [z, *block.parameters()]
    expected = gradients(serial_with_graph(Flow([block]), z), inputs)
    sol = solve(block, z, Jacobi(tol=0.0), adjoint_tol=1e-6)
    got = gradients(sol.x, inputs)
    worst = max(float(((a - b).abs().max() / b.abs().max())) for a, b in zip(got, expected))
    assert worst <= 1e-5
    assert sol.adjoint[0].iterations <= 12


def test_nothing_is_recorded_when_nothing_needs_a_gradient():
    block = made(5, [8], 5)
    z = torch.randn(2, 5, 1, dtype=F64)
    with torch.no_grad():
        assert not solve(block, z, Jacobi()).x.requires_grad
    block.requires_grad_(False)
    sol = solve(block, z, Jacobi())
    assert not sol.x.requires_grad and sol.adjoint == ()


def test_double_backward_is_refused_with_a_clear_error():
    block = made(4, [6], 6)
    z = torch.randn(2, 4, 1, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot differentiate twice through a solve"):
        torch.autograd.grad(solve_inverse(block, z, Jacobi(tol=0.0)).sum(), z, create_graph=True)


def test_a_non_finite_adjoint_is_an_error_never_a_nan_gradient():
    class Gain:  # x_t = z_t + gain * x_{t-1}: finite forward, but a huge loss gradient overflows
        seq_len = 4

        def __init__(self):
            self.gain = torch.tensor(10.0, dtype=F64, requires_grad=True)

        def parameters(self):
            return [self.gain]

        def affine(self, x, cond=None):
            previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
            return self.gain * previous, torch.zeros_like(x)

    z = torch.ones(1, 4, 1, dtype=F64, requires_grad=True)
    x = solve_inverse(Gain(), z, Jacobi(tol=0.0))
    weights = torch.tensor([0.0, 0.0, 0.0, 1e308], dtype=F64).reshape(1, 4, 1)
    with pytest.raises(AdjointError, match="block 0 became non-finite"):
        (x * weights).sum().backward()


def test_a_tarflow_differentiates_with_respect_to_its_weights_and_noise():
    from arflow_solvers.adapters.tarflow import TarFlow, as_flow

    torch.manual_seed(0)
    model = TarFlow(1, 4, 2, channels=64, num_blocks=2, layers_per_block=1).to(F64)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)  # the public init zeroes it: make blocks do something
    flow = as_flow(model)
    z = torch.randn(2, 4, 4, dtype=F64, requires_grad=True)
    inputs = [z, *model.parameters()]
    expected = gradients(serial_with_graph(flow, z), inputs)
    got = gradients(solve(flow, z, Jacobi(tol=0.0)).x, inputs)
    assert_close(got, expected)
