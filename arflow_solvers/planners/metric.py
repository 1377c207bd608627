"""The paper's planner: IGM picks each block's initial guess, CRM picks the tough blocks."""

from __future__ import annotations

import math
import statistics
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import init as inits
from ..flow import Flow
from ..metrics import BlockMetrics, Norm, flow_metrics
from ..plan import Plan
from ..solve import solve
from ..solvers import GSJacobi, Jacobi, Solver

__all__ = ["select_tough", "MetricPlanner"]


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
        never_costlier: return the default `Jacobi(tol)` instead of a plan that costs more
            calls and work on the calibration batch (see `no_costlier`).

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
    never_costlier: bool = True

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
        """Measure the metrics on a calibration batch `z` and return the plan (see `no_costlier`)."""
        chosen = self.plan_from_metrics(flow_metrics(flow, z, cond, self.tol, self.norm, show_progress=show_progress))
        return self.no_costlier(chosen, flow, z, cond)

    def no_costlier(self, chosen: Plan, flow: Flow | Any, z: Tensor, cond: Any = None) -> Plan:
        """`chosen`, or the default `Jacobi(tol)` with a warning if `chosen` costs more on `z` and never less.

        Both are solved on the calibration batch: when the metric plan makes at least as many
        network calls and at least as much work (full-pass equivalents) as the default, one
        of them more, it can only be slower, whatever the hardware, so the default is
        returned (`never_costlier=False`: the paper's plan regardless). With the same
        tolerance, neither promises more than the other.
        """
        default = Plan(Jacobi(tol=self.tol))
        if not self.never_costlier or chosen == default:
            return chosen
        ours, theirs = (solve(flow, z, plan, cond=cond, throw=False) for plan in (chosen, default))
        costs, default_costs = (ours.passes, ours.work), (theirs.passes, theirs.work)
        if costs != default_costs and all(a >= b for a, b in zip(costs, default_costs)):
            warnings.warn(f"the metric plan {chosen} costs {ours.passes} network calls and {ours.work:.3g} full "
                          f"passes of work on the calibration batch, the default {default} {theirs.passes} and "
                          f"{theirs.work:.3g}: it can only be slower, so the default is returned "
                          "(never_costlier=False keeps the metric plan)", stacklevel=3)
            return default
        return chosen


def _better_guess(igm_noise: float, igm_zeros_first_exact: float) -> inits.Init:
    """The paper's Z0 when its IGM is smaller, else Z (also when the IGM is unknown, NaN)."""
    return inits.zeros_first_exact if igm_zeros_first_exact < igm_noise else inits.noise
