"""Beyond the paper: the calibrated planner picks per block the solver of least modelled time."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import init as inits
from .._evaluate import select_rows
from .._fingerprint import fingerprint
from .._progress import progress
from ..flow import Flow, is_ar_block
from ..metrics import BlockTrace, max_abs_error, trace
from ..plan import Plan
from ..solve import solve
from ..solvers import GSJacobi, Jacobi, Serial, Solver
from ..stopping import check_tolerance
from ._costs import Candidate, measure_costs, try_candidate
from ._float64 import serial_floor
from ._validation import HeldOut, largest_of

__all__ = ["CalibratedPlanner", "Calibration", "Candidate"]


@dataclass(frozen=True)
class Calibration:
    """What [`CalibratedPlanner`][arflow_solvers.planners.CalibratedPlanner] measured and chose.

    Attributes:
        plan: the chosen plan.
        candidates: per block, every candidate tried.
        chosen: per block, the index of the chosen candidate.
        seconds_per_pass: per block, `(per call, per full pass)` seconds used by the cost model.
        expected_speedup: modelled serial time over modelled plan time.
        end_to_end_error: max-abs error of the whole plan vs serial on the samples it was
            chosen on (the flow's output, over the samples serial finds finite).
        rounds: selections tried; each after the first tightened the per-block allowance.
        validated_error: max-abs error of the returned plan vs serial on the judged held-out
            samples, which took no part in choosing it (`None` without held-out samples).
        validation_samples: how many samples were held out.
        excluded: held-out samples not judged: their serial answer is further than
            `max_error` from a float64 solve (ill-conditioned noise), so no plan can be.
        estimated_max_error: the largest error over `promise_for` fresh samples, estimated
            from the held-out per-sample errors (a log-normal fit of their tail, never less
            than the largest observed): an estimate, not a bound.
        promise_for: the number of fresh samples the promise is about.
        tail_factor: the margin the estimate had to keep: the plan is promised when
            `estimated_max_error * tail_factor <= max_error`.
        floor: the flow's own serial sampling (in the calibration dtype) vs a float64 serial
            solve on the calibration samples: no plan's error against the truth is below it
            (`None` when the flow cannot be copied to float64, `0.0` in float64).
        promised: whether the returned plan's `estimated_max_error`, times `tail_factor`, is
            within `max_error`; when no plan's is, the default plan is returned and this is `False`.
        note: what the planner did besides choosing (returned the default or the exact plan).
    """

    plan: Plan
    candidates: list[list[Candidate]]
    chosen: list[int]
    seconds_per_pass: list[tuple[float, float]]
    expected_speedup: float
    end_to_end_error: float = 0.0
    rounds: int = 1
    validated_error: float | None = None
    validation_samples: int = 0
    floor: float | None = None
    promised: bool = True
    note: str = ""
    excluded: int = 0
    estimated_max_error: float | None = None
    promise_for: int = 0
    tail_factor: float = 1.0

    @property
    def meaning(self) -> str:
        """One sentence on what `validated_error` and `estimated_max_error` say, for printing."""
        if self.validated_error is None:
            return ("no samples were held out: the error was only measured on the samples the "
                    "plan was chosen on")
        judged = self.validation_samples - self.excluded
        skipped = f" ({self.excluded} ill-conditioned ones not judged)" if self.excluded else ""
        return (f"max error {self.validated_error:.3g} vs serial over {judged} held-out samples{skipped}; "
                f"estimated max over {self.promise_for} fresh samples {self.estimated_max_error:.3g} "
                f"(promised with a margin of {self.tail_factor:g}x): an estimate, not a bound")

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": str(self.plan),
            "plan_spec": self.plan.to_dict(),
            "expected_speedup": self.expected_speedup,
            "end_to_end_error": self.end_to_end_error,
            "rounds": self.rounds,
            "validated_error": self.validated_error,
            "validation_samples": self.validation_samples,
            "floor": self.floor,
            "excluded": self.excluded,
            "estimated_max_error": self.estimated_max_error,
            "promise_for": self.promise_for,
            "tail_factor": self.tail_factor,
            "promised": self.promised,
            "note": self.note,
            "meaning": self.meaning,
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
    `GSJacobi(m, tol=tol)` for each `m` in `segments`, by Jacobi at `tol / 3`, `tol / 10`,
    `tol / 30` and `tol / 100` and by the exact mode `Jacobi(tol=0)`.
    Each block gets the candidate with the least modelled time
    `passes * seconds_per_call + work * seconds_per_pass` (both measured on the block, median
    of `repeats` timings, unless `cost` fixes them) among those whose block error vs serial
    is within an allowance, at first `max_error`; `Serial` is always admissible.

    Block errors add up and later blocks amplify them, so the whole plan is then checked
    end to end: if the flow's output is further than `max_error / safety` from serial's,
    every allowance is divided by twice the excess and the blocks are chosen again; after
    `rounds` tries only error-free candidates remain (serial, or an exact mode that
    reproduces it).

    A promise must hold on noise the plan was not chosen on, and over more samples than the
    calibration batch: the last `validation` fraction of the batch is held out, the plan is
    chosen on the rest, and its per-sample errors on the held-out samples give an estimate
    of its largest error over `promise_for` fresh samples
    (`Calibration.estimated_max_error`; held-out samples on which float32 serial sampling is
    itself further than `max_error` from float64 are not judged). A plan keeps the promise
    when that estimate times `tail_factor` is within `max_error`: the estimate extrapolates
    a log-normal fit, and per-sample errors have heavier tails (a few ill-conditioned noise
    vectors), so it falls short of the true largest error by a factor the margin covers.
    If the default plan `Jacobi(tol=tol)` keeps the promise and is modelled no slower, or the
    calibrated plan misses it, the default is returned when it keeps it: a planner never
    makes sampling slower at the same validated error. Otherwise the loosest of Jacobi at
    `tol / 3`, `tol / 10`, `tol / 30` and `tol / 100` on every block that keeps the promise
    is returned (a finer ladder than decades: the error is not monotone in the tolerance on
    ill-conditioned flows, and each step tighter costs passes), else the exact plan
    (per block the cheaper of serial and `Jacobi(tol=0)`) if it does. A plan is returned in
    place of the default only if its modelled speed is at least `min_speed` times the
    default's: when the only plans that keep the promise are slower, the planner says so,
    naming the fastest of them and its speed (`Calibration.promised` is `False`, with a
    warning), and returns the default, so a planner never makes sampling slower than the
    default; `min_speed=None` returns the slower plan instead. If even the exact plan
    misses, no plan can keep the promise in this dtype: the planner says so and returns the
    default. A `max_error` below the flow's own
    float32-vs-float64 error (`Calibration.floor`) is warned about. With `cost` given the
    result is
    deterministic given the seed; with measured costs it can differ between runs whose
    timings differ. `plan(..., cache=path)` writes the plan and its calibration as JSON and
    reuses the plan only for the same planner settings, flow weights and calibration batch
    (a SHA-256 fingerprint of each); otherwise it calibrates again and overwrites the file.

    Arguments:
        tol: tolerance of the candidate solvers.
        max_error: largest admissible max-abs error vs serial, end to end.
        segments: segment counts to try (1 is Jacobi).
        init: initial guess of the candidates.
        repeats: timings per block for the cost model.
        cost: `(seconds_per_call, seconds_per_pass)` for every block instead of measuring.
        seed: seeds torch before calibrating.
        rounds: selections tried before only error-free candidates are allowed.
        validation: fraction of the batch held out to validate the plan (0: none).
        safety: the plan is chosen to meet `max_error / safety` on the other samples.
        promise_for: how many fresh samples the promise is about (the estimated largest
            error is over that many).
        tail_factor: the margin between the estimated largest error and `max_error` a
            promise needs (see above).
        min_speed: the least modelled speed, relative to the default plan's, of a plan
            returned in place of the default (see above); `None`: keep the promise at any speed.
    """

    tol: float = 1e-5
    max_error: float = 1e-4
    segments: tuple[int, ...] = (1, 2, 4, 8, 16)
    init: inits.Init = field(default=inits.noise)
    repeats: int = 3
    cost: tuple[float, float] | None = None
    seed: int = 0
    rounds: int = 4
    validation: float = 0.5
    safety: float = 2.0
    promise_for: int = 1000
    tail_factor: float = 4.0
    min_speed: float | None = 0.95

    def __post_init__(self) -> None:
        check_tolerance("tol", self.tol)
        if not (isinstance(self.max_error, (int, float)) and 0 < self.max_error < math.inf):
            raise ValueError(f"max_error must be a finite number > 0; got {self.max_error!r}")
        if not 0 <= self.validation < 1:
            raise ValueError(f"validation must be a fraction in [0, 1); got {self.validation!r}")
        if not self.safety >= 1:
            raise ValueError(f"safety must be >= 1; got {self.safety!r}")
        if not (isinstance(self.tail_factor, (int, float)) and 1 <= self.tail_factor < math.inf):
            raise ValueError(f"tail_factor must be a finite number >= 1; got {self.tail_factor!r}")
        if self.min_speed is not None and not (isinstance(self.min_speed, (int, float)) and 0 < self.min_speed < math.inf):
            raise ValueError(f"min_speed must be None or a finite number > 0; got {self.min_speed!r}")
        if not isinstance(self.promise_for, int) or self.promise_for < 1:
            raise ValueError(f"promise_for must be an int >= 1; got {self.promise_for!r}")

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
        """Choose on part of `z`, validate on the rest; see the class docstring."""
        torch.manual_seed(self.seed)
        flow = flow if isinstance(flow, Flow) else Flow([flow])
        (fit_z, fit_cond), (held_z, held_cond) = _split(z, cond, self.validation)
        traces = trace(flow, fit_z, fit_cond)
        reference = _output(flow, traces, fit_cond)
        options, all_candidates, costs = [], [], []
        for t in progress(traces, show_progress, desc="calibrating", unit="block"):
            cost = self.cost if self.cost is not None else measure_costs(t, self.repeats)
            options.append(self._candidates())
            all_candidates.append([try_candidate(t, solver, cost) for solver in options[-1]])
            costs.append(cost)
        chosen, error, rounds = self._select(flow, fit_z, fit_cond, reference, options, all_candidates)
        floor = serial_floor(flow, fit_z, fit_cond, reference)
        if floor is not None and self.max_error < floor:
            warnings.warn(f"max_error={self.max_error:g} is below the flow's own serial error floor "
                          f"{floor:.3g} (float32 vs float64): no plan can be validated against a truth "
                          "finer than that", stacklevel=2)
        serial_total = sum(c[0].expected_seconds for c in all_candidates)
        held = HeldOut.of(flow, held_z, held_cond, self.max_error)
        chosen, errors, promised, note = self._validate(held, options, all_candidates, chosen)
        if not promised:
            warnings.warn(note, stacklevel=2)
        plan = _as_plan([_simplest(o[c]) for o, c in zip(options, chosen)])
        plan_total = sum(c[i].expected_seconds for c, i in zip(all_candidates, chosen))
        validated = None if held_z.shape[0] == 0 else (float(errors.max()) if errors.numel() else 0.0)
        estimate = None if validated is None else largest_of(errors, self.promise_for)
        return Calibration(plan, all_candidates, chosen, costs, serial_total / max(plan_total, 1e-12),
                           error, rounds, validated, held_z.shape[0], floor, promised, note,
                           held.excluded, estimate, self.promise_for, self.tail_factor)

    def _candidates(self) -> list[Solver]:
        """Serial first, the default `Jacobi(tol)` second, then the others."""
        return [Serial(), Jacobi(tol=self.tol, init=self.init),
                *(GSJacobi(m, tol=self.tol, init=self.init) for m in self.segments if m != 1),
                *(Jacobi(tol=_tighter(self.tol, d), init=self.init) for d in _TIGHTER_BY),
                Jacobi(tol=0.0, init=self.init)]

    def _select(self, flow: Flow, z: Tensor, cond: Any, reference: Tensor, options: list,
                all_candidates: list) -> tuple[list[int], float, int]:
        """Per-block choices meeting `max_error / safety` end to end on `z`, tightening as needed."""
        target = self.max_error / self.safety
        allowance = target
        for rounds in range(1, self.rounds + 2):
            if rounds > self.rounds:
                allowance = 0.0
            chosen = [_cheapest(candidates, allowance) for candidates in all_candidates]
            plan = _as_plan([_simplest(o[c]) for o, c in zip(options, chosen)])
            error = max_abs_error(solve(flow, z, plan, cond=cond, throw=False).x, reference)
            if error <= target or allowance == 0.0:
                return chosen, error, rounds
            allowance /= 2 * error / target
        raise AssertionError("unreachable")  # pragma: no cover

    def _validate(self, held: HeldOut, options: list, all_candidates: list,
                  chosen: list[int]) -> tuple[list[int], Tensor, bool, str]:
        """`(chosen, per-sample held-out errors, promised, note)`, in the order the class docstring gives."""
        if held.z.shape[0] == 0:
            nothing = torch.zeros(0, dtype=torch.float64)
            if held.excluded == 0:
                return chosen, nothing, True, ""
            return [1] * len(chosen), nothing, False, (
                f"on every held-out sample serial sampling in {held.serial.dtype} is itself further than "
                f"max_error={self.max_error:g} from float64, so no plan can keep the promise; the default plan "
                "is returned; raise max_error, or sample in float64")
        judge = _Judge(self, held, options, all_candidates)
        errors, kept = judge.verdict(chosen)
        default = judge.default
        if chosen != default and (not kept or judge.seconds(default) <= judge.seconds(chosen)):
            default_errors, default_kept = judge.verdict(default)
            if default_kept:
                reason = "is modelled no slower than the calibrated one" if kept else "while the calibrated one did not"
                return default, default_errors, True, (f"the default plan kept the promise and {reason}, so it "
                                                       "is returned")
        if kept and judge.fast_enough(chosen):
            return chosen, errors, True, ""
        missed = (f"the calibrated plan missed the promise on the held-out samples (estimated max "
                  f"{largest_of(errors, self.promise_for):.3g}, times {self.tail_factor:g}, > {self.max_error:g})"
                  if not kept else "the calibrated plan keeps the promise only slower than the default")
        return self._fall_back(judge, [(chosen, "the calibrated plan")] if kept else [], missed)

    def _fall_back(self, judge: _Judge, keeping: list[tuple[list[int], str]],
                   missed: str) -> tuple[list[int], Tensor, bool, str]:
        """A uniformly tighter Jacobi, else the exact plan, if fast enough; else the default, saying why."""
        for tighter in _uniformly_tighter(judge.options[0], self.tol):  # each slower than the one before
            picks, name = [tighter] * len(judge.default), f"{_simplest(judge.options[0][tighter])} on every block"
            errors, kept = judge.verdict(picks)
            if kept and judge.fast_enough(picks):
                return picks, errors, True, f"{missed}, so {name} is returned"
            if kept:
                keeping.append((picks, name))
                break
        exact = [_cheapest(candidates, 0.0) for candidates in judge.all_candidates]  # may be fast: cached serial
        if judge.fast_enough(exact) or not keeping:
            errors, kept = judge.verdict(exact)
            if kept and judge.fast_enough(exact):
                return exact, errors, True, f"{missed}, so the exact plan is returned"
            if kept:
                keeping.append((exact, "the exact plan"))
        default_errors = judge.verdict(judge.default)[0]
        if keeping:
            picks, name = min(keeping, key=lambda plan: judge.seconds(plan[0]))
            return judge.default, default_errors, False, (
                f"no plan modelled at least {self.min_speed:g}x as fast as the default keeps max_error="
                f"{self.max_error:g} over {self.promise_for} samples: {name} does (estimated max "
                f"{largest_of(judge.verdict(picks)[0], self.promise_for):.3g}) at "
                f"{judge.seconds(judge.default) / judge.seconds(picks):.3g}x the default's modelled speed; the "
                "default plan is returned, which may err more; pass min_speed=None to be given the slower plan")
        return judge.default, default_errors, False, (
            f"no plan keeps max_error={self.max_error:g} over {self.promise_for} samples on this flow: even the "
            f"exact plan's estimated max error is {largest_of(judge.verdict(exact)[0], self.promise_for):.3g} "
            f"(rounding in {judge.held.serial.dtype} amplified by ill-conditioned samples), so the default plan is "
            "returned; raise max_error, or sample in float64")


class _Judge:
    """Per-block picks judged on the held-out samples (each plan solved once) and priced by the cost model."""

    def __init__(self, planner: CalibratedPlanner, held: HeldOut, options: list, all_candidates: list):
        self.planner, self.held, self.options, self.all_candidates = planner, held, options, all_candidates
        self.default = [1] * len(options)  # Jacobi(tol) on every block
        self._verdicts: dict[tuple[int, ...], tuple[Tensor, bool]] = {}

    def verdict(self, picks: list[int]) -> tuple[Tensor, bool]:
        """The plan's held-out errors and whether it keeps the promise."""
        if tuple(picks) not in self._verdicts:
            p = self.planner
            errors = self.held.errors(_as_plan([_simplest(o[c]) for o, c in zip(self.options, picks)]))
            self._verdicts[tuple(picks)] = errors, largest_of(errors, p.promise_for) * p.tail_factor <= p.max_error
        return self._verdicts[tuple(picks)]

    def seconds(self, picks: list[int]) -> float:
        """The plan's modelled wall time."""
        return sum(c[i].expected_seconds for c, i in zip(self.all_candidates, picks))

    def fast_enough(self, picks: list[int]) -> bool:
        """Whether the plan's modelled speed is at least `min_speed` times the default's."""
        speed = self.planner.min_speed
        return speed is None or self.seconds(picks) * speed <= self.seconds(self.default)


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A cache file's contents, or `None` when it is missing or not a planner cache."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "plan_spec" in data else None


def _uniformly_tighter(candidates: Sequence[Solver], tol: float) -> list[int]:
    """Indices of the plain Jacobi candidates with a tolerance in `(0, tol)`, loosest first."""
    found = [(i, s.tol) for i, s in enumerate(candidates)
             if type(s) is Jacobi and 0 < s.tol < tol]
    return [i for i, _ in sorted(found, key=lambda item: -item[1])]


_TIGHTER_BY = (3, 10, 30, 100)  # the uniformly tighter Jacobi tolerances tried: tol / each


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


def _split(z: Tensor, cond: Any, fraction: float) -> tuple[tuple[Tensor, Any], tuple[Tensor, Any]]:
    """`(fit, held)`: the first samples to choose on, the last `fraction` held out."""
    batch = z.shape[0]
    if batch == 0:
        raise ValueError("z is an empty batch; metrics and planners need at least one sample")
    held = int(round(batch * fraction))
    if fraction > 0 and batch >= 2:
        held = min(max(held, 1), batch - 1)
    elif fraction > 0:
        raise ValueError(f"validation={fraction} needs a batch of at least 2 samples to hold some out; "
                         f"got {batch} (or pass validation=0)")
    fit = torch.arange(batch - held, device=z.device)
    rest = torch.arange(batch - held, batch, device=z.device)
    return (z[fit], select_rows(cond, fit, batch)), (z[rest], select_rows(cond, rest, batch))
