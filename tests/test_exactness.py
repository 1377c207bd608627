"""The exactness guarantee: every solver at its bound gives the serial answer (float64)."""

import torch
from hypothesis import given, settings, strategies as st

from arflow_solvers import Flow, GSJacobi, Jacobi, Permute, Serial, init, solve, solve_inverse
from toys import CachedMLP, CausalLinear, CausalMLP, serial_reference

EXACT = 1e-10



sizes = st.fixed_dictionaries({
    "seq_len": st.integers(1, 12),
    "dim": st.integers(1, 3),
    "batch": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
})
inits = st.sampled_from([init.noise, init.zeros, init.zeros_first_exact])


def problem(seq_len, dim, batch, seed, kind="mlp"):
    block = CausalMLP(seq_len, dim, seed=seed) if kind == "mlp" else CausalLinear(seq_len, dim, seed=seed)
    z = torch.randn(batch, seq_len, dim, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    return block, z


def max_error(a, b):
    return (a - b).abs().max().item()


@settings(max_examples=40, deadline=None)
@given(sizes, inits, st.sampled_from(["mlp", "linear"]))
def test_jacobi_at_the_bound_equals_serial(size, x0, kind):
    block, z = problem(**size, kind=kind)
    x = solve_inverse(block, z, Jacobi(tol=0.0, init=x0))
    assert max_error(x, serial_reference(block, z)) <= EXACT


@settings(max_examples=40, deadline=None)
@given(sizes, inits, st.integers(1, 12))
def test_after_k_iterations_the_first_k_positions_are_exact(size, x0, k):
    block, z = problem(**size)
    k = min(k, size["seq_len"])
    x = solve_inverse(block, z, Jacobi(tol=0.0, max_iters=k, init=x0))
    exact = min(size["seq_len"], k + init.exact_prefix(x0))
    assert max_error(x[:, :exact], serial_reference(block, z)[:, :exact]) <= EXACT


@settings(max_examples=30, deadline=None)
@given(sizes, inits)
def test_one_segment_is_jacobi_and_t_segments_is_serial(size, x0):
    block, z = problem(**size)
    jacobi = solve_inverse(block, z, Jacobi(tol=0.0, init=x0))
    assert torch.equal(solve_inverse(block, z, GSJacobi(1, tol=0.0, init=x0)), jacobi)
    serial = solve_inverse(block, z, Serial())
    assert torch.equal(solve_inverse(block, z, GSJacobi(size["seq_len"], tol=0.0, init=x0)), serial)


@settings(max_examples=40, deadline=None)
@given(sizes, inits, st.data())
def test_any_segment_split_gives_the_serial_answer_at_the_bound(size, x0, data):
    block, z = problem(**size)
    seq_len = size["seq_len"]
    cuts = sorted(data.draw(st.sets(st.integers(1, seq_len - 1), max_size=seq_len - 1))) if seq_len > 1 else []
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq_len])]
    x = solve_inverse(block, z, GSJacobi(lengths, tol=0.0, init=x0))
    assert max_error(x, serial_reference(block, z)) <= EXACT


@settings(max_examples=30, deadline=None)
@given(sizes, st.integers(1, 6))
def test_kv_cached_blocks_give_the_same_answer_through_the_cache(size, segments):
    inner, z = problem(**size)
    expected = serial_reference(inner, z)
    for solver in (Serial(), Jacobi(tol=0.0), GSJacobi(segments, tol=0.0), GSJacobi(segments, tol=1e-13)):
        assert max_error(solve_inverse(CachedMLP(inner), z, solver), expected) <= EXACT


def test_cached_serial_evaluates_one_position_per_step():
    inner, z = problem(seq_len=7, dim=2, batch=3, seed=0)
    block = CachedMLP(inner)
    sol = solve(block, z, Serial())
    assert sol.blocks[0].passes == 7
    assert [(start, stop) for _, start, stop in block.calls] == [(t, t + 1) for t in range(7)]


def test_cached_jacobi_skips_positions_already_exact():
    inner, z = problem(seq_len=6, dim=1, batch=2, seed=3)
    block = CachedMLP(inner)
    solve(block, z, Jacobi(tol=0.0))
    starts = [start for _, start, _ in block.calls]
    assert starts == sorted(starts) and starts[0] == 0 and starts == list(range(len(starts)))


@settings(max_examples=40, deadline=None)
@given(sizes, st.sampled_from([1e-3, 1e-6, 1e-9]), st.integers(1, 4))
def test_tolerance_stopped_result_is_within_tolerance_on_contractive_blocks(size, tol, segments):
    # log_sigma is constant and the mu map is 1/2-Lipschitz in the max norm, so the
    # distance to the fixed point is at most the last update: |x - x*| <= |dx|.
    block, z = problem(**size)
    block.log_sigma_scale = 0.0
    lipschitz = block.w_mu.abs().sum(0).max() * block.w1.abs().sum(1).max()
    block.w_mu = block.w_mu * min(1.0, 0.5 / max(float(lipschitz), 1e-300))
    sol = solve(block, z, GSJacobi(segments, tol=tol))
    expected = serial_reference(block, z)
    error = (sol.x - expected).abs().flatten(1).amax(1)
    allowed = tol * sol.x.abs().flatten(1).amax(1) + 1e-12
    assert bool((error <= allowed).all()), (error, allowed)


def test_a_converged_sample_leaves_the_batch():
    block, z = problem(seq_len=10, dim=1, batch=2, seed=5, kind="linear")
    z[0] = 0.0  # x = 0 is this sample's fixed point, and X0 = Z = 0 already
    sol = solve(block, z, Jacobi(tol=1e-12))
    iterations = sol.blocks[0].iterations[:, 0]
    assert iterations[0] == 1 and iterations[1] > 1
    assert sol.blocks[0].work < sol.blocks[0].passes


def test_max_iters_none_never_costs_more_passes_than_serial():
    block, z = problem(seq_len=9, dim=2, batch=2, seed=1)
    for solver in (Jacobi(tol=0.0), GSJacobi(3, tol=0.0), GSJacobi(9, tol=0.0)):
        assert solve(block, z, solver).passes <= 9
    # Z0 spends one counted call on row 0, then T - 1 iterations: exactly serial's T calls.
    assert solve(block, z, Jacobi(tol=0.0, init=init.zeros_first_exact)).blocks[0].passes == 9


BOUND_SOLVERS = st.sampled_from([
    Serial(),
    Jacobi(tol=0.0),
    Jacobi(tol=0.0, init=init.zeros_first_exact),
    GSJacobi(2, tol=0.0),
    GSJacobi(3, tol=0.0, init=init.zeros),
])


@settings(max_examples=30, deadline=None)
@given(st.fixed_dictionaries({"seq_len": st.integers(1, 10), "dim": st.integers(1, 3),
                              "batch": st.integers(1, 7), "seed": st.integers(0, 2**16)}),
       st.integers(1, 8), BOUND_SOLVERS, st.sampled_from(["mlp", "linear", "cached", "flow"]))
def test_chunking_by_max_batch_changes_neither_the_samples_nor_the_shape_of_the_statistics(
        size, max_batch, solver, kind):
    seq_len, dim, batch, seed = size["seq_len"], size["dim"], size["batch"], size["seed"]
    inner, z = problem(seq_len, dim, batch, seed, kind="linear" if kind == "linear" else "mlp")
    cond = None
    if kind == "cached":
        inner = CachedMLP(inner)
    elif kind == "flow":  # two blocks, a permutation between them, per-sample conditioning
        inner = Flow([inner, Permute(list(range(seq_len))[::-1]), CausalMLP(seq_len, dim, seed=seed + 7)])
        cond = torch.linspace(-1.0, 1.0, batch, dtype=torch.float64)
    whole = solve(inner, z, solver, cond=cond)
    chunked = solve(inner, z, solver, cond=cond, max_batch=max_batch)
    assert chunked.x.shape == whole.x.shape
    assert torch.allclose(chunked.x, whole.x, rtol=0.0, atol=1e-12), max_error(chunked.x, whole.x)
    if kind != "flow":
        assert max_error(chunked.x, serial_reference(inner, z)) <= EXACT
    assert chunked.status == whole.status
    assert len(chunked.blocks) == len(whole.blocks) == (2 if kind == "flow" else 1)
    for merged, single in zip(chunked.blocks, whole.blocks):
        assert merged.index == single.index and merged.bounds == single.bounds
        assert merged.iterations.shape == single.iterations.shape == (batch, len(single.bounds))
        assert merged.status.shape == (batch,)
        assert len(merged.residuals) == len(single.residuals)
        assert all(r.shape[1] == batch for r in merged.residuals)
        if isinstance(solver, Serial):
            assert bool((merged.iterations == 1).all())
    assert chunked.sample_status.shape == (batch,)
