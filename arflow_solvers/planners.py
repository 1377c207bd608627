"""Planners: choose, per block, how many segments and iterations to spend."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from ._progress import progress

from . import init as inits
from ._fingerprint import fingerprint
from .flow import Flow, is_ar_block
from .metrics import BlockMetrics, BlockTrace, Norm, flow_metrics, max_abs_error, trace
from .plan import Plan
from .solve import solve
from .solvers import GSJacobi, Jacobi, Serial, Solver

__all__ = ["select_tough", "MetricPlanner", "CalibratedPlanner", "Calibration", "Candidate"]


def select_tough(crms: Sequence[float], dominance: float = 2.0, max_tough: int | None = None) -> list[int]:
    """Indices of the tough blocks: repeatedly take the block whose CRM dominates.

    The block with the largest CRM among those not yet taken is tough while its CRM exceeds
    `dominance` times the median CRM of all blocks; taking stops at the first block that
    does not dominate (or after `max_tough`). The median, not the mean of the rest, is the
    reference so that one easy block's tiny CRM cannot make its neighbour look tough.

    Examples:
        >>> select_tough([1.0, 1.2, 9.0, 0.9, 3.1, 1.1], dominance=2.0)
        [2, 4]
    """
    if dominance <= 1.0:
        raise ValueError(f"dominance must be > 1; got {dominance}")
    if not crms:
        return []
    reference = statistics.median(crms)
    ranked = sorted(range(len(crms)), key=lambda i: crms[i], reverse=True)
    tough = [i for i in ranked if crms[i] > dominance * reference]
    return tough if max_tough is None else tough[:max_tough]


@dataclass(frozen=True)
class MetricPlanner:
    """The paper's planner: IGM picks the initial guess, CRM picks the tough blocks.

    Each block starts from the initial guess (`Z` or `Z0`) with the smaller IGM on that
    block, as the paper's per-block guess list does (`shared_init=True`: the one with the
    smaller IGM summed over blocks, everywhere). Tough blocks (see
    [`select_tough`][arflow_solvers.planners.select_tough]) get
    `GSJacobi(segments, max_iters=gs_iters)`, the rest `Jacobi(max_iters=else_iters)`, so
    the plan prints in the paper's `[Stack-GS-J-Else]` notation when the blocks share their
    guess (otherwise as Python). Blocks without an output projection (no CRM) are never
    tough and start from `Z`.

    Arguments:
        dominance: how many times the median CRM a block's CRM must exceed to be tough.
        max_tough: at most this many tough blocks (`None`: no limit).
        segments: GS segments of a tough block.
        gs_iters: iteration cap per segment of a tough block (`None`: the bound).
        else_iters: iteration cap of the other blocks (`None`: the bound).
        tol: tolerance of every solver.
        norm: matrix norm of the metrics.
        shared_init: one initial guess for every block instead of one per block.

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849
    """

    dominance: float = 2.0
    max_tough: int | None = None
    segments: int = 8
    gs_iters: int | None = None
    else_iters: int | None = None
    tol: float = 1e-5
    norm: Norm = "spectral"
    shared_init: bool = False

    def plan_from_metrics(self, metrics: Sequence[BlockMetrics]) -> Plan:
        """The plan for a flow whose per-block metrics are given."""
        if self.shared_init:
            known = [m for m in metrics  # blocks without `affine` have no IGM (NaN)
                     if math.isfinite(m.igm_noise) and math.isfinite(m.igm_zeros_first_exact)]
            overall = _better_guess(sum(m.igm_noise for m in known),
                                    sum(m.igm_zeros_first_exact for m in known))
            guesses = [overall for _ in metrics]
        else:
            guesses = [_better_guess(m.igm_noise, m.igm_zeros_first_exact) for m in metrics]
        crms = [m.crm if m.crm is not None else 0.0 for m in metrics]
        tough = set(select_tough(crms, self.dominance, self.max_tough))
        usual = Counter(guesses).most_common(1)[0][0] if guesses else inits.noise
        default = Jacobi(tol=self.tol, max_iters=self.else_iters, init=usual)
        overrides: dict[int, Solver] = {}
        for position, (m, guess) in enumerate(zip(metrics, guesses)):
            if position in tough:
                overrides[m.index] = GSJacobi(self.segments, tol=self.tol, max_iters=self.gs_iters,
                                              init=guess)
            elif guess is not usual:
                overrides[m.index] = Jacobi(tol=self.tol, max_iters=self.else_iters, init=guess)
        return Plan(default, overrides)

    def plan(self, flow: Flow | Any, z: Tensor, cond: Any = None,
             show_progress: bool = False) -> Plan:
        """Measure the metrics on a calibration batch `z` and return the plan."""
        return self.plan_from_metrics(
            flow_metrics(flow, z, cond, self.tol, self.norm, show_progress=show_progress)
        )


def _better_guess(igm_noise: float, igm_zeros_first_exact: float) -> inits.Init:
    """The paper's Z0 when its IGM is smaller, else Z (also when the IGM is unknown, NaN)."""
    return inits.zeros_first_exact if igm_zeros_first_exact < igm_noise else inits.noise


@dataclass(frozen=True)
class Candidate:
    """One solver tried on one block during calibration."""

    solver: str
    passes: int
    work: float
    max_error: float
    expected_seconds: float


@dataclass(frozen=True)
class Calibration:
    """What [`CalibratedPlanner`][arflow_solvers.planners.CalibratedPlanner] measured and chose.

    Attributes:
        plan: the chosen plan.
        candidates: per block, every candidate tried.
        chosen: per block, the index of the chosen candidate.
        seconds_per_pass: per block, `(per call, per full pass)` seconds used by the cost model.
        expected_speedup: modelled serial time over modelled plan time.
        end_to_end_error: max-abs error of the whole plan vs serial on the calibration batch
            (the flow's output, over the samples serial finds finite).
        rounds: selections tried; each after the first tightened the per-block allowance.
    """

    plan: Plan
    candidates: list[list[Candidate]]
    chosen: list[int]
    seconds_per_pass: list[tuple[float, float]]
    expected_speedup: float
    end_to_end_error: float = 0.0
    rounds: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": str(self.plan),
            "plan_spec": self.plan.to_dict(),
            "expected_speedup": self.expected_speedup,
            "end_to_end_error": self.end_to_end_error,
            "rounds": self.rounds,
            "blocks": [
                {"chosen": c, "seconds_per_call": s[0], "seconds_per_pass": s[1],
                 "candidates": [vars(k) for k in cands]}
                for c, s, cands in zip(self.chosen, self.seconds_per_pass, self.candidates)
            ],
        }


@dataclass(frozen=True)
class CalibratedPlanner:
    """Beyond the paper: choose per block the solver with the least modelled wall time.

    On a calibration batch, each block is solved serially (the reference), by
    `GSJacobi(m, tol=tol)` for each `m` in `segments`, by Jacobi at `tol / 10` and `tol / 100`
    and by the exact mode `Jacobi(tol=0)`.
    Each block gets the candidate with the least modelled time
    `passes * seconds_per_call + work * seconds_per_pass` (both measured on the block, median
    of `repeats` timings, unless `cost` fixes them) among those whose block error vs serial
    is within an allowance, at first `max_error`; `Serial` is always admissible.

    Block errors add up and later blocks amplify them, so the whole plan is then checked
    end to end: if the flow's output on the calibration batch is further than `max_error`
    from serial's, every allowance is divided by twice the excess and the blocks are chosen
    again; after `rounds` tries only error-free candidates remain (serial, or an exact mode
    that reproduces it). The returned plan therefore meets `max_error` end to end on the
    calibration batch; on other noise it is an estimate, so calibrate on a batch as varied
    as the samples you will draw. With `cost` given the result is
    deterministic given the seed; with measured costs it can differ between runs whose
    timings differ. `plan(..., cache=path)` writes the plan and its calibration as JSON and
    reuses the plan only for the same planner settings, flow weights and calibration batch
    (a SHA-256 fingerprint of each); otherwise it calibrates again and overwrites the file.

    Arguments:
        tol: tolerance of the candidate solvers.
        max_error: largest admissible max-abs error vs serial on the calibration batch.
        segments: segment counts to try (1 is Jacobi).
        init: initial guess of the candidates.
        repeats: timings per block for the cost model.
        cost: `(seconds_per_call, seconds_per_pass)` for every block instead of measuring.
        seed: seeds torch before calibrating.
        rounds: selections tried before only error-free candidates are allowed.
    """

    tol: float = 1e-5
    max_error: float = 1e-4
    segments: tuple[int, ...] = (1, 2, 4, 8, 16)
    init: inits.Init = field(default=inits.noise)
    repeats: int = 3
    cost: tuple[float, float] | None = None
    seed: int = 0
    rounds: int = 4

    def plan(self, flow: Flow | Any, z: Tensor, cond: Any = None, cache: str | Path | None = None,
             show_progress: bool = False) -> Plan:
        """Calibrate on `z` and return the plan (read from `cache` when it exists)."""
        if cache is None:
            return self.calibrate(flow, z, cond, show_progress).plan
        key = self._cache_key(flow, z, cond)
        cached = _read_cache(Path(cache))
        if cached is not None and cached.get("calibrated_for") == key:
            return Plan.from_dict(cached["plan_spec"])
        calibration = self.calibrate(flow, z, cond, show_progress)
        Path(cache).write_text(json.dumps({"calibrated_for": key, "plan_spec": calibration.plan.to_dict(),
                                           "calibration": calibration.to_dict()}, indent=2))
        return calibration.plan

    def _cache_key(self, flow: Flow | Any, z: Tensor, cond: Any) -> dict[str, Any]:
        """What a cached plan was calibrated for: this planner, the flow's weights, the batch."""
        settings = {name: getattr(value, "__name__", None) or repr(value)
                    for name, value in vars(self).items()}
        steps = list(flow) if isinstance(flow, Flow) else [flow]
        return {"planner": settings, "flow": fingerprint(steps), "batch": fingerprint(z, cond)}

    def calibrate(self, flow: Flow | Any, z: Tensor, cond: Any = None,
                  show_progress: bool = False) -> Calibration:
        """Measure every candidate on every block; see the class docstring."""
        torch.manual_seed(self.seed)
        flow = flow if isinstance(flow, Flow) else Flow([flow])
        traces = trace(flow, z, cond)
        reference = _output(flow, traces, cond)
        options, all_candidates, costs = [], [], []
        for t in progress(traces, show_progress, desc="calibrating", unit="block"):
            cost = self.cost if self.cost is not None else _measure_costs(t, self.repeats)
            tried = [Serial(), *(GSJacobi(m, tol=self.tol, init=self.init) for m in self.segments),
                     *(Jacobi(tol=_tighter(self.tol, d), init=self.init) for d in (10, 100)),
                     Jacobi(tol=0.0, init=self.init)]
            options.append(tried)
            all_candidates.append([_try(t, solver, cost) for solver in tried])
            costs.append(cost)
        allowance = self.max_error
        for rounds in range(1, self.rounds + 2):
            if rounds > self.rounds:
                allowance = 0.0
            chosen = [_cheapest(candidates, allowance) for candidates in all_candidates]
            plan = _as_plan([_simplest(o[c]) for o, c in zip(options, chosen)])
            error = max_abs_error(solve(flow, z, plan, cond=cond, throw=False).x, reference)
            if error <= self.max_error or allowance == 0.0:
                break
            allowance /= 2 * error / self.max_error
        serial_total = sum(c[0].expected_seconds for c in all_candidates)
        plan_total = sum(c[i].expected_seconds for c, i in zip(all_candidates, chosen))
        return Calibration(plan, all_candidates, chosen, costs,
                           serial_total / max(plan_total, 1e-12), error, rounds)


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A cache file's contents, or `None` when it is missing or not a planner cache."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "plan_spec" in data else None


def _tighter(tol: float, factor: int) -> float:
    """`tol / factor`, rounded to 6 digits so that 1e-5 / 10 prints as 1e-06."""
    return float(f"{tol / factor:.6g}")


def _cheapest(candidates: Sequence[Candidate], allowance: float) -> int:
    admissible = [i for i, c in enumerate(candidates) if i == 0 or c.max_error <= allowance]
    return min(admissible, key=lambda i: candidates[i].expected_seconds)


def _output(flow: Flow, traces: Sequence[BlockTrace], cond: Any) -> Tensor:
    """The flow's output from its traced blocks: the steps after the last block applied."""
    steps = list(flow)
    last = max(i for i, step in enumerate(steps) if is_ar_block(step))
    x = traces[-1].x
    for step in steps[last + 1:]:
        x = step(x, cond)
    return x


def _simplest(solver: Solver) -> Solver:
    if isinstance(solver, GSJacobi) and solver.segments == 1:
        return Jacobi(tol=solver.tol, init=solver.init)
    return solver


def _as_plan(solvers: Sequence[Solver]) -> Plan:
    default = Counter(solvers).most_common(1)[0][0] if solvers else Jacobi()
    return Plan(default, {i: s for i, s in enumerate(solvers) if s != default})


def _try(t: BlockTrace, solver: Solver, cost: tuple[float, float]) -> Candidate:
    x, stats = solver.solve(t.block, t.z, t.cond, t.index)
    error = max_abs_error(x, t.x) if x.numel() else 0.0
    seconds = stats.passes * cost[0] + stats.work * cost[1]
    return Candidate(repr(solver), stats.passes, stats.work, error, seconds)


def _measure_costs(t: BlockTrace, repeats: int) -> tuple[float, float]:
    """`(seconds per call, seconds per full pass)` of one block, from two timings.

    One Jacobi iteration costs `c + p` (one call, one full pass). For a KV-cached block,
    serial costs `T c + p` (`T` one-position calls, one pass of work in all), which
    separates the two; without a cache every call is a full pass and `c` is folded into `p`.
    """
    one_pass = _median_seconds(lambda: Jacobi(max_iters=1).solve(t.block, t.z, t.cond), repeats)
    seq_len = t.z.shape[1]
    if not callable(getattr(t.block, "affine_range", None)) or seq_len < 2:
        return 0.0, one_pass
    serial = _median_seconds(lambda: Serial().solve(t.block, t.z, t.cond), 1)
    per_call = max(0.0, (serial - one_pass) / (seq_len - 1))
    return per_call, max(0.0, one_pass - per_call)


def _median_seconds(fn, repeats: int) -> float:
    timings = []
    for _ in range(max(1, repeats)):
        began = time.perf_counter()
        with torch.no_grad():
            fn()
        timings.append(time.perf_counter() - began)
    return statistics.median(timings)
