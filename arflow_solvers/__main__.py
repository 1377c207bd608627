"""Command line: `arflow-solvers plan CHECKPOINT --model tarflow` (or `python -m arflow_solvers`).

Loads a checkpoint through an adapter's `load_for_planning(path, batch, seed, device)`, which
returns `(flow, calibration_noise, cond)`, runs a planner, checks the plan against serial
inversion on the calibration batch, and prints the metrics table, the plan and the measured
speedup; `--json` writes all of it as one JSON file, `--out` the plan alone (`Plan.load`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from .metrics import flow_metrics, max_abs_error, trace
from .planners import CalibratedPlanner, MetricPlanner
from .solve import solve
from .solvers import Serial

__all__ = ["main", "loaders", "MODELS_GROUP"]

MODELS_GROUP = "arflow_solvers.models"
"""Entry-point group of model loaders: `name = "package.module:load_for_planning"`.

A loader is `load_for_planning(path, batch, seed, device) -> (flow, noise, cond)`. A package
adds a model kind to `arflow-solvers plan --model NAME` by declaring one in its metadata::

    [project.entry-points."arflow_solvers.models"]
    mymodel = "my_package.flows:load_for_planning"
"""


def loaders() -> dict[str, str]:
    """Installed model kinds and their loaders (`module:function`), from the entry points."""
    return {point.name: point.value for point in entry_points(group=MODELS_GROUP)}


def _loader(name: str) -> Any:
    known = loaders()
    target = known.get(name, name)
    module, _, function = target.partition(":")
    if not function:
        raise SystemExit(f"--model must be one of {sorted(known)} or module:function; got {name!r}")
    return getattr(importlib.import_module(module), function)


def _table(metrics: Sequence[Any]) -> str:
    lines = ["block  IGM(Z)      IGM(Z0)     CRM         iters(mean/max)"]
    for m in metrics:
        crm = f"{m.crm:<11.4g}" if m.crm is not None else "-          "
        lines.append(f"{m.index:<6d} {m.igm_noise:<11.4g} {m.igm_zeros_first_exact:<11.4g} {crm} "
                     f"{m.iterations_mean:.1f}/{m.iterations_max}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arflow-solvers", description="Plan fast sampling of an AR flow.")
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="measure metrics, choose a plan, check it")
    plan.add_argument("checkpoint", help="path of the checkpoint the adapter loads")
    plan.add_argument("--model", required=True, help="an installed model kind (see MODELS_GROUP) or module:function")
    plan.add_argument("--planner", choices=["metric", "calibrated"], default="calibrated")
    plan.add_argument("--batch", type=int, default=16, help="calibration batch size")
    plan.add_argument("--tol", type=float, default=1e-5, help="solver tolerance")
    plan.add_argument("--max-error", type=float, default=1e-4, help="calibrated: max abs error vs serial")
    plan.add_argument("--segments", type=int, default=8, help="metric: GS segments of tough blocks")
    plan.add_argument("--shared-init", action="store_true",
                      help="metric: one initial guess for all blocks (default: per block, by IGM)")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--device", default="cpu")
    plan.add_argument("--out", help="write the plan here (JSON, read by Plan.load)")
    plan.add_argument("--json", help="write metrics, plan and check here (JSON)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `arflow-solvers` command."""
    args = _parser().parse_args(argv)
    flow, z, cond = _loader(args.model)(args.checkpoint, args.batch, args.seed, args.device)
    traces = trace(flow, z, cond)
    metrics = flow_metrics(flow, z, cond, args.tol, traces=traces, show_progress=True)
    calibration = None
    if args.planner == "metric":
        plan = MetricPlanner(segments=args.segments, tol=args.tol,
                             shared_init=args.shared_init).plan_from_metrics(metrics)
    else:
        calibration = CalibratedPlanner(tol=args.tol, max_error=args.max_error,
                                        seed=args.seed).calibrate(flow, z, cond, show_progress=True)
        plan = calibration.plan
    began = time.perf_counter()
    reference = solve(flow, z, Serial(), cond=cond, throw=False)
    serial_seconds = time.perf_counter() - began
    began = time.perf_counter()
    planned = solve(flow, z, plan, cond=cond, throw=False)
    plan_seconds = time.perf_counter() - began
    check = {
        "speedup_vs_serial": serial_seconds / plan_seconds,
        "max_abs_error": max_abs_error(planned.x, reference.x),
        "passes": planned.passes,
        "serial_passes": reference.passes,
    }
    print(_table(metrics))
    print(f"plan: {plan}")
    if calibration is not None:
        print(f"expected speedup (cost model): {calibration.expected_speedup:.2f}x; "
              f"selection rounds: {calibration.rounds}")
    print(f"on the calibration batch: {check['speedup_vs_serial']:.2f}x vs serial, "
          f"max abs error {check['max_abs_error']:.3g}, {check['passes']} passes vs {check['serial_passes']}")
    if args.out:
        plan.save(args.out)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"plan": str(plan), "plan_spec": plan.to_dict(), "check": check,
                       "metrics": [m.to_dict() for m in metrics],
                       "calibration": calibration.to_dict() if calibration else None},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
