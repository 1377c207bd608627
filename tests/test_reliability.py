"""Bad input raises errors that name the argument; divergence falls back to serial."""

import pytest
import torch

from arflow_solvers import (GSJacobi, Jacobi, Plan, Serial, SolveError, Status, Flow, Permute, solve,
                            solve_inverse)
from toys import CausalMLP, Explosive, Recurrence, serial_reference


def z_for(block, batch=2, dim=1, dtype=torch.float64):
    return torch.randn(batch, block.seq_len, dim, dtype=dtype, generator=torch.Generator().manual_seed(0))


def test_wrong_sequence_length_names_the_shape():
    block = CausalMLP(5, 2)
    with pytest.raises(ValueError, match=r"T=5"):
        solve_inverse(block, torch.zeros(1, 4, 2, dtype=torch.float64), Jacobi())


def test_non_finite_noise_is_rejected():
    block = CausalMLP(3, 1)
    z = z_for(block)
    z[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        solve_inverse(block, z, Jacobi())


def test_integer_noise_and_non_tensors_are_type_errors():
    block = CausalMLP(3, 1)
    with pytest.raises(TypeError, match="floating-point"):
        solve_inverse(block, torch.zeros(1, 3, 1, dtype=torch.long), Jacobi())
    with pytest.raises(TypeError, match="torch.Tensor"):
        solve_inverse(block, [[0.0]], Jacobi())


def test_objects_that_are_not_blocks_are_type_errors():
    with pytest.raises(TypeError, match="block_or_flow"):
        solve_inverse(object(), torch.zeros(1, 3, 1), Jacobi())


def test_a_block_returning_the_wrong_shape_is_named():
    class Broken:
        seq_len = 4
        def affine(self, x, cond=None):
            return x[:, :-1], x[:, :-1]
    with pytest.raises(ValueError, match=r"block.affine returned shape \(1, 3, 1\)"):
        solve_inverse(Broken(), torch.zeros(1, 4, 1), Jacobi())


def test_module_dtype_mismatch_is_a_type_error():
    linear = torch.nn.Linear(1, 2)

    class Module(torch.nn.Module):
        seq_len = 3
        def __init__(self):
            super().__init__()
            self.net = linear
        def affine(self, x, cond=None):
            return torch.zeros_like(x), torch.zeros_like(x)

    with pytest.raises(TypeError, match="float32 parameters but its input is torch.float64"):
        solve_inverse(Module(), torch.zeros(1, 3, 1, dtype=torch.float64), Jacobi())


@pytest.mark.parametrize("kwargs", [{"tol": -1.0}, {"max_iters": 0}, {"patience": 0}, {"init": 3}])
def test_bad_solver_options_raise(kwargs):
    with pytest.raises((ValueError, TypeError)):
        Jacobi(**kwargs)


@pytest.mark.parametrize("segments", [0, [3, 0], [], 2.5])
def test_bad_segments_raise(segments):
    with pytest.raises(ValueError, match="segments"):
        GSJacobi(segments)


def test_segment_lengths_must_cover_the_sequence():
    with pytest.raises(ValueError, match="sum to seq_len=5"):
        solve_inverse(CausalMLP(5, 1), torch.zeros(1, 5, 1, dtype=torch.float64), GSJacobi([2, 2]))


def test_empty_batch_returns_an_empty_result():
    block = CausalMLP(4, 2)
    sol = solve(block, torch.zeros(0, 4, 2, dtype=torch.float64), Jacobi())
    assert sol.x.shape == (0, 4, 2) and sol.status is Status.CONVERGED


def test_growing_residual_falls_back_and_still_returns_the_serial_answer():
    block = Recurrence(seq_len=24, gain=3.0)
    z = z_for(block)
    sol = solve(block, z, Jacobi(tol=1e-12))
    assert sol.status is Status.FELL_BACK
    expected = serial_reference(block, z)
    assert torch.allclose(sol.x, expected, rtol=1e-10, atol=0)


def test_non_finite_iterates_fall_back_without_leaking_nan():
    block = Explosive()
    z = torch.full((3, 12, 1), 0.01, dtype=torch.float64)
    huge_guess = lambda block, z, cond: torch.full_like(z, 30.0)
    sol = solve(block, z, GSJacobi(2, tol=1e-12, init=huge_guess))
    assert sol.status is Status.FELL_BACK
    assert torch.isfinite(sol.x).all()
    assert torch.allclose(sol.x, serial_reference(block, z), rtol=1e-12, atol=0)


def huge_guess_for_sample_0(block, z, cond):
    """An initial guess far from the answer for sample 0 only: its iteration diverges."""
    x0 = z.clone()
    x0[0] = 30.0
    return x0


def test_give_up_stops_only_the_overflowing_sample_and_keeps_its_exact_prefix():
    block = Explosive()
    z = torch.full((3, 12, 1), 0.01, dtype=torch.float64)

    options = dict(tol=1e-12, init=huge_guess_for_sample_0)
    fell_back = solve(block, z, Jacobi(**options), throw=False)
    given_up = solve(block, z, Jacobi(**options, on_divergence="give_up"), throw=False)
    serial = serial_reference(block, z)
    assert fell_back.status is Status.FELL_BACK
    assert torch.allclose(fell_back.x, serial, rtol=1e-12, atol=0)
    assert given_up.blocks[0].status.tolist() == [Status.GAVE_UP, Status.CONVERGED, Status.CONVERGED]
    assert given_up.status is Status.GAVE_UP and not given_up.status.usable
    assert torch.allclose(given_up.x[1:], serial[1:], rtol=1e-12, atol=0)
    exact = int(given_up.blocks[0].iterations[0, 0])  # rows below the iteration count are exact
    assert torch.equal(given_up.x[0, :exact], serial[0, :exact])
    assert torch.isnan(given_up.x[0, exact:]).all()
    assert given_up.passes < fell_back.passes
    with pytest.raises(ValueError, match="on_divergence"):
        Jacobi(on_divergence="ignore")


def test_a_block_that_overflows_serially_reports_nonfinite():
    block = Recurrence(seq_len=8, gain=1.0, log_sigma=800.0)
    z = torch.ones(1, 8, 1, dtype=torch.float64)
    with pytest.raises(SolveError):
        solve_inverse(block, z, Serial())
    assert solve(block, z, Jacobi(), throw=False).status is Status.NONFINITE


def test_a_flow_is_inverted_step_by_step_in_sampling_order():
    first, second = CausalMLP(6, 2, seed=1), CausalMLP(6, 2, seed=2)
    reverse = Permute(list(range(5, -1, -1)))
    z = torch.randn(3, 6, 2, dtype=torch.float64)
    expected = serial_reference(second, reverse(serial_reference(first, z)))
    sol = solve(Flow([first, reverse, second]), z, Plan.parse("[1-3-*-*]", tol=0.0))
    assert torch.allclose(sol.x, expected, atol=1e-10, rtol=0)
    assert [b.index for b in sol.blocks] == [0, 1]
    assert sol.blocks[1].solver == "GSJacobi(segments=3, tol=0.0)"


def test_conditioning_reaches_the_block_and_follows_the_active_samples():
    block = CausalMLP(6, 1, seed=4)
    z = z_for(block, batch=4)
    cond = torch.tensor([0.0, 1.0, -2.0, 3.0], dtype=torch.float64)
    z[0] = 0.0  # this sample converges early, so later passes see a subset of cond
    x = solve_inverse(block, z, Jacobi(tol=1e-14), cond=cond)
    assert torch.allclose(x, serial_reference(block, z, cond), atol=1e-10, rtol=0)


def test_solution_reports_per_sample_statistics_as_json():
    block = CausalMLP(8, 1)
    sol = solve(block, z_for(block, batch=3), GSJacobi(2, max_iters=2, tol=0.0))
    stats = sol.blocks[0]
    assert stats.iterations.shape == (3, 2) and (stats.iterations == 2).all()
    assert stats.residuals[0].shape == (2, 3)
    assert sol.status is Status.MAX_ITERS
    assert '"status": "MAX_ITERS"' in sol.to_json()


def test_max_batch_splits_the_request_and_merges_the_statistics():
    block = CausalMLP(7, 2, seed=6)
    z = torch.randn(10, 7, 2, dtype=torch.float64)
    whole = solve(block, z, GSJacobi(2, tol=0.0))
    chunked = solve(block, z, GSJacobi(2, tol=0.0), max_batch=3)
    assert torch.allclose(chunked.x, whole.x, atol=1e-12, rtol=0)
    assert chunked.blocks[0].iterations.shape == (10, 2)
    assert torch.equal(chunked.blocks[0].iterations, whole.blocks[0].iterations)
    assert chunked.blocks[0].residuals[0].shape[1] == 10
    with pytest.raises(ValueError, match="max_batch"):
        solve(block, z, Jacobi(), max_batch=0)


def test_fall_back_of_one_group_does_not_commit_rows_another_group_must_redo():
    # sample 0 overflows at the first iteration, sample 1 at the second: re-solving sample 0
    # must not commit (for every sample) rows that sample 1's re-solve still has to compute
    from toys import CachedMLP

    block = CachedMLP(Explosive())
    z = torch.full((3, 12, 1), 0.01, dtype=torch.float64)
    start = torch.tensor([30.0, 3.0, 0.0], dtype=torch.float64).view(3, 1, 1)
    guess = lambda block, z, cond: start.expand_as(z).clone()
    sol = solve(block, z, Jacobi(tol=1e-12, init=guess))
    assert sol.status is Status.FELL_BACK
    assert torch.allclose(sol.x, serial_reference(Explosive(), z), rtol=1e-12, atol=0)


def test_igm_of_a_guess_whose_step_overflows_is_inf():
    from arflow_solvers.metrics import igm

    block = Explosive()
    z = torch.full((2, 12, 1), 0.01, dtype=torch.float64)
    x_star = serial_reference(block, z)
    assert igm(block, z, x_star, lambda b, z, c: torch.full_like(z, 30.0)) == float("inf")
    assert igm(block, z, x_star, lambda b, z, c: torch.zeros_like(z)) < 1.0


def test_a_sample_that_overflows_serially_is_not_re_solved_in_later_blocks():
    # sample 0 overflows in block 0 (exp(800) = inf in float64); in block 1 its input is
    # non-finite, so no solver can help: it must cost nothing there, and the others converge.
    overflowing = Recurrence(seq_len=10, gain=0.5, log_sigma=0.0)
    z = torch.randn(3, 10, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z[0, 4, 0] = 1e308
    flow = Flow([Recurrence(10, gain=4.0), overflowing])
    sol = solve(flow, z, Jacobi(tol=1e-10), throw=False)
    assert sol.status is Status.NONFINITE
    assert sol.sample_status.tolist()[0] == Status.NONFINITE
    assert sol.blocks[1].iterations[0].sum() == 0
    assert sol.blocks[1].work <= 10 * 2 / 3 + 1e-9  # only the two finite samples were evaluated
    expected = serial_reference(overflowing, serial_reference(Recurrence(10, gain=4.0), z))
    assert torch.allclose(sol.x[1:], expected[1:], rtol=1e-9, atol=0)


def test_solvers_build_no_autograd_graph_even_when_called_directly():
    layer = torch.nn.Linear(1, 2).double()  # parameters require grad

    class Block:
        seq_len = 6
        def affine(self, x, cond=None):
            history = torch.tril(torch.ones(6, 6, dtype=x.dtype), -1) @ x  # row t: sum of x_<t
            mu, log_sigma = (0.1 * layer(history)).chunk(2, dim=-1)
            return mu, log_sigma

    z = torch.randn(2, 6, 1, dtype=torch.float64)
    for solver in (Serial(), Jacobi(), GSJacobi(3)):
        x, _ = solver.solve(Block(), z)
        assert not x.requires_grad


def test_a_failed_sample_raises_with_the_whole_solution_and_names_its_index():
    block = Explosive()
    z = torch.full((4, 12, 1), 0.01, dtype=torch.float64)
    z[2, 0, 0] = 100.0  # log_sigma_1 = 1e4: this sample's serial answer overflows
    with pytest.raises(SolveError, match=r"1 of 4 samples failed \(indices 2\)") as caught:
        solve(block, z, Jacobi(tol=0.0))
    error = caught.value
    assert error.failed.tolist() == [2]
    good = [0, 1, 3]
    assert torch.isfinite(error.solution.x[good]).all()
    torch.testing.assert_close(error.solution.x[good], serial_reference(block, z[good]), rtol=1e-12, atol=0)


def test_without_throw_a_sample_with_nan_noise_is_marked_and_the_others_solved():
    block = CausalMLP(6, 2)
    z = z_for(block, batch=3, dim=2)
    z[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"samples \[1\]"):
        solve(block, z, Jacobi())
    sol = solve(block, z, Jacobi(tol=0.0), throw=False)
    assert sol.sample_status.tolist() == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]
    torch.testing.assert_close(sol.x[[0, 2]], serial_reference(block, z[[0, 2]]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("result, message", [
    (None, "pair.*NoneType"),
    ((torch.zeros(1, 4, 1, dtype=torch.float64),), "pair.*tuple of length 1"),
])
def test_a_block_returning_something_else_than_a_pair_gets_a_clear_error(result, message):
    class Broken:
        seq_len = 4

        def affine(self, x, cond=None):
            return result

    with pytest.raises(TypeError, match=message):
        solve(Broken(), torch.zeros(1, 4, 1, dtype=torch.float64), Jacobi())


def test_noise_on_the_meta_device_is_refused():
    with pytest.raises(ValueError, match="meta"):
        solve(CausalMLP(3, 1), torch.zeros(1, 3, 1, device="meta"), Jacobi())


@pytest.mark.parametrize("options, name", [
    (dict(tol=float("inf")), "tol"), (dict(tol=float("nan")), "tol"), (dict(atol=-1.0), "atol"),
    (dict(update_dtype=torch.int32), "update_dtype"), (dict(norm="l3"), "norm"),
    (dict(max_iters=True), "max_iters"), (dict(drop_converged="yes"), "drop_converged"),
])
def test_options_that_cannot_work_are_refused_by_name(options, name):
    with pytest.raises((ValueError, TypeError), match=name):
        Jacobi(**options)


def test_a_new_divergence_policy_is_a_small_object():
    from arflow_solvers import DivergencePolicy

    class Zero:  # keep the exact prefix and put zeros after it
        def handle(self, x, samples, exact, stop, resolve):
            x[samples, exact:stop] = 0.0
            spent = torch.zeros(samples.numel(), dtype=torch.long)
            return spent, torch.full_like(spent, Status.FELL_BACK)

    assert isinstance(Zero(), DivergencePolicy)
    block = Explosive()
    z = torch.full((2, 12, 1), 0.01, dtype=torch.float64)

    sol = solve(block, z, Jacobi(tol=1e-12, init=huge_guess_for_sample_0, on_divergence=Zero()), throw=False)
    assert sol.blocks[0].status.tolist() == [Status.FELL_BACK, Status.CONVERGED]
    exact = int(sol.blocks[0].iterations[0, 0])
    assert (sol.x[0, exact:] == 0).all()


def test_the_rms_norm_stops_by_the_root_mean_square():
    block = CausalMLP(10, 2)
    z = z_for(block, dim=2)
    serial = serial_reference(block, z)
    for norm in ("max", "rms"):
        sol = solve(block, z, Jacobi(tol=1e-4, norm=norm))
        assert sol.status is Status.CONVERGED
        assert (sol.x - serial).abs().max() < 1e-2
    assert repr(Jacobi(norm="rms")) == "Jacobi(norm='rms')"


@pytest.mark.parametrize("solver", [Jacobi(), Jacobi(tol=0.0), GSJacobi(3, tol=1e-8)])
def test_a_block_whose_row_reads_its_own_position_is_named_not_a_wrong_answer(solver):
    from arflow_solvers import NotCausalError

    class OffByOne:  # row t reads x[:, t]: an off-by-one mask
        seq_len = 6

        def affine(self, x, cond=None):
            return 0.5 * x.roll(1, dims=1) + 0.3 * x, torch.zeros_like(x)

    with pytest.raises(NotCausalError, match="OffByOne is not causal: row"):
        solve(OffByOne(), z_for(OffByOne()), solver)


def test_a_flow_refuses_steps_it_cannot_classify():
    with pytest.raises(TypeError, match=r"steps\[1\] is a torch module \(Linear\).*density direction"):
        Flow([CausalMLP(4, 1), torch.nn.Linear(4, 4)])

    class HalfBlock:
        seq_len = 4

    with pytest.raises(TypeError, match=r"steps\[0\] \(HalfBlock\) has seq_len but neither"):
        Flow([HalfBlock()])
    with pytest.raises(TypeError, match=r"steps\[0\] must be"):
        Flow([3])


def test_a_permute_of_the_wrong_length_is_refused():
    flow = Flow([CausalMLP(4, 1), Permute([2, 1, 0])])
    with pytest.raises(ValueError, match=r"Permute of 3 positions got an input of shape \(2, 4, 1\)"):
        solve(flow, z_for(CausalMLP(4, 1)), Jacobi())


def test_the_guarantees_page_cites_only_tests_that_exist():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cited = set(re.findall(r"`(test_\w+)`", (root / "docs" / "guarantees.md").read_text()))
    defined = {name for path in (root / "tests").glob("test_*.py")
               for name in re.findall(r"def (test_\w+)", path.read_text())}
    assert cited and cited <= defined, sorted(cited - defined)
