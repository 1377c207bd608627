"""The fast paths keep the exact mode exact: shrinking batches are certified, reused buffers and in-place steps
give the library's bits, and a faster way of doing the same thing is checked against the library's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arflow_solvers import GSJacobi, Jacobi, solve
from arflow_solvers._sweep import MIN_ROWS
from arflow_solvers.adapters._masked import take_columns

zuko = pytest.importorskip("zuko")

from zuko.flows import MAF, NSF  # noqa: E402
from zuko.transforms import MonotonicAffineTransform  # noqa: E402

from arflow_solvers.adapters.zuko import ZukoAffineBlock, ar_block, inverse, wrap  # noqa: E402
from toys import randomise  # noqa: E402

EXACT = Jacobi(tol=0.0)
FIXED_SHAPE = Jacobi(tol=0.0, drop_converged=False)


class Wobbly:
    """`x_t = z_t + a x_{t-1}`, computed with an error of one part in 1e6 when the batch is not the full one.

    A stand-in for a network whose products round differently for a smaller batch, exaggerated:
    its fixed point at the full batch shape is not the one a shrunk batch iterates to.
    """

    seq_len = 24

    def __init__(self, batch: int):
        self.batch = batch
        self.calls: list[int] = []

    def inverse_map(self, x, z, cond=None):
        self.calls.append(x.shape[0])
        a = 0.5 if x.shape[0] == self.batch else 0.5 * (1 + 1e-6)
        return z + a * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def test_a_shrunk_batch_that_rounds_otherwise_is_certified_and_finished_at_the_full_shape():
    batch = 4 * MIN_ROWS
    z = torch.randn(batch, Wobbly.seq_len, 1)
    z[: batch // 2] = 0.0  # half the samples are converged at once: the batch shrinks
    expected = solve(Wobbly(batch), z, FIXED_SHAPE).x
    block = Wobbly(batch)
    solution = solve(block, z, EXACT)
    assert torch.equal(solution.x, expected)
    assert min(block.calls) < batch  # it did shrink, and the answer is still the full-shape fixed point
    assert block.calls[-1] == batch


def test_a_certification_that_finds_the_last_rows_moved_finishes_them_at_the_full_shape():
    class LateWobbly(Wobbly):  # a shrunk batch rounds otherwise only in its last rows
        def inverse_map(self, x, z, cond=None):
            self.calls.append(x.shape[0])
            new = z + 0.5 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
            if x.shape[0] != self.batch:
                new[:, -3:] *= 1 + 1e-6
            return new

    batch = 4 * MIN_ROWS
    z = torch.randn(batch, Wobbly.seq_len, 1)
    z[: batch // 2] = 0.0
    solution = solve(LateWobbly(batch), z, EXACT)
    assert torch.equal(solution.x, solve(LateWobbly(batch), z, FIXED_SHAPE).x)
    assert (solution.blocks[0].status == 0).all()


def test_exact_mode_certifies_with_one_full_batch_call_when_shrunk_batches_round_alike():
    class Linear(Wobbly):
        def inverse_map(self, x, z, cond=None):
            self.calls.append(x.shape[0])
            return z + 0.5 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)

    batch = 4 * MIN_ROWS
    z = torch.randn(batch, Linear.seq_len, 1, dtype=torch.float64)
    z[: batch // 2] = 0.0
    block = Linear(batch)
    solution = solve(block, z, EXACT)
    assert torch.equal(solution.x, solve(Linear(batch), z, FIXED_SHAPE).x)
    shrunk = [rows for rows in block.calls if rows < batch]
    assert shrunk and min(shrunk) >= MIN_ROWS
    assert block.calls[-1] == batch and block.calls[-2] < batch  # one certifying call at the end
    assert solution.blocks[0].work < solution.blocks[0].passes


class Chain:
    """`x_t = z_t + a x_{t-1}`, whose `inverse_map_rows` records where it starts and may be off by `error`."""

    seq_len = 64

    def __init__(self, a: float = 0.05, error: float = 0.0):
        self.a, self.error = a, error
        self.starts: list[int] = []

    def inverse_map(self, x, z, cond=None):
        return z + self.a * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)

    def inverse_map_rows(self, x, z, cond, start, settled=None, stop=None):
        self.starts.append(start)
        return Chain.inverse_map(self, x, z)[:, start:stop] * (1 + self.error)


def test_rows_that_stopped_moving_are_final_and_not_evaluated_again():
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    z[:, : Chain.seq_len // 2] = 0.0  # the first half of every sample is solved by the initial guess
    block = Chain()
    solution = solve(block, z, EXACT)
    assert torch.equal(solution.x, solve(Chain(), z, FIXED_SHAPE).x)
    # Jacobi's bound makes one more row exact per iteration; an unchanged prefix is final at once
    assert block.starts and max(block.starts) > len(block.starts) + 1
    assert solution.blocks[0].work < solution.blocks[0].passes


def test_segments_compute_their_own_rows_only_and_stay_exact():
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    calls = []

    class Recorded(Chain):
        def inverse_map_rows(self, x, z, cond, start, settled=None, stop=None):
            calls.append((start, stop))
            return super().inverse_map_rows(x, z, cond, start, settled, stop)

    solution = solve(Recorded(a=0.5), z, GSJacobi(4, tol=0.0))
    assert torch.equal(solution.x, solve(Chain(a=0.5), z, FIXED_SHAPE).x)
    bounds = {(16 * m, 16 * (m + 1)) for m in range(4)}
    assert calls and all(any(lo <= start and stop == hi for lo, hi in bounds) for start, stop in calls)


def test_segments_are_certified_once_at_the_end():
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    whole: list[int] = []

    class Counted(Chain):
        def inverse_map(self, x, z, cond=None):
            whole.append(x.shape[0])
            return super().inverse_map(x, z, cond)

    solution = solve(Counted(a=0.5), z, GSJacobi(4, tol=0.0))
    deferred, whole[:] = len(whole), []
    # a cap of one segment's length is the same bound, but each segment certifies itself
    each = solve(Counted(a=0.5), z, GSJacobi(4, tol=0.0, max_iters=Chain.seq_len // 4))
    assert torch.equal(solution.x, solve(Chain(a=0.5), z, FIXED_SHAPE).x)
    assert torch.equal(each.x, solution.x)
    assert deferred == len(whole) - 3  # one certifying call at the full map instead of four
    assert (solution.blocks[0].status == 0).all()


def test_segments_computed_apart_that_round_otherwise_are_certified_at_the_full_map():
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    solution = solve(Chain(a=0.5, error=1e-14), z, GSJacobi(4, tol=0.0))
    assert torch.equal(solution.x, solve(Chain(a=0.5), z, FIXED_SHAPE).x)
    assert (solution.blocks[0].status == 0).all()


def test_rows_computed_apart_that_round_otherwise_are_certified_at_the_full_map():
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    block = Chain(error=1e-14)  # a few dozen ulps: rounding, as far as the causality check can tell
    solution = solve(block, z, EXACT)
    assert block.starts  # the cheaper map was used, and its answer was not trusted
    assert torch.equal(solution.x, solve(Chain(), z, FIXED_SHAPE).x)
    assert (solution.blocks[0].status == 0).all()


def test_without_certification_only_rows_nothing_reads_are_computed_apart():
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    for plan in (FIXED_SHAPE, Jacobi(tol=1e-8), Jacobi(tol=0.0, drop_converged=True)):
        block = Chain(error=1e-6)
        solve(block, z, plan)
        assert not block.starts


class Leaves(Chain):
    """A `Chain` to row `reads - 1`; the rows after it read only that row: `x_t = z_t + a x_{reads - 1}`.

    It says `unread_from = reads` (or what `claims`, which may be untrue).
    """

    def __init__(self, reads: int, claims: int | None = None, **options):
        super().__init__(**options)
        self.reads, self.unread_from = reads, reads if claims is None else claims
        self.calls: list[tuple[int, int]] = []

    def inverse_map(self, x, z, cond=None):
        new = Chain.inverse_map(self, x, z)
        new[:, self.reads:] = z[:, self.reads:] + self.a * x[:, self.reads - 1 : self.reads]
        return new

    def inverse_map_rows(self, x, z, cond, start, settled=None, stop=None):
        self.calls.append((start, stop))
        return Leaves.inverse_map(self, x, z)[:, start:stop] * (1 + self.error)


def test_rows_no_row_reads_are_computed_once_after_the_rows_before_them():
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    block = Leaves(reads=40, a=0.5)
    solution = solve(block, z, EXACT)
    assert torch.equal(solution.x, solve(Leaves(reads=40, a=0.5), z, FIXED_SHAPE).x)
    assert block.calls[-1] == (40, 64) and all(stop == 40 for _, stop in block.calls[:-1])
    assert (solution.blocks[0].status == 0).all()


class ProvenLeaves(Leaves):
    """`Leaves` whose whole map provably never reads the rows from `reads` on (it says `unread_proven`)."""

    unread_proven = True

    def inverse_map(self, x, z, cond=None):
        self.calls.append((0, Chain.seq_len))
        return Leaves.inverse_map(self, x, z)


@pytest.mark.parametrize("error", [0.0, 1e-14])
def test_rows_a_block_proves_unread_are_computed_by_the_certifying_call(error):
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    proven, unproven = ProvenLeaves(reads=40, a=0.5, error=error), Leaves(reads=40, a=0.5, error=error)
    solution = solve(proven, z, EXACT)
    assert torch.equal(solution.x, solve(unproven, z, EXACT).x)
    assert torch.equal(solution.x, solve(Leaves(reads=40, a=0.5), z, FIXED_SHAPE).x)
    assert (40, 64) not in proven.calls and (40, 64) in unproven.calls  # one call fewer
    certifying = proven.calls.index((0, Chain.seq_len))  # rows from 40 on first computed there
    assert certifying > 0 and all(stop <= 40 for _, stop in proven.calls[:certifying])
    assert (solution.blocks[0].status == 0).all()


def test_a_certification_that_moves_the_last_row_read_recomputes_the_rows_after_it():
    class LastRowOff(ProvenLeaves):  # the rows map rounds row 39 otherwise: the certification moves it
        def inverse_map_rows(self, x, z, cond, start, settled=None, stop=None):
            new = ProvenLeaves.inverse_map_rows(self, x, z, cond, start, settled, stop)
            if start <= 39 < stop:
                new[:, 39 - start] *= 1 + 1e-14
            return new

    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    solution = solve(LastRowOff(reads=40, a=0.5), z, EXACT)
    assert torch.equal(solution.x, solve(Leaves(reads=40, a=0.5), z, FIXED_SHAPE).x)
    assert (solution.blocks[0].status == 0).all()


@pytest.mark.parametrize("plan", [Jacobi(tol=1e-9), GSJacobi(3, tol=1e-9)])
def test_a_tolerance_plan_iterates_the_rows_something_reads_and_computes_the_rest_once(plan):
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    block = Leaves(reads=40, a=0.5)
    solution = solve(block, z, plan)
    torch.testing.assert_close(solution.x, solve(Leaves(reads=40, a=0.5), z, FIXED_SHAPE).x, rtol=0, atol=1e-8)
    once = [(start, stop) for start, stop in block.calls if stop > 40]  # each row from 40 on in one call
    assert all(start >= 40 for start, _ in once) and sum(stop - start for start, stop in once) == 24
    assert (solution.blocks[0].status == 0).all()


@pytest.mark.parametrize("max_iters", [1, 2, 5])
def test_a_tolerance_plan_out_of_iterations_still_computes_the_rows_nothing_reads(max_iters):
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    block = Leaves(reads=40, a=0.5)
    solution = solve(block, z, Jacobi(tol=1e-12, max_iters=max_iters))
    x = solution.x
    assert torch.equal(x[:, 40:], Leaves.inverse_map(block, x, z)[:, 40:])  # from the rows before them
    assert solution.blocks[0].passes == max_iters and (solution.blocks[0].status == 1).all()


def test_segments_split_the_rows_something_reads():
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    solution = solve(Leaves(reads=40, a=0.5), z, GSJacobi(3, tol=0.0))
    assert solution.blocks[0].bounds == ((0, 14), (14, 27), (27, 64))
    assert torch.equal(solution.x, solve(Leaves(reads=40, a=0.5), z, FIXED_SHAPE).x)
    # without certification every row is iterated, in the paper's segments
    assert solve(Leaves(reads=40, a=0.5), z, GSJacobi(3, tol=1e-8)).blocks[0].bounds == ((0, 22), (22, 43), (43, 64))
    # lengths given are kept: a segment past the rows read is computed once, one across them in two steps
    block = Leaves(reads=40, a=0.5)
    solution = solve(block, z, GSJacobi([20, 30, 14], tol=0.0))
    assert solution.blocks[0].bounds == ((0, 20), (20, 50), (50, 64))
    assert torch.equal(solution.x, solve(Leaves(reads=40, a=0.5), z, FIXED_SHAPE).x)
    assert block.calls[-1] == (50, 64) and block.calls[-2] == (40, 50)
    assert all(stop <= 40 for _, stop in block.calls[:-2])


@pytest.mark.parametrize("error", [0.0, 1e-14])
def test_an_untrue_unread_from_still_gives_the_full_maps_fixed_point(error):
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    for plan in (EXACT, GSJacobi(3, tol=0.0)):
        solution = solve(Leaves(reads=40, claims=20, a=0.5, error=error), z, plan)
        assert torch.equal(solution.x, solve(Leaves(reads=40, a=0.5), z, FIXED_SHAPE).x)
        assert (solution.blocks[0].status == 0).all()


@pytest.mark.parametrize("claims", [-1, 65, 3.0, True])
def test_an_unread_from_out_of_range_is_refused_by_name(claims):
    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="unread_from"):
        solve(Leaves(reads=40, claims=claims), z, EXACT)


def test_a_made_narrower_than_its_features_leaves_its_last_positions_unread():
    torch.manual_seed(3)
    for hidden, order in (((8, 8), None), ((64, 64), None), ((8, 8), torch.randperm(20))):
        transform = zuko.flows.MaskedAutoregressiveTransform(20, hidden_features=hidden, order=order)
        block = ar_block(transform)
        first = transform.hyper[0]  # which features the hidden units read
        read = (first.mask != 0).any(0)[block.order].nonzero().flatten()
        assert block.unread_from == int(read.max()) + 1 <= 19  # nothing reads the last position


def test_the_first_moved_row_counts_non_finite_updates_and_stays_exact_in_low_precision():
    from arflow_solvers._sweep import _first_moved

    update = torch.zeros(4, 5, 2)
    update[0, 3, 1], update[1, 0, 0], update[2, 4, 0] = 1e-30, float("nan"), -float("inf")
    assert _first_moved(update).tolist() == [3, 0, 0, 5]  # non-finite: moved, at the first row for all we know
    assert _first_moved(torch.zeros(2, 0, 1)).tolist() == [0, 0]
    wide = torch.zeros(2, 400, 1, dtype=torch.bfloat16)
    wide[0, 301] = 1
    assert _first_moved(wide).tolist() == [301, 400]


@pytest.mark.parametrize("transform", [0, 1])  # zuko's NSF alternates the identity order and its reversal
def test_zukos_nsf_computes_a_suffix_of_positions_as_its_whole_sweep_does(transform):
    torch.manual_seed(5)
    flow = NSF(20, transforms=2, bins=4, hidden_features=(32, 32))
    randomise(flow, 5, 0.3)
    x, z = torch.randn(2, 70, 20, 1)
    with torch.no_grad():
        block = wrap(flow).blocks[transform].snapshot()
        whole = block.inverse_map(x, z)
        for start in (1, 7, 19):
            # a product of few rows may round otherwise (the exact mode certifies): equal to rounding
            torch.testing.assert_close(block.inverse_map_rows(x, z, None, start), whole[:, start:],
                                       rtol=1e-4, atol=1e-5)
            # rows a sample has settled keep their values; the others are the sweep's
            settled = torch.randint(start, 21, (70,))
            rows = block.inverse_map_rows(x, z, None, start, settled)
            final = torch.arange(start, 20) < settled[:, None]
            assert torch.equal(rows[final], x[:, start:][final])
            torch.testing.assert_close(rows[~final], whole[:, start:][~final], rtol=1e-4, atol=1e-5)
            # no sample settled past start: every element inverted at once, without gathers, the same values
            every = block.inverse_map_rows(x, z, None, start, torch.full((70,), start))
            torch.testing.assert_close(rows[~final], every[~final], rtol=1e-6, atol=1e-7)
        # outside a solve's snapshot: the whole sweep's rows, up to stop
        unsnapped = wrap(flow).blocks[transform]
        assert torch.equal(unsnapped.inverse_map_rows(x, z, None, 3, None, 9), unsnapped.inverse_map(x, z)[:, 3:9])


class Unsettled(Chain):
    """A `Chain` whose rows map never reads `settled`, and says so."""

    reads_settled = False


@pytest.mark.parametrize("block", [Chain, Unsettled])
def test_each_samples_first_moved_row_is_found_only_for_a_block_that_reads_it(block, monkeypatch):
    import arflow_solvers._sweep as sweep_module

    z = torch.randn(4 * MIN_ROWS, Chain.seq_len, 1, dtype=torch.float64)
    expected = solve(Chain(), z, FIXED_SHAPE).x
    found = []
    real = sweep_module._first_moved
    monkeypatch.setattr(sweep_module, "_first_moved", lambda update: found.append(1) or real(update))
    assert torch.equal(solve(block(), z, EXACT).x, expected)
    assert bool(found) == (block is Chain)


def test_zukos_grouped_maf_computes_the_rows_before_a_stop_as_its_whole_sweep_does():
    torch.manual_seed(8)
    flow = MAF(24, transforms=1, hidden_features=(16, 16))
    randomise(flow, 8, 0.3)
    x, z = torch.randn(2, 800, 24, 1)  # enough outputs for the probe to decide
    with torch.no_grad():
        block = wrap(flow).blocks[0].snapshot()
        whole = block.inverse_map(x, z)
        if not block._grouped_agrees:
            pytest.skip("this machine's kernels round the grouped final layer otherwise: zuko's layout was used")
        assert not block.reads_settled  # every row before stop is computed, settled or not
        settled = torch.randint(0, 24, (800,))
        for start, stop in ((0, 24), (3, 17), (16, 24)):
            # a product of fewer rows may round otherwise (the exact mode certifies): equal to rounding
            torch.testing.assert_close(block.inverse_map_rows(x, z, None, start, settled, stop), whole[:, start:stop],
                                       rtol=1e-5, atol=1e-6)


def test_a_grouped_maf_iterates_the_rows_nothing_reads_when_they_are_few():
    torch.manual_seed(10)
    with torch.no_grad():
        # wide hidden layers read all but the last feature: computing it once would cost a whole sweep
        wide = wrap(MAF(24, transforms=1, hidden_features=(64, 64))).blocks[0]
        assert wide.unread_from == 23 and wide.snapshot().inverse_map_rows is None
        # 16 hidden units read 16 features: a third of each sweep is saved by computing the rest once
        narrow = wrap(MAF(24, transforms=1, hidden_features=(16, 16))).blocks[0]
        assert narrow.unread_from == 16 and narrow.snapshot().inverse_map_rows is not None


def test_a_maf_whose_grouped_layout_the_probe_refused_computes_rows_from_whole_sweeps(monkeypatch):
    from arflow_solvers.adapters._masked.program import DenseProgram

    torch.manual_seed(9)
    flow = MAF(12, transforms=1, hidden_features=(8, 8))
    monkeypatch.setattr(DenseProgram, "_probe", lambda self, batch, like: False)
    x, z = torch.randn(2, 50, 12, 1)
    with torch.no_grad():
        block = wrap(flow).blocks[0].snapshot()
        whole = block.inverse_map(x, z)
        assert block._grouped_agrees is False and not block.reads_settled
        # the affine is cheap: no per-sample elements, the whole sweep's rows (settled ones too)
        rows = block.inverse_map_rows(x, z, None, 2, torch.full((50,), 6), 11)
        assert torch.equal(rows, whole[:, 2:11])


def test_a_block_whose_positions_are_not_one_run_of_features_sweeps_whole_passes():
    torch.manual_seed(6)
    order = torch.randperm(12)
    block = ar_block(zuko.flows.MaskedAutoregressiveTransform(
        12, univariate=zuko.transforms.MonotonicRQSTransform, shapes=[(4,), (4,), (3,)], order=order))
    with torch.no_grad():
        assert block.snapshot().inverse_map_rows is None


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), spline=st.booleans(), features=st.integers(8, 24),
       batch=st.integers(3 * MIN_ROWS, 8 * MIN_ROWS), hidden=st.sampled_from([(64, 64), (6, 6)]))
def test_exact_mode_on_large_float32_batches_is_zukos_inverse_bit_for_bit(seed, spline, features, batch, hidden):
    torch.manual_seed(seed)
    flow = (NSF(features, transforms=3, bins=4, hidden_features=hidden) if spline
            else MAF(features, transforms=3, hidden_features=hidden))
    randomise(flow, seed, 0.3)
    z = torch.randn(batch, features)
    with torch.no_grad():
        expected = flow().transform.inv(z)
    for plan in (EXACT, FIXED_SHAPE, GSJacobi(3, tol=0.0)):
        x, solution = inverse(flow, z, plan, return_solution=True, throw=False)
        # a sample that diverged is re-solved at its own batch shape, to rounding (documented)
        plain = torch.stack([block.status == 0 for block in solution.blocks]).all(0)
        assert torch.equal(x[plain], expected[plain])
        # a sample we could not finish is one zuko's own loop overflows on too
        overflowed = ~torch.isfinite(x).all(1)
        assert not torch.isfinite(expected[overflowed]).all(1).any()


def test_maf_reversed_transforms_are_solved_in_the_reversed_order():
    flow = MAF(30, transforms=2, hidden_features=(16, 16))  # fewer hidden units than features: tied degrees
    orders = [ar_block(t).order for t in flow.transform.transforms if hasattr(t, "hyper")]
    assert torch.equal(orders[0], torch.arange(30))
    assert torch.equal(orders[1], torch.arange(29, -1, -1))


def test_take_columns_is_a_column_gather():
    values = torch.randn(5, 7)
    for index in (torch.arange(6, -1, -1), torch.randperm(7), torch.arange(7)):
        assert torch.equal(take_columns(values, index), values[:, index])


def test_successive_sweeps_of_a_snapshot_return_independent_tensors():
    torch.manual_seed(0)
    flow = MAF(6, transforms=1)
    block = ar_block(flow.transform.transforms[0]).snapshot()
    x, z = torch.randn(40, 6, 1), torch.randn(40, 6, 1)
    with torch.no_grad():
        first = block.inverse_map(x, z)
        kept = first.clone()
        block.inverse_map(torch.randn(40, 6, 1), z)  # the network writes into the same buffers
    assert torch.equal(first, kept)


@pytest.mark.parametrize("slope", [None, 1e-2])
def test_the_grouped_affine_sweep_is_zukos_and_is_decided_once_per_solve(slope):
    from functools import partial

    torch.manual_seed(1)
    univariate = MonotonicAffineTransform if slope is None else partial(MonotonicAffineTransform, slope=slope)
    flow = MAF(24, transforms=2, hidden_features=(32, 32))
    for t in flow.transform.transforms:
        if hasattr(t, "hyper"):
            t.univariate = univariate
    randomise(flow, 1, 0.3)
    z = torch.randn(800, 24)  # enough outputs for the probe to decide
    with torch.no_grad():
        expected = flow().transform.inv(z)
    snapshots = []
    original = ZukoAffineBlock.snapshot

    def recorded(self):
        snapshots.append(original(self))
        return snapshots[-1]

    ZukoAffineBlock.snapshot = recorded
    try:
        assert torch.equal(inverse(flow, z, EXACT), expected)
    finally:
        ZukoAffineBlock.snapshot = original
    assert snapshots and all(isinstance(s._grouped_agrees, bool) for s in snapshots)
    if not any(s._grouped_agrees for s in snapshots):
        pytest.skip("this machine's kernels round the grouped final layer otherwise: zuko's layout was used")


def test_the_grouped_layout_is_proven_at_the_largest_batch_a_snapshot_sweeps(monkeypatch):
    from arflow_solvers.adapters._masked.program import DenseProgram

    torch.manual_seed(4)
    block = wrap(MAF(24, transforms=1, hidden_features=(32, 32))).blocks[0]
    probed = []
    monkeypatch.setattr(DenseProgram, "_probe", lambda self, batch, like: probed.append(batch) or batch < 500)
    x, z = torch.randn(2, 800, 24, 1)
    with torch.no_grad():
        solving = block.snapshot()
        solving.inverse_map(x[:400], z[:400])
        assert solving._grouped_agrees is True
        solving.inverse_map(x, z)  # the certifying shape: proven again, and found wanting
        solving.inverse_map(x[:400], z[:400])
    assert probed == [400, 800] and solving._grouped_agrees is False


def test_a_grouped_final_layer_that_rounds_otherwise_is_not_used(monkeypatch):
    from arflow_solvers.adapters._masked.program import DenseProgram

    torch.manual_seed(2)
    flow = MAF(10, transforms=2)
    z = torch.randn(70, 10)
    with torch.no_grad():
        expected = flow().transform.inv(z)
    used = []
    real = ZukoAffineBlock.grouped_inverse
    monkeypatch.setattr(ZukoAffineBlock, "grouped_inverse", lambda self, *args: used.append(1) or real(self, *args))
    monkeypatch.setattr(DenseProgram, "_probe", lambda self, batch, like: False)
    assert torch.equal(inverse(flow, z, EXACT), expected)
    assert not used


def test_the_probe_sees_a_grouped_final_layer_that_differs_by_rounding():
    from arflow_solvers.adapters._masked.block import ANALYSES
    from arflow_solvers.adapters._masked.program import DenseProgram, products

    torch.manual_seed(3)
    transform = zuko.flows.MaskedAutoregressiveTransform(16, hidden_features=(32,))
    block = ar_block(transform)
    with torch.no_grad():
        program = DenseProgram(block.network, ANALYSES(transform, block.network, "t"), products(block.network))
    weight, bias = program._final_rows()  # gathered once, then reused: the probe reads this copy
    weight[-1].mul_(1 + 1e-5)  # the last feature reads every input: off by a few ulps, like another kernel
    assert not program.grouped_is_exact(1024, torch.empty(0))


def test_wrap_still_solves_nsf_in_float64_exactly_with_context():
    torch.manual_seed(3)
    flow = NSF(9, context=2, transforms=2, bins=4).double()
    c, z = torch.randn(2, dtype=torch.float64), torch.randn(100, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = flow(c).transform.inv(z)
    assert torch.equal(solve(wrap(flow, c), z, EXACT).x, expected)
