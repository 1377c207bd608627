"""The conformance suite: the library's own blocks pass it, and it catches broken blocks."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings, strategies as st

from arflow_solvers.adapters.made import MADE
from arflow_solvers.testing import (
    ConformanceError,
    check_block,
    check_cached_range,
    check_causal,
    check_exact_at_bound,
)
from toys import CachedMLP, CausalLinear, CausalMLP, Explosive, Recurrence, shift_right, tiny_tarflow

F64 = torch.float64
sizes = st.fixed_dictionaries({
    "seq_len": st.integers(1, 10),
    "dim": st.integers(1, 3),
    "batch": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
})



def noise(batch, seq_len, dim, seed=0, scale=1.0):
    return scale * torch.randn(batch, seq_len, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------ broken blocks


class ReadsItsOwnPosition:
    """Off by one at row `leak`: it reads x[:, leak] (itself) as well as the prefix."""

    def __init__(self, inner, leak: int, gain: float = 0.3):
        self.inner, self.leak, self.gain = inner, leak, gain
        self.seq_len = inner.seq_len

    def affine(self, x, cond=None):
        mu, log_sigma = self.inner.affine(x, cond)
        mu = mu.clone()
        mu[:, self.leak] = mu[:, self.leak] + self.gain * x[:, self.leak]
        return mu, log_sigma


class ReadsTheNextPosition:
    """Row t reads x[:, t + 1]: a shift in the wrong direction."""

    seq_len = 6

    def affine(self, x, cond=None):
        ahead = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
        return 0.5 * ahead, torch.zeros_like(x)


class MapReadsNeighbourNoise:
    """A causal map whose row t also reads z[:, t - 1]."""

    seq_len = 5

    def inverse_map(self, x, z, cond=None):
        return z + 0.5 * shift_right(x) + 0.1 * shift_right(z)


class DisagreeingCache(CachedMLP):
    """affine_range is off from affine by `error` in mu at position `wrong`."""

    def __init__(self, inner, wrong: int, error: float):
        super().__init__(inner)
        self.wrong, self.error = wrong, error

    def affine_range(self, cache, x, start, stop, cond=None, rows=None):
        mu, log_sigma = super().affine_range(cache, x, start, stop, cond, rows)
        if start <= self.wrong < stop:
            mu = mu.clone()
            mu[:, self.wrong - start] += self.error
        return mu, log_sigma


class IgnoresRows(CachedMLP):
    """Reads the committed prefix of the first b samples instead of the samples `rows`."""

    def affine_range(self, cache, x, start, stop, cond=None, rows=None):
        prefix = cache["x"][: x.shape[0]]
        full = torch.cat([prefix[:, : cache["upto"]], x[:, cache["upto"]:]], dim=1)
        mu, log_sigma = self.inner.affine(full, cond)
        return mu[:, start:stop], log_sigma[:, start:stop]


class NeverRecomputes(CachedMLP):
    """Keeps the rows it computed first, whatever iterate it is given later (a stale KV cache)."""

    def affine_range(self, cache, x, start, stop, cond=None, rows=None):
        if "seen" not in cache:
            cache["seen"] = self.inner.affine(x, cond)
        mu, log_sigma = cache["seen"]
        if rows is not None:
            mu, log_sigma = mu[rows], log_sigma[rows]
        return mu[:, start:stop], log_sigma[:, start:stop]


class SnapshotReadsItsOwnPosition(CausalMLP):
    """Causal itself, but `snapshot()` (what a solve evaluates) reads x[:, last]."""

    def snapshot(self):
        return ReadsItsOwnPosition(self, leak=self.seq_len - 1)


class Leaky:
    """x_t = z_t + x_t / 2: reads its own position, so serial and Jacobi disagree."""

    seq_len = 6

    def affine(self, x, cond=None):
        return 0.5 * x, torch.zeros_like(x)


# ------------------------------------------------------------------ the library's blocks pass


@settings(max_examples=15, deadline=None)
@given(sizes)
def test_toy_blocks_pass_every_check(size):
    seq_len, dim, batch, seed = size["seq_len"], size["dim"], size["batch"], size["seed"]
    z = noise(batch, seq_len, dim, seed)
    inner = CausalMLP(seq_len, dim, seed=seed)
    assert check_block(inner, z) == ["check_causal", "check_exact_at_bound"]
    assert check_block(CachedMLP(inner), z) == ["check_causal", "check_cached_range", "check_exact_at_bound"]
    check_block(CausalLinear(seq_len, dim, seed=seed), z)
    check_block(Recurrence(seq_len, gain=0.9), z)


def test_conditioned_toy_block_passes_with_its_conditioning():
    z = noise(3, 7, 2, seed=1)
    cond = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    check_block(CausalMLP(7, 2, seed=3), z, cond)
    check_block(CachedMLP(CausalMLP(7, 2, seed=3)), z, cond)


def test_a_block_that_falls_back_still_reaches_the_serial_answer():
    check_block(Explosive(), noise(2, 12, 1, seed=2, scale=0.3))


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 9), st.integers(1, 3), st.integers(0, 2**16))
def test_made_blocks_pass_every_check_in_float64(features, batch, seed):
    torch.manual_seed(seed)
    made = MADE(features, hidden_features=[16, 16], order=torch.randperm(features)).double().eval()
    check_block(made, noise(batch, features, 1, seed))


def test_conditional_made_with_residual_blocks_passes():
    torch.manual_seed(0)
    made = MADE(6, hidden_features=[12], residual_blocks=1, context_features=3).double().eval()
    check_block(made, noise(4, 6, 1), torch.randn(4, 3, dtype=F64))


def test_made_in_float32_is_checked_in_float32():
    torch.manual_seed(0)
    made = MADE(5, hidden_features=[16]).eval()
    z = noise(2, 5, 1).float()
    check_block(made, z)  # tolerances scale with float32's epsilon; nothing is cast


@pytest.mark.skipif(importlib.util.find_spec("nflows") is None, reason="needs nflows")
class TestNflows:
    @staticmethod
    def flow(transforms, features):
        from nflows.distributions import StandardNormal
        from nflows.flows import Flow
        from nflows.transforms import CompositeTransform

        return Flow(CompositeTransform(transforms), StandardNormal([features])).double().eval()

    def test_maf_blocks_pass_every_check(self):
        from nflows.transforms import MaskedAffineAutoregressiveTransform, ReversePermutation

        from arflow_solvers.adapters.nflows import NflowsAffineBlock, wrap

        torch.manual_seed(0)
        flow = self.flow([MaskedAffineAutoregressiveTransform(6, 16, num_blocks=2),
                          ReversePermutation(6),
                          MaskedAffineAutoregressiveTransform(6, 16, num_blocks=1, use_residual_blocks=False)], 6)
        blocks = wrap(flow).blocks + wrap(flow, bitwise=False).blocks  # nflows' layers, packed MADEs
        assert len(blocks) == 4 and all(type(b) is NflowsAffineBlock for b in blocks)
        for block in blocks:  # inverse_map (what the solvers iterate) and affine, of block and snapshot
            assert check_block(block, noise(3, 6, 1)) == ["check_causal", "check_exact_at_bound"]

    def test_rational_quadratic_spline_blocks_pass_every_check(self):
        from nflows.transforms import MaskedPiecewiseRationalQuadraticAutoregressiveTransform as Spline

        from arflow_solvers.adapters.nflows import NflowsARBlock, wrap

        torch.manual_seed(0)
        spline = Spline(6, 16, num_bins=4, tails="linear", tail_bound=4.0, num_blocks=1)
        (block,) = wrap(self.flow([spline], 6)).blocks
        assert type(block) is NflowsARBlock  # solved through nflows' own spline inverse
        check_block(block, noise(3, 6, 1))


class TestTarFlow:
    @staticmethod
    def tiny(num_classes=3):
        return tiny_tarflow(num_classes=num_classes, layers=1)

    def test_tarflow_blocks_pass_every_check(self):
        from arflow_solvers.adapters.tarflow import TarFlowARBlock, as_flow

        blocks = as_flow(self.tiny()).blocks
        assert len(blocks) == 2 and all(isinstance(b, TarFlowARBlock) for b in blocks)
        labels = torch.tensor([0, 2, -1])
        for block in blocks:
            assert check_block(block, noise(3, 16, 4), labels) == [
                "check_causal", "check_cached_range", "check_exact_at_bound"]

    def test_guided_tarflow_blocks_pass_every_check(self):
        from arflow_solvers.adapters.tarflow import as_flow

        flow = as_flow(self.tiny(), guidance=1.5, guide_what="ab", attn_temp=0.8, annealed_guidance=True)
        for block in flow.blocks:
            check_block(block, noise(2, 16, 4), torch.tensor([1, 0]))

    def test_unconditional_tarflow_blocks_pass_every_check(self):
        from arflow_solvers.adapters.tarflow import as_flow

        for block in as_flow(self.tiny(num_classes=0)).blocks:
            check_block(block, noise(2, 16, 4))


class TestStarFlow:
    @pytest.mark.parametrize("name", ["fixture-like", "no-sos-learnt-positions-exp", "gqa-rms-swiglu-qk-post",
                                      "text-in-every-block", "unconditional"])
    def test_starflow_blocks_pass_every_check(self, name):
        from test_starflow import text, tiny_starflow

        from arflow_solvers.adapters.starflow import StarFlowARBlock, as_flow

        model = tiny_starflow(name)
        y, y_null = text(2)
        guided = name != "unconditional"
        flow = as_flow(model, guidance=2.0 if guided else 0.0, attn_temp=0.8)
        assert all(isinstance(b, StarFlowARBlock) for b in flow.blocks)
        for block in flow.blocks:
            cond = (y, y_null) if guided else None
            assert check_block(block, noise(2, 16, 2), cond) == [
                "check_causal", "check_cached_range", "check_exact_at_bound"]


# ------------------------------------------------------------------ broken blocks are caught


@settings(max_examples=25, deadline=None)
@given(sizes, st.data())
def test_a_row_that_reads_its_own_position_fails_check_causal_naming_it(size, data):
    seq_len, dim, batch, seed = size["seq_len"], size["dim"], size["batch"], size["seed"]
    leak = data.draw(st.integers(0, seq_len - 1), label="leak")
    block = ReadsItsOwnPosition(CausalMLP(seq_len, dim, seed=seed), leak)
    with pytest.raises(ConformanceError) as caught:
        check_causal(block, noise(batch, seq_len, dim, seed))
    error = caught.value
    assert error.check == "check_causal" and error.positions == [leak]
    assert f"s={leak} changed rows [{leak}]" in str(error)
    assert "ReadsItsOwnPosition" in str(error) and error.violation > 1e-3


def test_a_block_reading_ahead_fails_check_causal_at_every_position_but_the_first():
    with pytest.raises(ConformanceError, match=r"s=1 changed rows \[0\]") as caught:
        check_causal(ReadsTheNextPosition(), noise(2, 6, 3))
    assert caught.value.positions == [1, 2, 3, 4, 5]
    assert "mu rows t <= s" in str(caught.value)


def test_a_causal_map_reading_another_positions_noise_fails_check_causal():
    with pytest.raises(ConformanceError, match=r"perturbing z\[:, s\] changed inverse_map rows t != s") as caught:
        check_causal(MapReadsNeighbourNoise(), noise(2, 5, 1))
    assert caught.value.positions == [0, 1, 2, 3]  # perturbing z[:, 4] changes no other row


def test_the_snapshot_a_solve_evaluates_is_checked_too():
    with pytest.raises(ConformanceError, match=r"SnapshotReadsItsOwnPosition\.snapshot\(\) failed check_causal") as caught:
        check_causal(SnapshotReadsItsOwnPosition(5, 2), noise(2, 5, 2))
    assert caught.value.positions == [4]


def test_only_the_positions_asked_for_are_perturbed():
    block = ReadsItsOwnPosition(CausalMLP(8, 2), leak=5)
    check_causal(block, noise(2, 8, 2), positions=[0, 1, 7])
    with pytest.raises(ConformanceError):
        check_causal(block, noise(2, 8, 2), positions=[5])


def test_long_blocks_are_checked_at_a_spread_of_positions_including_the_last():
    block = ReadsItsOwnPosition(CausalLinear(40, 1), leak=39)
    with pytest.raises(ConformanceError) as caught:
        check_causal(block, noise(1, 40, 1))
    assert caught.value.positions == [39]


@settings(max_examples=20, deadline=None)
@given(sizes, st.data(), st.floats(1e-6, 1.0))
def test_a_cache_that_disagrees_with_affine_fails_check_cached_range_naming_the_position(size, data, error):
    seq_len, dim, batch, seed = size["seq_len"], size["dim"], size["batch"], size["seed"]
    wrong = data.draw(st.integers(0, seq_len - 1), label="wrong")
    block = DisagreeingCache(CausalMLP(seq_len, dim, seed=seed), wrong, error)
    with pytest.raises(ConformanceError, match="affine_range") as caught:
        check_cached_range(block, noise(batch, seq_len, dim, seed))
    assert caught.value.positions == [wrong] and caught.value.violation == pytest.approx(error)
    assert str(caught.value).startswith("DisagreeingCache failed check_cached_range: affine_range(start=")
    assert f"in mu at positions [{wrong}]" in str(caught.value)


def test_a_cache_that_ignores_rows_fails_check_cached_range():
    with pytest.raises(ConformanceError, match=r"rows=\[1\]"):
        check_cached_range(IgnoresRows(CausalMLP(6, 2)), noise(3, 6, 2))


def test_a_cache_that_never_recomputes_fails_check_cached_range():
    with pytest.raises(ConformanceError, match=r"differs from the same rows of affine\(x\)"):
        check_cached_range(NeverRecomputes(CausalMLP(6, 2)), noise(2, 6, 2))


def test_a_non_causal_block_is_stopped_by_the_solver_at_its_first_leaking_row():
    with pytest.raises(ConformanceError, match=r"Jacobi\(tol=0\.0\) stopped: Leaky is not causal: row 0") as caught:
        check_exact_at_bound(Leaky(), noise(2, 6, 1))
    assert caught.value.violation > 0.1 and caught.value.positions == [0]


def test_check_block_stops_at_the_first_failed_check():
    with pytest.raises(ConformanceError) as caught:
        check_block(Leaky(), noise(2, 6, 1))
    assert caught.value.check == "check_causal"


def test_conformance_errors_are_assertion_errors():
    assert issubclass(ConformanceError, AssertionError)


def test_bad_arguments_are_rejected_by_name():
    with pytest.raises(TypeError, match="AffineARBlock"):
        check_causal(object(), noise(1, 3, 1))
    with pytest.raises(ValueError, match=r"T=4"):
        check_causal(CausalMLP(4, 1), noise(1, 3, 1))
    with pytest.raises(TypeError, match="floating"):
        check_causal(CausalMLP(4, 1), torch.zeros(1, 4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        check_causal(CausalMLP(4, 1), noise(1, 4, 1), positions=[4])
    with pytest.raises(TypeError, match="CachedARBlock"):
        check_cached_range(CausalMLP(4, 1), noise(1, 4, 1))
    with pytest.raises(ValueError, match="commits"):
        check_cached_range(CachedMLP(CausalMLP(4, 1)), noise(1, 4, 1), commits=[2, 1])
    with pytest.raises(ValueError, match="overflows"):
        check_exact_at_bound(Explosive(), noise(1, 12, 1, scale=30.0))
