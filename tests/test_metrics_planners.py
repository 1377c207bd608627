"""IGM / CRM match hand computation; planners return valid plans that meet their tolerance."""

import json
import numpy as np
import pytest
import torch

from arflow_solvers import (CalibratedPlanner, Flow, Jacobi, MetricPlanner, Plan, Serial,
                            crm, igm, init, iterations_to_tolerance, solve)
from arflow_solvers import init as inits
from arflow_solvers.metrics import BlockMetrics, flow_metrics, max_abs_error
from arflow_solvers.planners import select_tough
from arflow_solvers.planners._validation import largest_of
from toys import CausalLinear, CausalMLP, serial_reference, shift_right


class ProjectedBlock:
    """mu = h W_u^T, log_sigma = h W_s^T with h_t = tanh(x_{t-1}) (D = H = 2)."""

    seq_len = 5

    def __init__(self, gain=1.0, seed=0, scale_gain=0.3):
        g = torch.Generator().manual_seed(seed)
        self.w_u = torch.randn(2, 2, generator=g, dtype=torch.float64) * gain
        self.w_s = torch.randn(2, 2, generator=g, dtype=torch.float64) * scale_gain

    def affine(self, x, cond=None):
        h = torch.tanh(shift_right(x))
        return h @ self.w_u.T, h @ self.w_s.T

    def output_projection(self):
        return self.w_u, self.w_s


def test_igm_is_the_distance_of_one_iteration_from_the_answer():
    block = CausalLinear(6, 2, seed=3)
    z = torch.randn(4, 6, 2, dtype=torch.float64)
    x_star = serial_reference(block, z)
    mu, log_sigma = block.affine(z)
    one_step = (np.exp(log_sigma.numpy()) * z.numpy() + mu.numpy() - x_star.numpy())
    expected = np.mean([np.linalg.norm(m, 2) for m in one_step])
    assert igm(block, z, x_star, init.noise) == pytest.approx(expected, rel=1e-12)
    expected_fro = np.mean([np.linalg.norm(m, "fro") for m in one_step])
    assert igm(block, z, x_star, init.noise, norm="frobenius") == pytest.approx(expected_fro, rel=1e-12)


def test_igm_is_zero_when_one_iteration_lands_on_the_answer():
    block = CausalLinear(1, 3)  # one position: a single iteration is exact
    z = torch.randn(2, 1, 3, dtype=torch.float64)
    assert igm(block, z, serial_reference(block, z), init.zeros) == pytest.approx(0.0, abs=1e-14)


def test_crm_matches_hand_computation():
    block = ProjectedBlock()
    z = torch.randn(3, 5, 2, dtype=torch.float64)
    x = serial_reference(block, z)
    _, log_sigma = block.affine(x)
    scaled = np.mean([np.linalg.norm(m, 2) for m in (np.exp(-log_sigma.numpy()) * x.numpy())])
    expected = scaled * np.linalg.norm(block.w_s.numpy(), 2) + np.linalg.norm(block.w_u.numpy(), 2)
    assert crm(block, x) == pytest.approx(expected, rel=1e-12)


def test_crm_needs_an_output_projection():
    with pytest.raises(TypeError, match="output_projection"):
        crm(CausalLinear(3, 1), torch.zeros(1, 3, 1, dtype=torch.float64))


def test_iterations_to_tolerance_never_exceed_the_bound():
    block = CausalMLP(9, 2, seed=2)
    z = torch.randn(5, 9, 2, dtype=torch.float64)
    iterations = iterations_to_tolerance(block, z, tol=0.0)
    assert iterations.shape == (5,) and bool((iterations <= 9).all()) and bool((iterations >= 1).all())


@pytest.mark.parametrize("crms, tough", [
    ([1.0, 1.1, 0.9, 1.2], []),                       # nothing dominates
    ([1.0, 1.1, 12.0, 1.2], [2]),                     # one tough block, as in the paper's TarFlows
    ([25.0, 1.1, 1.0, 6.0, 0.8, 1.0, 1.2, 1.1], [0, 3]),  # a second block dominates the rest
])
def test_tough_blocks_are_those_whose_crm_dominates(crms, tough):
    assert select_tough(crms, dominance=2.0) == tough


# CRM of each block (% of the total, density order) of the four TarFlows of Liu & Qin (2025),
# and the blocks their published strategies segment: [6-8-32-10], [7-8-32-10],
# [0/6-8-32-20], [0/7-...]. Numbers from the paper's Table 2, as listed in the authors'
# repository README (github.com/encoreus/GS-Jacobi_for_TarFlow).
PAPER_CRM = {
    "Img128cond": ([5.22, 5.63, 2.47, 10.93, 7.74, 7.35, 56.57, 4.05], {6}),
    "AFHQ": ([6.33, 6.28, 8.16, 7.94, 9.01, 10.27, 9.36, 42.60], {7}),
    "Img64uncond": ([50.71, 2.42, 2.29, 3.38, 1.77, 1.33, 33.62, 4.44], {0, 6}),
    "Img64cond": ([74.58, 4.88, 0.72, 0.96, 4.05, 2.68, 1.62, 10.46], {0, 7}),
}


@pytest.mark.parametrize("model", sorted(PAPER_CRM))
def test_metric_planner_reproduces_the_papers_tough_blocks(model):
    crms, tough = PAPER_CRM[model]
    assert set(select_tough(crms)) == tough
    metrics = [BlockMetrics(index=i, igm_noise=1.0, igm_zeros_first_exact=2.0, crm=c,
                            iterations_mean=1.0, iterations_max=1) for i, c in enumerate(crms)]
    plan = MetricPlanner(segments=8, gs_iters=32, else_iters=10).plan_from_metrics(metrics)
    assert set(plan.overrides) == tough
    assert str(plan).endswith("-8-32-10]")


def test_dominance_and_max_tough_bound_the_selection():
    crms = [100.0, 30.0, 9.0, 1.0, 1.0, 1.0, 1.0]  # median 1
    assert select_tough(crms, dominance=2.0) == [0, 1, 2]
    assert select_tough(crms, dominance=2.0, max_tough=1) == [0]
    with pytest.raises(ValueError, match="dominance"):
        select_tough(crms, dominance=1.0)


def two_block_flow():
    easy = dict(gain=0.2, scale_gain=0.01)
    return Flow([ProjectedBlock(seed=1, **easy), ProjectedBlock(gain=6.0, seed=2),
                 ProjectedBlock(seed=3, **easy)])


def test_metric_planner_gives_the_dominant_block_gs_segments_in_paper_notation():
    flow = two_block_flow()
    z = 0.1 * torch.randn(8, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    metrics = flow_metrics(flow, z)
    assert metrics[1].crm > 2 * max(metrics[0].crm, metrics[2].crm)
    plan = MetricPlanner(segments=5, gs_iters=5, else_iters=5, shared_init=True).plan(flow, z)
    assert set(plan.overrides) == {1}
    assert str(plan) == "[1-5-5-5]"
    assert Plan.parse(str(plan), init=plan.default.init) == plan


def test_a_metric_plan_that_can_only_be_slower_than_the_default_is_replaced_by_it_with_a_warning():
    class Long(ProjectedBlock):
        seq_len = 16

    easy = dict(gain=0.2, scale_gain=0.01)
    flow = Flow([Long(seed=1, **easy), Long(gain=6.0, seed=2), Long(seed=3, **easy)])
    z = 0.1 * torch.randn(8, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    paper = MetricPlanner(segments=8, never_costlier=False).plan(flow, z)
    assert set(paper.overrides) == {1}  # GS-Jacobi on the tough block: as many calls as Jacobi, more work
    with pytest.warns(UserWarning, match="it can only be slower, so the default is returned"):
        assert MetricPlanner(segments=8).plan(flow, z) == Plan(Jacobi())


def test_metric_planner_picks_each_blocks_initial_guess_by_its_igm():
    metrics = [BlockMetrics(index=i, igm_noise=z, igm_zeros_first_exact=z0, crm=1.0,
                            iterations_mean=1.0, iterations_max=1)
               for i, (z, z0) in enumerate([(1.0, 2.0), (3.0, 0.5), (1.0, 4.0), (float("nan"), 1.0)])]
    plan = MetricPlanner().plan_from_metrics(metrics)
    assert [plan.solver_for(i).init for i in range(4)] == [
        inits.noise, inits.zeros_first_exact, inits.noise, inits.noise]
    shared = MetricPlanner(shared_init=True).plan_from_metrics(metrics)
    assert shared.overrides == {} and shared.default.init is inits.noise  # sums: 5 vs 6.5


def test_calibrated_plan_meets_its_tolerance_and_is_cached(tmp_path):
    flow = Flow([CausalMLP(12, 2, seed=s, weight_scale=w) for s, w in ((0, 0.5), (1, 2.5), (2, 0.5))])
    z = torch.randn(6, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    planner = CalibratedPlanner(tol=1e-6, max_error=1e-5, cost=(1.0, 1.0), validation=0.0, safety=1.0)
    calibration = planner.calibrate(flow, z)
    again = planner.calibrate(flow, z)
    assert calibration.plan == again.plan  # deterministic with a fixed cost model
    for block, chosen in zip(calibration.candidates, calibration.chosen):
        assert block[chosen].max_error <= 1e-5
        assert block[chosen].expected_seconds == min(c.expected_seconds for c in block if c.max_error <= 1e-5)
    assert calibration.expected_speedup > 1.0
    x = solve(flow, z, calibration.plan).x
    assert (x - solve(flow, z, Serial()).x).abs().max() <= 1e-5
    path = tmp_path / "plan.json"
    plan = planner.plan(flow, z, cache=path)
    assert plan == calibration.plan
    assert Plan.from_dict(json.loads(path.read_text())["plan_spec"]) == plan


def test_a_cached_plan_is_reused_only_for_what_it_was_calibrated_for(tmp_path, monkeypatch):
    flow = Flow([CausalMLP(12, 2, seed=0, weight_scale=0.5)])
    z = torch.randn(4, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "plan.json"
    CalibratedPlanner(max_error=1e-5, cost=(1.0, 1.0)).plan(flow, z, cache=path)
    calls = []
    original = CalibratedPlanner.calibrate
    monkeypatch.setattr(CalibratedPlanner, "calibrate",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    CalibratedPlanner(max_error=1e-5, cost=(1.0, 1.0)).plan(flow, z, cache=path)
    assert calls == []  # same planner, flow and batch: the cache is used
    CalibratedPlanner(max_error=1e-3, cost=(1.0, 1.0)).plan(flow, z, cache=path)
    assert calls == [1]  # another max_error
    flow.blocks[0].w1.mul_(0.5)
    CalibratedPlanner(max_error=1e-3, cost=(1.0, 1.0)).plan(flow, z, cache=path)
    assert calls == [1, 1]  # other weights
    CalibratedPlanner(max_error=1e-3, cost=(1.0, 1.0)).plan(flow, z + 1, cache=path)
    assert calls == [1, 1, 1]  # another calibration batch


def test_calibrated_plan_meets_its_tolerance_end_to_end_when_later_steps_amplify_errors():
    # Block errors within max_error become 1000x larger at the output: the planner must see
    # it on the whole flow and tighten its per-block allowance until the output is within.
    flow = Flow([CausalMLP(12, 2, seed=0, weight_scale=1.5), CausalMLP(12, 2, seed=1, weight_scale=1.5),
                 lambda x, cond=None: 1000.0 * x])
    z = torch.randn(6, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    planner = CalibratedPlanner(tol=1e-4, max_error=1e-4, cost=(1.0, 1.0), validation=0.0, safety=1.0)
    calibration = planner.calibrate(flow, z)
    assert calibration.rounds > 1
    serial = solve(flow, z, Serial()).x
    error = (solve(flow, z, calibration.plan).x - serial).abs().max().item()
    assert error == pytest.approx(calibration.end_to_end_error) and error <= 1e-4
    assert [block[0].max_error for block in calibration.candidates] == [0.0, 0.0]  # serial


@pytest.mark.parametrize("planner", [MetricPlanner(), CalibratedPlanner(cost=(1.0, 1.0))])
def test_planners_name_an_empty_batch_or_a_wrong_sequence_length(planner):
    flow = Flow([CausalMLP(6, 2)])
    with pytest.raises(ValueError, match="empty batch"):
        planner.plan(flow, torch.zeros(0, 6, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"block 0 expects input of shape \(B, T=6, D\); got \((3|1), 5, 2\)"):
        planner.plan(flow, torch.zeros(3, 5, 2, dtype=torch.float64))


def _three_blocks(dtype=torch.float64):
    return Flow([CausalMLP(12, 2, seed=s, weight_scale=w, dtype=dtype) for s, w in ((0, 0.5), (1, 2.5), (2, 0.5))])


def test_a_calibrated_plan_is_validated_on_samples_it_was_not_chosen_on():
    z = torch.randn(8, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z[4:] *= 8  # the held-out half is harder than the half the plan is chosen on
    flow = _three_blocks()
    calibration = CalibratedPlanner(tol=1e-3, max_error=1e-4, cost=(1.0, 1.0), min_speed=None).calibrate(flow, z)
    held_out_error = max_abs_error(solve(flow, z[4:], calibration.plan).x, solve(flow, z[4:], Serial()).x)
    assert calibration.validation_samples == 4
    assert calibration.validated_error == pytest.approx(held_out_error, rel=1e-12)
    assert calibration.promised and calibration.validated_error <= 1e-4
    assert "4 held-out samples" in calibration.meaning and "not a bound" in calibration.meaning
    assert calibration.to_dict()["validated_error"] == calibration.validated_error


def test_a_plan_that_misses_on_held_out_samples_is_replaced_by_the_exact_plan_and_says_so():
    z = torch.randn(8, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    planner = CalibratedPlanner(tol=1e-3, max_error=1e-4, cost=(1.0, 1.0), min_speed=None)
    calibration = planner.calibrate(_three_blocks(), z)
    assert "calibrated plan missed the promise on the held-out samples" in calibration.note
    assert calibration.promised and calibration.estimated_max_error <= 1e-4
    assert calibration.validated_error <= 1e-12  # the exact plan reproduces serial
    assert all(block[i].max_error == 0.0 for block, i in zip(calibration.candidates, calibration.chosen))


def test_the_default_plan_is_returned_when_it_is_as_good_and_no_slower():
    z = torch.randn(8, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # Charging per call only, every candidate costs T calls on these blocks: serial is chosen
    # first, yet the default (Jacobi at tol) is modelled no slower and meets max_error.
    planner = CalibratedPlanner(tol=1e-4, max_error=1e-1, cost=(1.0, 0.0), segments=(1, 2))
    calibration = planner.calibrate(_three_blocks(), z)
    assert calibration.plan == Plan(Jacobi(tol=1e-4))
    assert "default plan kept the promise" in calibration.note and calibration.promised


def test_when_no_plan_can_keep_the_promise_the_planner_says_so_and_returns_the_default(monkeypatch):
    from arflow_solvers.planners import _validation

    # every plan, the exact one included, errs by 1e-3 on every held-out sample
    monkeypatch.setattr(_validation.HeldOut, "errors", lambda self, plan: torch.full((self.z.shape[0],), 1e-3))
    z = torch.randn(8, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="no plan keeps max_error=0.0001 over 1000 samples"):
        calibration = CalibratedPlanner(tol=1e-3, max_error=1e-4, cost=(1.0, 1.0)).calibrate(_three_blocks(), z)
    assert calibration.plan == Plan(Jacobi(tol=1e-3)) and not calibration.promised


def test_a_promise_needs_a_margin_of_tail_factor_over_the_estimated_largest_error(monkeypatch):
    from arflow_solvers.planners import _validation

    # every plan errs by 3e-5 on every held-out sample: within 1e-4, but not by 4x
    monkeypatch.setattr(_validation.HeldOut, "errors", lambda self, plan: torch.full((self.z.shape[0],), 3e-5))
    z = torch.randn(8, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    planner = CalibratedPlanner(tol=1e-3, max_error=1e-4, cost=(1.0, 1.0))
    with pytest.warns(UserWarning, match="no plan keeps max_error"):
        assert not planner.calibrate(_three_blocks(), z).promised
    relaxed = CalibratedPlanner(tol=1e-3, max_error=1e-4, cost=(1.0, 1.0), tail_factor=1.0).calibrate(_three_blocks(), z)
    assert relaxed.promised and relaxed.tail_factor == 1.0 and "margin of 1x" in relaxed.meaning
    with pytest.raises(ValueError, match="tail_factor must be a finite number >= 1"):
        CalibratedPlanner(tail_factor=0.5)


def test_a_missed_promise_tries_a_uniformly_tighter_jacobi_but_never_returns_a_slower_plan_unasked(monkeypatch):
    from arflow_solvers.planners import _validation

    def errors(self, plan):  # every uniform Jacobi at 1e-4 or tighter keeps the promise, nothing looser
        tight = type(plan.default) is Jacobi and 0 < plan.default.tol <= 1e-4 and not plan.overrides
        return torch.full((self.z.shape[0],), 1e-6 if tight else 1e-3)

    monkeypatch.setattr(_validation.HeldOut, "errors", errors)
    z = torch.randn(8, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    planner = CalibratedPlanner(tol=1e-3, max_error=1e-4, cost=(1.0, 1.0), min_speed=None)
    calibration = planner.calibrate(_three_blocks(), z)
    assert calibration.plan == Plan(Jacobi(tol=1e-4)) and calibration.promised  # the loosest of 3.3e-4, 1e-4, ...
    assert "Jacobi(tol=0.0001) on every block is returned" in calibration.note

    # by default a plan slower than the default is named, not returned
    with pytest.warns(UserWarning, match=r"no plan modelled at least 0.95x as fast as the default keeps max_error="
                                         r"0.0001 over 1000 samples: Jacobi\(tol=0.0001\) on every block does"):
        hesitant = CalibratedPlanner(tol=1e-3, max_error=1e-4, cost=(1.0, 1.0)).calibrate(_three_blocks(), z)
    assert hesitant.plan == Plan(Jacobi(tol=1e-3)) and not hesitant.promised
    assert "pass min_speed=None to be given the slower plan" in hesitant.note
    with pytest.raises(ValueError, match="min_speed must be None or a finite number > 0"):
        CalibratedPlanner(min_speed=0)


def test_the_promise_is_about_many_fresh_samples_not_the_few_held_out():
    """The largest of 1000 errors is estimated from 32: neither always above nor always below it."""
    gen = torch.Generator().manual_seed(0)
    above = 0
    for _ in range(200):
        errors = torch.exp(torch.randn(1032, generator=gen, dtype=torch.float64) * 1.5 - 10)
        estimate = largest_of(errors[:32], 1000)
        assert estimate >= errors[:32].max()
        above += estimate >= errors[32:].max()
    assert 0.3 <= above / 200 <= 0.95, above
    assert largest_of(torch.zeros(16, dtype=torch.float64), 10**6) == 0.0


def test_held_out_samples_on_which_float32_itself_misses_float64_are_not_judged():
    from toys import Recurrence

    flow = Flow([Recurrence(40, gain=1.5)])  # expansive: float32 rounding grows like 1.5^t
    z = torch.randn(12, 40, 1, generator=torch.Generator().manual_seed(0))
    z[:6] *= 1e-9  # tiny noise: tiny absolute rounding errors, judged; the rest is not
    order = torch.tensor([0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11])  # held out: 3 tiny, 3 ordinary
    with pytest.warns(UserWarning, match="below the flow's own serial error floor"):
        calibration = CalibratedPlanner(max_error=1e-4, cost=(1.0, 1.0)).calibrate(flow, z[order])
    assert calibration.validation_samples == 6 and calibration.excluded == 3
    assert "3 ill-conditioned ones not judged" in calibration.meaning


@pytest.mark.filterwarnings("ignore:on every held-out sample serial sampling")
def test_the_floor_of_float32_sampling_is_reported_and_a_max_error_below_it_warned_about():
    z = torch.randn(6, 12, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"max_error=1e-09 is below the flow's own serial error floor"):
        calibration = CalibratedPlanner(max_error=1e-9, cost=(1.0, 1.0)).calibrate(_three_blocks(torch.float32), z)
    assert 0 < calibration.floor < 1e-4
    assert CalibratedPlanner(cost=(1.0, 1.0)).calibrate(_three_blocks(), z.double()).floor == 0.0


@pytest.mark.parametrize("options, name", [(dict(validation=1.0), "validation"), (dict(safety=0.5), "safety"),
                                           (dict(max_error=0.0), "max_error"), (dict(tol=-1.0), "tol")])
def test_planner_options_that_cannot_work_are_refused_by_name(options, name):
    with pytest.raises(ValueError, match=name):
        CalibratedPlanner(**options)


def test_an_exact_plan_modelled_as_fast_as_the_default_is_returned_though_a_tighter_jacobi_is_slow(monkeypatch):
    """Cached serial can be modelled about as fast as the default: it is tried even after a slow tighter Jacobi."""
    import dataclasses

    from arflow_solvers.planners import _validation, calibrated

    seconds = {"Serial": 2.05, "GSJacobi": 1.0, "Jacobi(tol=0.001)": 2.0, "Jacobi(tol=0.0)": 4.0}

    def modelled(t, solver, cost):  # every other Jacobi (the tighter ones): 3.0; GS-Jacobi never error-free
        key = next((k for k in seconds if repr(solver).startswith(k)), None)
        found = real_try(t, solver, cost)
        return dataclasses.replace(found, expected_seconds=seconds.get(key, 3.0),
                                   max_error=max(found.max_error, 1e-5) if key == "GSJacobi" else found.max_error)

    def errors(self, plan):  # GS-Jacobi and the default miss, tighter Jacobi keeps, serial is exact
        solvers = [plan.default, *plan.overrides.values()]
        if all(type(s) is Serial for s in solvers):
            return torch.zeros(self.z.shape[0])
        tight = all(type(s) is Jacobi and 0 < s.tol < 1e-3 for s in solvers)
        return torch.full((self.z.shape[0],), 1e-6 if tight else 1e-3)

    real_try = calibrated.try_candidate
    monkeypatch.setattr(calibrated, "try_candidate", modelled)
    monkeypatch.setattr(_validation.HeldOut, "errors", errors)
    monkeypatch.setattr(CalibratedPlanner, "_select", lambda self, *args: ([2, 2, 2], 0.0, 1))  # GSJacobi(2)
    z = torch.randn(8, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    calibration = CalibratedPlanner(tol=1e-3, max_error=1e-4, cost=(1.0, 1.0)).calibrate(_three_blocks(), z)
    assert calibration.plan == Plan(Serial()) and calibration.promised
    assert "so the exact plan is returned" in calibration.note
