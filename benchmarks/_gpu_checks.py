"""GPU suite, correctness and MAF parts: the public TarFlow fixture, nflows' exact mode, MAF sampling speed.

Each part is a function `part(ctx) -> dict` (see `gpu_suite.py` for `ctx`). nflows and zuko are
imported by the parts that use them, so a machine with PyTorch alone still runs the others; the
parts that need them raise `Skip` and the suite records `skipped` with the reason.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from _common import time_summary, timed_rounds
from tarflow import public_loop_reverse
from arflow_solvers import GSJacobi, Jacobi, Serial
from arflow_solvers.adapters.tarflow import TarFlow

__all__ = ["correctness_tarflow", "correctness_nflows", "maf_nflows", "maf_zuko", "Skip",
           "FP32_ATOL", "BF16_RTOL"]

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tarflow_public_tiny.pt"
FP32_ATOL = 1e-4
"""float32 vs the public code's float32 output: max abs error (2e-5 on CPU; GPU kernels sum in other orders)."""
BF16_RTOL = 3e-2
"""bfloat16 autocast vs the public float32 output: per sample, max abs error / max abs value."""

SOLVERS = {"serial": Serial(), "jacobi_exact": Jacobi(tol=0.0), "gs4_exact": GSJacobi(segments=4, tol=0.0)}


def _fixture_cases(public: dict) -> dict[str, tuple[dict, torch.Tensor]]:
    """Keyword arguments of each public `reverse` call of the fixture, and its output (samples 1..3)."""
    y = public["y_sample"][1:]
    cases = {"reverse": (dict(y=y), public["reverse"]), "reverse_uncond": (dict(y=None), public["reverse_uncond"])}
    for name in ("reverse_cfg", "reverse_cfg_a"):
        stored = public[name]
        kwargs = {k: stored[k] for k in ("guidance", "guide_what", "attn_temp", "annealed_guidance")}
        cases[name] = (dict(y=y, **kwargs), stored["out"])
    # sample 0 overflows in the public sampler itself (NaN): compare samples 1..3
    return {name: (kwargs, out[1:]) for name, (kwargs, out) in cases.items()}


def _relative(x: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest per-sample `max |x - expected| / max |expected|`."""
    err = (x - expected).abs().flatten(1).amax(1) / expected.abs().flatten(1).amax(1)
    return float(err.max())


def correctness_tarflow(ctx: Any) -> dict[str, Any]:
    """The public fixture in float32 (max abs <= FP32_ATOL) and bfloat16 autocast (relative <= BF16_RTOL)."""
    device = ctx.device
    public = torch.load(FIXTURE, map_location=device, weights_only=True)
    model = TarFlow(**public["config"])
    model.load_state_dict(public["state_dict"], strict=True)
    model = model.to(device).eval()
    with torch.no_grad():
        z, _, logdets = model(public["x"], public["y"])
    checks = [{"check": "forward z, logdets (float32)", "tolerance": FP32_ATOL,
               "max_abs_err": max(float((z - public["z"]).abs().max()),
                                  float((logdets - public["logdets"]).abs().max()))}]
    checks[0]["passed"] = checks[0]["max_abs_err"] <= FP32_ATOL
    noise = public["noise"][1:]
    for case, (kwargs, expected) in _fixture_cases(public).items():
        for name, solver in SOLVERS.items():
            x = model.reverse(noise.clone(), plan=solver, **kwargs)
            err = float((x - expected).abs().max())
            checks.append({"check": f"{case} {name} float32", "tolerance": FP32_ATOL, "max_abs_err": err,
                           "passed": err <= FP32_ATOL})
            x = model.reverse(noise.clone(), plan=solver, autocast=torch.bfloat16, **kwargs)
            rel = _relative(x, expected)
            checks.append({"check": f"{case} {name} bfloat16 autocast", "tolerance": BF16_RTOL,
                           "relative_err": rel, "max_abs_err": float((x - expected).abs().max()),
                           "passed": rel <= BF16_RTOL})
        with torch.autocast(device.type, dtype=torch.bfloat16):  # context: the public-style loop's own error
            x = public_loop_reverse(model, noise.clone(), kwargs["y"], kwargs.get("guidance", 0.0),
                                    kwargs.get("guide_what", "ab"), kwargs.get("attn_temp", 1.0),
                                    kwargs.get("annealed_guidance", False))
        checks.append({"check": f"{case} public-style loop bfloat16 autocast (context, not judged)",
                       "relative_err": _relative(x, expected), "max_abs_err": float((x - expected).abs().max())})
    judged = [c for c in checks if "passed" in c]
    return {"status": "ok" if all(c["passed"] for c in judged) else "failed",
            "fixture": str(FIXTURE.relative_to(FIXTURE.parents[2])),
            "tolerances": {"float32_max_abs": FP32_ATOL, "bfloat16_relative_per_sample": BF16_RTOL},
            "passed": sum(c["passed"] for c in judged), "judged": len(judged), "checks": checks}


def _maf_shape(ctx: Any) -> dict[str, int]:
    return dict(features=16, hidden=16, layers=2) if ctx.smoke else dict(features=784, hidden=512, layers=5)


class Skip(Exception):
    """Raised by a part that cannot run here; the suite records `skipped` with the message."""


def _nflows() -> Any:
    """benchmarks/maf.py (which puts examples/ on sys.path) and examples/mnist_maf.py, or `Skip`."""
    try:
        import maf as maf_bench
        import mnist_maf
    except ImportError as error:
        raise Skip(f"skipped: nflows is not installed ({error})") from error
    return maf_bench, mnist_maf


def _random_maf(ctx: Any) -> Any:
    maf_bench, mnist_maf = _nflows()
    shape = _maf_shape(ctx)
    torch.manual_seed(ctx.args.seed)
    flow = mnist_maf.build_flow(shape["features"], shape["hidden"], shape["layers"], 1)
    maf_bench.condition_(flow, ctx.args.seed)
    return flow.to(ctx.device).eval(), shape


def correctness_nflows(ctx: Any) -> dict[str, Any]:
    """nflows' exact mode (`Jacobi(tol=0)`) is `torch.equal` to `flow.sample` under the same seed."""
    flow, shape = _random_maf(ctx)
    from arflow_solvers.adapters.nflows import sample as nflows_sample
    n = 4 if ctx.smoke else 16
    torch.manual_seed(123)
    with torch.no_grad():
        reference = flow.sample(n)
    checks = []
    for name, plan in {"Jacobi(tol=0.0)": Jacobi(tol=0.0),
                       "Jacobi(tol=0.0, on_divergence='give_up')": Jacobi(tol=0.0, on_divergence="give_up")}.items():
        torch.manual_seed(123)
        x = nflows_sample(flow, n, plan, throw=False)
        checks.append({"check": f"{name} == flow.sample", "passed": bool(torch.equal(x, reference)),
                       "max_abs_err": float((x - reference).abs().max()),
                       "finite_samples": int(torch.isfinite(reference).all(1).sum())})
    return {"status": "ok" if all(c["passed"] for c in checks) else "failed",
            "model": {**shape, "weights": "random, well-conditioned (benchmarks/maf.py condition_)"},
            "num_samples": n, "checks": checks}


def _speed(ctx: Any, runs: dict[str, Any], reference: str) -> dict[str, Any]:
    """Warm every run up, time them round-robin, and compare each output with `runs[reference]`'s."""
    warm, _ = timed_rounds(runs, rounds=1, until=float("inf"), first_round_s=0.0, sync=ctx.sync,
                           log=lambda m: ctx.log(f"warm-up {m}"))
    times, outputs = timed_rounds(runs, rounds=ctx.args.rounds, until=ctx.until,
                                  first_round_s=sum(t[0] for t in warm.values()), sync=ctx.sync, log=ctx.log)
    if not times[reference]:
        return {"status": "partial", "reason": "no timed round fitted the time limit",
                "warmup_s": {k: v[0] for k, v in warm.items()}}
    methods = {}
    ref_x = outputs[reference][-1][0]
    finite = torch.isfinite(ref_x).all(1)
    for name in runs:
        summary = time_summary(times[name])
        x, solution = outputs[name][-1]
        summary["speedup_vs_library"] = time_summary(times[reference])["best_s"] / summary["best_s"]
        summary["bit_identical_to_library"] = bool(torch.equal(x, ref_x))
        err = (x[finite] - ref_x[finite]).abs()
        summary["max_abs_err_vs_library"] = float(err.max()) if err.numel() else float("nan")
        summary["nonfinite_samples"] = int((~torch.isfinite(x).all(1)).sum())
        if solution is not None:
            summary["calls"] = solution.passes
            summary["full_pass_equiv"] = round(solution.work, 3)
            summary["calls_per_block"] = [b.passes for b in solution.blocks]
            summary["status"] = solution.status.name
        methods[name] = summary
    return {"status": "ok", "methods": methods}


MAF_METHODS = ["nflows", "exact (tol=0)", "exact, give up", "Jacobi tol=1e-6, give up",
               "packed Jacobi tol=1e-6, give up", "J-10"]


def maf_nflows(ctx: Any) -> dict[str, Any]:
    """nflows' MNIST-shaped MAF: `flow.sample` vs the exact mode and tolerance plans (examples/mnist_maf.py's)."""
    flow, shape = _random_maf(ctx)
    _, mnist_maf = _nflows()
    n = 8 if ctx.smoke else ctx.args.maf_samples
    plans = mnist_maf.methods(shape["layers"])
    runs = {name: mnist_maf._sampler(flow, n, plans[name], ctx.args.seed) for name in MAF_METHODS}
    result = {"model": {**shape, "weights": "random, well-conditioned (benchmarks/maf.py condition_)"},
              "num_samples": n, "library": "nflows flow.sample",
              "plans": {name: "nflows flow.sample" if plans[name] is None else str(plans[name]) for name in runs}}
    ctx.checkpoint(result)
    return {**result, **_speed(ctx, runs, "nflows")}


def maf_zuko(ctx: Any) -> dict[str, Any]:
    """A zuko MAF (200 features): `flow().sample` vs our plans, through `arflow_solvers.adapters.zuko`."""
    try:
        adapter = importlib.import_module("arflow_solvers.adapters.zuko")
    except ModuleNotFoundError as error:
        if error.name == "arflow_solvers.adapters.zuko":
            raise Skip("skipped: no zuko adapter") from error
        raise
    except ImportError as error:  # the adapter is there, zuko is not
        raise Skip(f"skipped: zuko is not installed ({error})") from error
    import zuko

    shape = dict(features=8, transforms=2, hidden=16) if ctx.smoke else dict(features=200, transforms=5, hidden=512)
    torch.manual_seed(ctx.args.seed)
    flow = zuko.flows.MAF(features=shape["features"], context=0, transforms=shape["transforms"],
                          hidden_features=(shape["hidden"], shape["hidden"])).to(ctx.device).eval()
    n = 8 if ctx.smoke else ctx.args.maf_samples
    seed = ctx.args.seed

    def library() -> Any:
        torch.manual_seed(seed)
        with torch.no_grad():
            return flow().sample((n,)), None

    def ours(plan: Any, bitwise: bool) -> Any:
        def run() -> Any:
            torch.manual_seed(seed)
            return adapter.sample(flow, n, plan, return_solution=True, throw=False, bitwise=bitwise)
        return run

    tolerance = Jacobi(tol=1e-6, on_divergence="give_up")
    plans = {"exact (tol=0)": (Jacobi(tol=0.0), True), "Jacobi tol=1e-6, give up": (tolerance, True),
             "packed Jacobi tol=1e-6, give up": (tolerance, False)}
    runs = {"zuko": library, **{name: ours(*spec) for name, spec in plans.items()}}
    result = {"model": {**shape, "weights": "zuko's initialisation"}, "num_samples": n,
              "library": "zuko flow().sample",
              "plans": {k: f"{plan}{'' if bitwise else ', packed (bitwise=False)'}" for k, (plan, bitwise) in plans.items()},
              "adapter_call": "arflow_solvers.adapters.zuko.sample(flow, n, plan, return_solution=True, throw=False, "
                              "bitwise=...)"}
    ctx.checkpoint(result)
    return {**result, **_speed(ctx, runs, "zuko")}
