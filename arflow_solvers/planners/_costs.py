"""The calibrated planner's cost model: each candidate solver tried on a traced block, and timed."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..metrics import BlockTrace, max_abs_error
from ..solvers import Jacobi, Serial, Solver

__all__ = ["Candidate", "try_candidate", "measure_costs", "median_seconds"]


@dataclass(frozen=True)
class Candidate:
    """One solver tried on one block during calibration."""

    solver: str
    passes: int
    work: float
    max_error: float
    expected_seconds: float



def try_candidate(t: BlockTrace, solver: Solver, cost: tuple[float, float]) -> Candidate:
    x, stats = solver.solve(t.block, t.z, t.cond, t.index)
    error = max_abs_error(x, t.x) if x.numel() else 0.0
    seconds = stats.passes * cost[0] + stats.work * cost[1]
    return Candidate(repr(solver), stats.passes, stats.work, error, seconds)


def measure_costs(t: BlockTrace, repeats: int) -> tuple[float, float]:
    """`(seconds per call, seconds per full pass)` of one block, from two timings.

    One Jacobi iteration costs `c + p` (one call, one full pass). For a KV-cached block,
    serial costs `T c + p` (`T` one-position calls, one pass of work in all), which
    separates the two; without a cache every call is a full pass and `c` is folded into `p`.
    """
    one_pass = median_seconds(lambda: Jacobi(max_iters=1).solve(t.block, t.z, t.cond), repeats)
    seq_len = t.z.shape[1]
    if not callable(getattr(t.block, "affine_range", None)) or seq_len < 2:
        return 0.0, one_pass
    serial = median_seconds(lambda: Serial().solve(t.block, t.z, t.cond), 1)
    per_call = max(0.0, (serial - one_pass) / (seq_len - 1))
    return per_call, max(0.0, one_pass - per_call)


def median_seconds(fn, repeats: int) -> float:
    timings = []
    for _ in range(max(1, repeats)):
        began = time.perf_counter()
        with torch.no_grad():
            fn()
        timings.append(time.perf_counter() - began)
    return statistics.median(timings)
