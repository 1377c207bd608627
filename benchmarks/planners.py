"""Benchmark: do the planners keep their promises on fresh noise, and are their plans fast? One JSON.

For each model (a checkpoint loaded through the `arflow-solvers plan` loaders, or a small
built-in one), each planner plans on a calibration batch; then, on `--fresh` new noise vectors
the plans never saw, the plan and the default plan (`Jacobi(tol=TOL)`) are compared with
serial sampling: max-abs error (the promise is `--max-error` for the calibrated planner), and
wall time, timed round-robin (`--rounds`, best kept, spread reported). The flow's own float32
serial error against a float64 solve (the floor no plan can beat) is reported beside them, and
errors are also given over the "judged" samples only: those whose float32 serial answer is
within `--max-error` of the float64 one (on the others no plan can keep a promise).

    python benchmarks/planners.py --model nflows=runs/maf600/maf-....pt --fresh 1000
    python benchmarks/planners.py --model tarflow=runs/tarflow_....pt --fresh 256
    python benchmarks/planners.py --tiny            # built-in random models, seconds
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import sys
import time
from datetime import date
from typing import Any

import torch

from arflow_solvers import CalibratedPlanner, Jacobi, MetricPlanner, Plan, Serial, solve
from arflow_solvers.__main__ import loaders
from arflow_solvers.metrics import max_abs_error
from arflow_solvers.planners._float64 import float64_answer, serial_floor
from arflow_solvers.planners._validation import largest_of, per_sample_errors

__all__ = ["main", "evaluate"]

MIN_SPEEDS = {"calibrated": 0.95, "calibrated_any_speed": None}
"""The calibrated planners compared: the default (never slower than the default plan) and any speed."""


def _timed(run: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    result = run()
    return time.perf_counter() - began, result


def _round_robin(plans: dict[str, Any], flow: Any, z: torch.Tensor, cond: Any, rounds: int,
                 max_batch: int | None) -> dict[str, dict[str, Any]]:
    """Best and worst wall time of each plan over `rounds` turns, and its last samples."""
    seconds: dict[str, list[float]] = {name: [] for name in plans}
    samples: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for name, plan in plans.items():
            took, solution = _timed(lambda: solve(flow, z, plan, cond=cond, throw=False, max_batch=max_batch))
            seconds[name].append(took)
            samples[name] = solution.x
    return {name: {"best_seconds": min(t), "spread": max(t) / min(t) - 1, "x": samples[name]}
            for name, t in seconds.items()}


def evaluate(name: str, flow: Any, calibration: tuple[torch.Tensor, Any], fresh: tuple[torch.Tensor, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    """One model's row: each planner's plan, promise, validated and fresh errors and speed."""
    z_cal, cond_cal = calibration
    z, cond = fresh
    default = Jacobi(tol=args.tol)
    calibrations = {name: CalibratedPlanner(tol=args.tol, max_error=args.max_error, seed=args.seed,
                                            promise_for=z.shape[0], min_speed=speed).calibrate(flow, z_cal, cond_cal)
                    for name, speed in MIN_SPEEDS.items()}
    plans = {"default": Plan(default), **{name: c.plan for name, c in calibrations.items()},
             "metric": MetricPlanner(tol=args.tol).plan(flow, z_cal, cond_cal)}
    truth = Serial() if args.reference == "serial" else Jacobi(tol=0.0)
    reference = solve(flow, z, truth, cond=cond, throw=False, max_batch=args.max_batch).x
    timing = _round_robin(plans, flow, z, cond, args.rounds, args.max_batch)
    truth = float64_answer(flow, z, cond) if z.dtype != torch.float64 else None
    judged = _well_conditioned(reference, truth, args.max_error)
    rows = {}
    for planner, plan in plans.items():
        rows[planner] = {
            "plan": str(plan),
            "fresh_error": max_abs_error(timing[planner]["x"], reference),
            "fresh_error_judged": max_abs_error(timing[planner]["x"][judged], reference[judged]),
            "best_seconds": timing[planner]["best_seconds"],
            "spread": timing[planner]["spread"],
            "speed_vs_default": timing["default"]["best_seconds"] / timing[planner]["best_seconds"],
            "tail": tail_study(per_sample_errors(timing[planner]["x"][judged], reference[judged]),
                               calibrations["calibrated"].validation_samples - calibrations["calibrated"].excluded,
                               args.seed),
        }
    for name, calibrated in calibrations.items():
        held = rows[name]["fresh_error_judged"] <= args.max_error
        rows[name].update(promised_max_error=args.max_error, min_speed=MIN_SPEEDS[name],
                          promised=calibrated.promised, validated_error=calibrated.validated_error,
                          validation_samples=calibrated.validation_samples, note=calibrated.note,
                          calibration_floor=calibrated.floor, excluded=calibrated.excluded,
                          estimated_max_error=calibrated.estimated_max_error,
                          promise_for=calibrated.promise_for, meaning=calibrated.meaning,
                          promise_held_on_fresh=held if calibrated.promised else None,
                          target_met=(held or not calibrated.promised) and rows[name]["speed_vs_default"] >= 0.95)
    return {"model": name, "calibration_samples": z_cal.shape[0], "fresh_samples": z.shape[0],
            "judged_samples": int(judged.sum()), "floor_on_fresh": serial_floor(flow, z, cond, reference, truth),
            "planners": rows}


def tail_study(errors: torch.Tensor, held_out: int, seed: int, draws: int = 2000) -> dict[str, Any]:
    """How the planner's estimate of the largest error would fare on these fresh per-sample errors.

    The spread of their logarithms, how many standard deviations the largest lies above
    the mean, and, over `draws` random subsets of `held_out` errors (as many as the planner
    judged), how often and by how much `largest_of(subset, n)` falls short of the largest of all.
    """
    positive = errors[errors > 0]
    if positive.numel() < 2 or held_out < 2:
        return {}
    logs = positive.log()
    generator = torch.Generator().manual_seed(seed)
    largest = float(errors.max())
    ratios = torch.tensor([largest / max(largest_of(errors[torch.randperm(errors.numel(), generator=generator)[:held_out]],
                                                    errors.numel()), 1e-300) for _ in range(draws)])
    return {"log_sd": float(logs.std()), "largest_in_sd": float((logs.max() - logs.mean()) / logs.std()),
            "subset": held_out, "draws": draws, "estimate_short_fraction": float((ratios > 1).double().mean()),
            "largest_over_estimate_median": float(ratios.median()),
            "largest_over_estimate_p90": float(ratios.quantile(0.9))}


def _well_conditioned(reference: torch.Tensor, truth: torch.Tensor | None, max_error: float) -> torch.Tensor:
    """`(B,)` bool: samples whose serial answer is within `max_error` of the float64 answer `truth`.

    On the others (a trained MAF explodes on about one noise vector in a hundred) float32
    sampling itself misses the truth by more than any promise, so no plan can be judged there.
    Without a float64 answer every sample the reference has finite is judged.
    """
    if truth is None:
        return torch.isfinite(reference.flatten(1)).all(1)
    floor = (reference.double() - truth).abs().flatten(1).amax(1)
    return torch.isfinite(floor) & (floor <= max_error)


@torch.no_grad()  # sampling, as users run it
def _no_grad_evaluate(*args: Any) -> dict[str, Any]:
    return evaluate(*args)


def _tiny_models(args: argparse.Namespace) -> dict[str, tuple]:
    """Random stand-ins: a small nflows MAF and a small TarFlow, no checkpoint needed."""
    from arflow_solvers.adapters.nflows import build_maf, wrap
    from arflow_solvers.adapters.tarflow import TarFlow, as_flow

    torch.manual_seed(args.seed)
    maf = build_maf(16, 32, 3).eval()
    tarflow = TarFlow(1, 8, 2, channels=64, num_blocks=2, layers_per_block=1).eval()
    draw = lambda n, t, d, s: torch.randn(n, t, d, generator=torch.Generator().manual_seed(s))  # noqa: E731
    return {
        "tiny nflows MAF": (wrap(maf), (draw(args.calibration, 16, 1, 1), None), (draw(args.fresh, 16, 1, 2), None)),
        "tiny TarFlow": (as_flow(tarflow), (draw(args.calibration, 16, 4, 1), None), (draw(args.fresh, 16, 4, 2), None)),
    }


def _loaded_models(args: argparse.Namespace) -> dict[str, tuple]:
    models = {}
    for spec in args.model:
        kind, _, path = spec.partition("=")
        module, _, function = loaders()[kind].partition(":")
        load = getattr(importlib.import_module(module), function)
        flow, z_cal, cond_cal = load(path, args.calibration, args.seed, "cpu")
        _, z, cond = load(path, args.fresh, args.seed + 1, "cpu")
        models[f"{kind}:{path}"] = (flow, (z_cal, cond_cal), (z, cond))
    return models


def _strict(value: Any) -> Any:
    """`value` with non-finite floats as strings ("inf", "nan"), so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=[], help="KIND=CHECKPOINT (KIND: an installed loader)")
    p.add_argument("--tiny", action="store_true", help="built-in random models instead of checkpoints")
    p.add_argument("--calibration", type=int, default=32, help="calibration batch (half is held out)")
    p.add_argument("--fresh", type=int, default=1000, help="fresh noise vectors to check the plans on")
    p.add_argument("--max-error", type=float, default=1e-4)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (best kept)")
    p.add_argument("--max-batch", type=int, default=None, help="solve at most this many samples at once")
    p.add_argument("--reference", choices=["serial", "exact"], default="serial",
                   help="exact: Jacobi(tol=0), serial's answer bit for bit for blocks evaluated by full "
                        "passes (nflows, MADE), in far fewer passes")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("give --model KIND=CHECKPOINT (repeatable) or --tiny")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = _tiny_models(args) if args.tiny else _loaded_models(args)
    result = {
        "benchmark": "planners", "date": date.today().isoformat(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "settings": {
            k: v for k, v in vars(args).items() if k not in ("out",)},
        "models": [_no_grad_evaluate(name, flow, cal, fresh, args) for name, (flow, cal, fresh) in models.items()],
    }
    text = json.dumps(_strict(result), indent=2, default=str, allow_nan=False)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
