"""Newton: the serial answer to its tolerance, in a handful of sequential calls, or a clear refusal."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from arflow_solvers import Jacobi, Newton, NotCausalError, Plan, Status, init, solve_inverse
from toys import CausalLinear, CausalMLP, Explosive, serial_reference

sizes = st.fixed_dictionaries({
    "seq_len": st.integers(1, 10),
    "dim": st.integers(1, 3),
    "batch": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
})


def problem(seq_len, dim, batch, seed, kind="mlp"):
    block = CausalMLP(seq_len, dim, seed=seed) if kind == "mlp" else CausalLinear(seq_len, dim, seed=seed)
    z = torch.randn(batch, seq_len, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return block, z


def test_newton_is_one_solver_among_the_others():
    assert repr(Newton(tol=1e-6, max_iters=4)) == "Newton(tol=1e-06, max_iters=4)"
    plan = Plan(Jacobi(), {1: Newton(tol=1e-4, chunk_size=8)})
    assert Plan.from_dict(plan.to_dict()) == plan


@settings(max_examples=40, deadline=None)
@given(sizes, st.sampled_from([init.noise, init.zeros]), st.sampled_from(["mlp", "linear"]))
def test_newton_reaches_the_serial_answer_to_its_tolerance(size, x0, kind):
    block, z = problem(**size, kind=kind)
    x, stats = Newton(tol=1e-12, init=x0).solve(block, z)
    assert (x - serial_reference(block, z)).abs().max() <= 1e-9
    assert stats.worst == Status.CONVERGED and stats.passes <= size["seq_len"] + 1


@settings(max_examples=30, deadline=None)
@given(sizes, st.integers(1, 10))
def test_after_k_iterations_the_first_k_positions_are_serial(size, k):
    """Newton's finite termination: position t's update reads only positions before it."""
    block, z = problem(**size)
    x, _ = Newton(tol=1e-12, max_iters=k).solve(block, z)
    exact = min(k, size["seq_len"])
    assert (x[:, :exact] - serial_reference(block, z)[:, :exact]).abs().max() <= 1e-10


@settings(max_examples=30, deadline=None)
@given(sizes)
def test_on_a_linear_block_one_step_from_any_guess_is_the_answer(size):
    """The Jacobian is the block's own: Newton is exact on an update affine in x."""
    block, z = problem(**size, kind="linear")
    guess = torch.randn(z.shape, generator=torch.Generator().manual_seed(size["seed"] + 2), dtype=z.dtype) * 3
    x, stats = Newton(tol=1e-12, max_iters=1, init=lambda block, z, cond: guess).solve(block, z)
    assert (x - serial_reference(block, z)).abs().max() <= 1e-10
    assert stats.passes == 1


def test_a_strongly_coupled_block_takes_far_fewer_calls_than_jacobi():
    block = CausalMLP(24, 2, seed=3, weight_scale=3.0)
    z = torch.randn(4, 24, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = serial_reference(block, z)
    x_newton, newton = Newton(tol=1e-10).solve(block, z)
    x_jacobi, jacobi = Jacobi(tol=1e-10).solve(block, z)
    assert (x_newton - reference).abs().max() <= 1e-8 and (x_jacobi - reference).abs().max() <= 1e-8
    assert 2 * newton.passes <= jacobi.passes, (newton.passes, jacobi.passes)


def test_chunked_tangents_give_the_same_answer_in_more_calls():
    block, z = problem(6, 2, 2, seed=1)
    whole, one_call = Newton(tol=1e-12).solve(block, z)
    chunked, chunks = Newton(tol=1e-12, chunk_size=5).solve(block, z)
    assert torch.allclose(whole, chunked, atol=1e-13, rtol=0)
    assert chunks.passes == 3 * one_call.passes  # 12 tangents in chunks of 5


def test_per_sample_conditioning_follows_the_samples_still_iterating():
    block, z = problem(6, 1, 3, seed=2)
    cond = torch.tensor([0.0, 5.0, -3.0], dtype=torch.float64)
    x = solve_inverse(block, z, Newton(tol=1e-12), cond=cond)
    assert (x - serial_reference(block, z, cond)).abs().max() <= 1e-9


def test_a_sample_whose_step_blows_up_is_solved_serially_instead():
    z = torch.full((2, 12, 1), 0.1, dtype=torch.float64)
    z[1] = 0.02
    guess = lambda block, z, cond: torch.full_like(z, 30.0)  # exp(900) overflows
    x, stats = Newton(tol=1e-12, init=guess).solve(Explosive(), z)
    assert (x - serial_reference(Explosive(), z)).abs().max() <= 1e-12
    assert set(stats.status.tolist()) <= {Status.CONVERGED, Status.FELL_BACK} and Status.FELL_BACK in stats.status


def test_a_block_that_reads_its_own_row_is_refused_by_row():
    class Leaky:
        seq_len = 4

        def affine(self, x, cond=None):
            return 0.5 * x.roll(-1, dims=1), torch.zeros_like(x)

    with pytest.raises(NotCausalError, match="row 0 reads its own or a later row"):
        Newton().solve(Leaky(), torch.randn(2, 4, 1))


def test_a_block_without_forward_mode_derivatives_is_refused_by_name():
    class Opaque:
        seq_len = 3

        def affine(self, x, cond=None):
            return torch.from_numpy(x.detach().numpy() * 0), torch.zeros_like(x)

    with pytest.raises(TypeError, match="Newton needs forward-mode derivatives of Opaque's update"):
        Newton().solve(Opaque(), torch.randn(2, 3, 1))


@pytest.mark.parametrize("bad, message", [
    (dict(tol=0.0), "Newton needs tol > 0 or atol > 0"),
    (dict(max_iters=0), "max_iters must be None or an int >= 1"),
    (dict(chunk_size=True), "chunk_size must be None or an int >= 1"),
    (dict(patience=0), "patience must be an int >= 1"),
    (dict(init="noise"), "init must be callable"),
])
def test_bad_options_are_refused_by_name(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Newton(**bad)
