"""Command line: `arflow-solvers plan CHECKPOINT --model tarflow` (or `python -m arflow_solvers`).

Loads a checkpoint through an adapter's `load_for_planning(path, batch, seed, device)`, which
returns `(flow, calibration_noise, cond)`, runs a planner, checks the plan against serial
inversion on the calibration batch, and prints the metrics table, the plan and the measured
speedup; `--json` writes all of it as one JSON file, `--out` the plan alone (`Plan.load`).

Mistakes in the command (a missing or unreadable checkpoint, a wrong `--model`, a device this
machine lacks, an `--out` or `--json` in a missing folder) are reported in one line, with exit
status 2, before any work; a plan that cannot be made is reported in one line with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from .metrics import flow_metrics, max_abs_error, trace
from .planners import CalibratedPlanner, MetricPlanner
from .solution import SolveError
from .solve import solve
from .solvers import Serial

__all__ = ["main", "loaders", "MODELS_GROUP"]

MODELS_GROUP = "arflow_solvers.models"
"""Entry-point group of model loaders: `name = "package.module:load_for_planning"`.

A loader is `load_for_planning(path, batch, seed, device) -> (flow, noise, cond)`; one that
can read pickled files declares a keyword-only `trust_pickle: bool = False` and refuses them
unless it is True (`--trust-pickle`). A package adds a model kind to
`arflow-solvers plan --model NAME` by declaring one in its metadata::

    [project.entry-points."arflow_solvers.models"]
    mymodel = "my_package.flows:load_for_planning"
"""


def loaders() -> dict[str, str]:
    """Installed model kinds and their loaders (`module:function`), from the entry points."""
    return {point.name: point.value for point in entry_points(group=MODELS_GROUP)}


class _CommandError(Exception):
    """A mistake in the command, reported in one line with exit status 2."""


def _loader(name: str) -> Any:
    known = loaders()
    target = known.get(name, name)
    module, _, function = target.partition(":")
    if not function:
        raise _CommandError(f"--model must be one of {sorted(known)} or module:function; got {name!r}")
    try:
        loader = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise _CommandError(f"--model {name}: cannot import {target} ({_one_line(error)})") from None
    if not callable(loader):
        raise _CommandError(f"--model {name}: {target} is not callable")
    return loader


def _accepts_trust_pickle(loader: Any) -> bool:
    try:
        parameters = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): assume the classic four arguments
        return False
    return any(p.name == "trust_pickle" or p.kind is p.VAR_KEYWORD for p in parameters)


def _check_device(name: str) -> None:
    try:
        torch.empty(1, device=torch.device(name))
    except (RuntimeError, AssertionError, ValueError) as error:  # unknown name, or not on this machine
        raise _CommandError(f"--device {name} is not usable here: {_one_line(error, 160)}") from None


def _check_output(option: str, path: str | None) -> None:
    if path is None:
        return
    folder = Path(path).parent
    if Path(path).is_dir():
        raise _CommandError(f"{option} {path} is a folder; give a file name")
    if not folder.is_dir():
        raise _CommandError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise _CommandError(f"{option} {path}: folder {folder} is not writable")


def _check_command(args: argparse.Namespace) -> Any:
    """Everything that can be checked before loading; returns the loader."""
    if not Path(args.checkpoint).exists():
        raise _CommandError(f"checkpoint {args.checkpoint} does not exist")
    _check_output("--out", args.out)
    _check_output("--json", args.json)
    _check_device(args.device)
    loader = _loader(args.model)
    if args.trust_pickle and not _accepts_trust_pickle(loader):
        raise _CommandError(f"--trust-pickle: the loader of --model {args.model} has no trust_pickle keyword")
    return loader


def _load(loader: Any, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    keywords = {"trust_pickle": args.trust_pickle} if _accepts_trust_pickle(loader) else {}
    try:
        loaded = loader(args.checkpoint, args.batch, args.seed, args.device, **keywords)
    except Exception as error:  # whatever the loader raises, say it in one line
        raise _CommandError(f"cannot load {args.checkpoint} with --model {args.model}: "
                            f"{type(error).__name__}: {_one_line(error)}") from None
    if not isinstance(loaded, tuple) or len(loaded) != 3 or not isinstance(loaded[1], torch.Tensor):
        raise _CommandError(f"--model {args.model}: the loader must return (flow, noise tensor, cond); "
                            f"got {type(loaded).__name__}")
    if loaded[1].dim() == 0 or loaded[1].shape[0] == 0:
        raise _CommandError(f"--model {args.model}: the loader returned noise of shape "
                            f"{tuple(loaded[1].shape)}, no calibration samples")
    return loaded


def _one_line(error: BaseException, limit: int = 600) -> str:
    text = " ".join(str(error).split()) or "no message"
    return text if len(text) <= limit else text[:limit] + " ..."


def _speed_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0 or 'none'; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {text!r}")
    return value


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
    plan.add_argument("--batch", type=_positive_int, default=32,
                      help="calibration batch size (the calibrated planner holds half of it out to validate)")
    plan.add_argument("--tol", type=float, default=1e-5, help="solver tolerance")
    plan.add_argument("--max-error", type=float, default=1e-4, help="calibrated: max abs error vs serial")
    plan.add_argument("--min-speed", type=_speed_or_none, default=0.95,
                      help="calibrated: least modelled speed vs the default plan of a plan returned instead of "
                           "it; 'none': keep the promise at any speed")
    plan.add_argument("--segments", type=int, default=8, help="metric: GS segments of tough blocks")
    plan.add_argument("--shared-init", action="store_true",
                      help="metric: one initial guess for all blocks (default: per block, by IGM)")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--device", default="cpu")
    plan.add_argument("--out", help="write the plan here (JSON, read by Plan.load)")
    plan.add_argument("--json", help="write metrics, plan and check here (JSON)")
    plan.add_argument("--trust-pickle", action="store_true",
                      help="let the loader read pickled files (e.g. a whole nflows Flow); this runs code "
                           "from the file, so only for files you trust")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `arflow-solvers` command; returns its exit status.

    Arguments:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        0 on success; 2 for a mistake in the command (printed in one line to stderr, before
        any work); 1 when the plan cannot be made (one line too).
    """
    args = _parser().parse_args(argv)
    try:
        flow, z, cond = _load(_check_command(args), args)
    except _CommandError as error:
        print(f"arflow-solvers plan: error: {error}", file=sys.stderr)
        return 2
    try:
        return _plan(args, flow, z, cond)
    except (ValueError, TypeError, SolveError) as error:
        print(f"arflow-solvers plan: error: planning {args.checkpoint} failed: {type(error).__name__}: "
              f"{_one_line(error)}", file=sys.stderr)
        return 1


def _plan(args: argparse.Namespace, flow: Any, z: Any, cond: Any) -> int:
    traces = trace(flow, z, cond)
    metrics = flow_metrics(flow, z, cond, args.tol, traces=traces, show_progress=True)
    calibration = None
    if args.planner == "metric":
        planner = MetricPlanner(segments=args.segments, tol=args.tol, shared_init=args.shared_init)
        plan = planner.no_costlier(planner.plan_from_metrics(metrics), flow, z, cond)
    else:
        calibration = CalibratedPlanner(tol=args.tol, max_error=args.max_error, seed=args.seed,
                                        min_speed=args.min_speed).calibrate(flow, z, cond, show_progress=True)
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
        print(f"validated: {calibration.meaning}; max error {args.max_error:g}: "
              f"{'promised' if calibration.promised else 'NOT promised (see the note)'}")
        if calibration.floor is not None:
            print(f"floor: serial sampling in {z.dtype} is {calibration.floor:.3g} from float64")
        if calibration.note:
            print(f"note: {calibration.note}")
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
