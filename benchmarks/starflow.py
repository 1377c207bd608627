"""STARFlow sampling: network calls, work, wall time and error of every sampler, vs serial. One JSON object.

Two models: the public-code fixture (`tests/fixtures/starflow_public_tiny.pt`, T = 64, its noise,
captions and null captions) and a randomly initialised larger one (`--large`: width 256, layers
[1, 1, 1, 1, 1, 6], T = 256, text prefix 16, `proj_out` drawn with std `init_scale / sqrt(width)`).
Per model and guidance weight, the samplers, all on the same weights, noise and text:

- `public_serial`: the public serial loop, and `public_jacobi_th{th}_bs{bs}`: the public
  block-wise Jacobi sampler at its two shipped settings (`max_iter` 32), both re-implemented in
  `benchmarks/_starflow_public.py` (the Jacobi one reproduces the fixture's stored outputs
  bit for bit);
- `serial`: our `Serial()`, the reference every error is measured against;
- our Jacobi / GS-Jacobi plans, exact (`tol=0`) and with tolerances;
- `metric_planner`, `calibrated_planner`: plans chosen on a separate calibration batch;
- on the fixture (`T * D <= NEWTON_MAX_SIZE`), `Newton`: few calls, each `1 + T * D`
  evaluations' work (its `work` column says how much).

Per sampler: sequential network calls per block in sampling order (the text prefix's one
encoding per text block is not counted, for any sampler), work in full-pass equivalents, CPU wall
time (best of `--repeats` round-robin rounds), max abs error vs serial and the fraction of 8-bit
values equal to serial's (latents quantised to 256 levels over serial's range). `targets`: for
each public Jacobi setting, our cheapest sampler within `--max-error` of serial, and whether it
makes no more calls.

    python benchmarks/starflow.py --json benchmarks/results/starflow.json
    python benchmarks/starflow.py --tiny          # the fixture only, a few samplers, seconds

References:
    STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
    (Gu et al., 2025), https://arxiv.org/abs/2506.06276;
    Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
    https://arxiv.org/abs/2505.12849
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import environment, time_summary, timed_rounds, write_json  # noqa: E402
from _starflow_public import public_jacobi, public_reverse  # noqa: E402
from arflow_solvers import CalibratedPlanner, GSJacobi, Jacobi, MetricPlanner, Newton, Serial, solve  # noqa: E402
from arflow_solvers.adapters.starflow import StarFlow, as_flow  # noqa: E402

__all__ = ["main", "build_large", "load_fixture", "measure"]

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "starflow_public_tiny.pt"
PUBLIC_SETTINGS = [(0.001, 16), (0.005, 64)]
NEWTON_MAX_SIZE = 256  # T * D up to which Newton (1 + T * D evaluations per call) is measured: the fixture
LARGE = dict(in_channels=4, img_size=16, patch_size=1, channels=256, num_blocks=6,
             layers_per_block=[1, 1, 1, 1, 1, 6], head_dim=64, rope=True, sos=True, txt_size=16, txt_dim=64,
             cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R")


def load_fixture() -> tuple[StarFlow, dict[str, Any]]:
    """The fixture's model and its noise `z`, captions `y` and null captions `y_null`."""
    data = torch.load(FIXTURE, weights_only=True)
    model = StarFlow(**data["config"])
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval(), {k: data[k] for k in ("z", "y", "y_null")}


def build_large(batch: int, init_scale: float, seed: int) -> tuple[StarFlow, dict[str, Any]]:
    """The larger random model, with non-zero `proj_out`, and noise and text for `batch` samples."""
    torch.manual_seed(seed)
    model = StarFlow(**LARGE)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, init_scale / block.proj_out.in_features**0.5)
    text = (batch, LARGE["txt_size"], LARGE["txt_dim"])
    data = {"z": torch.randn(batch, 4, 16, 16), "y": torch.randn(text), "y_null": torch.randn(1, *text[1:]) * 0.1}
    return model.eval(), data


def _fresh(data: dict[str, Any], seed: int) -> dict[str, Any]:
    """A calibration batch: new noise, the same captions."""
    generator = torch.Generator().manual_seed(seed)
    return {**data, "z": torch.randn(data["z"].shape, generator=generator)}


def _cond(data: dict[str, Any], guidance: float) -> Any:
    return (data["y"], data["y_null"]) if guidance else data["y"]


def _public_text(data: dict[str, Any], guidance: float) -> torch.Tensor:
    if not guidance:
        return data["y"]
    return torch.cat([data["y"], data["y_null"].expand_as(data["y"])])


def _quantised(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((x.clamp(lo, hi) - lo) / (hi - lo) * 255).round()


def _compare(x: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    lo, hi = float(reference.min()), float(reference.max())
    return {"max_abs_err_vs_serial": float((x - reference).abs().max()),
            "frac_8bit_equal": float((_quantised(x, lo, hi) == _quantised(reference, lo, hi)).float().mean())}


def _our_plans(tiny: bool, newton: bool) -> dict[str, Any]:
    if tiny:
        return {"jacobi_exact": Jacobi(tol=0.0), "jacobi_tol1e-4": Jacobi(tol=1e-4)}
    plans: dict[str, Any] = {"jacobi_exact": Jacobi(tol=0.0), "gs4_exact": GSJacobi(4, tol=0.0)}
    for tol in (1e-3, 3e-4, 1e-4, 1e-5):
        plans[f"jacobi_tol{tol:g}"] = Jacobi(tol=tol)
    for k in (6, 8, 12, 16, 20):
        plans[f"jacobi_iters{k}"] = Jacobi(tol=0.0, max_iters=k)
    plans["gs4_tol1e-4"] = GSJacobi(4, tol=1e-4)
    if newton:
        plans.update({"newton_tol1e-3": Newton(tol=1e-3), "newton_iters4": Newton(max_iters=4)})
    return plans


def _planned(model: StarFlow, data: dict[str, Any], guidance: float, max_error: float, seed: int) -> dict[str, Any]:
    """The two planners' plans, chosen on a calibration batch (new noise, the same captions)."""
    flow = as_flow(model, guidance=guidance)
    cal = _fresh(data, seed)
    with torch.no_grad():
        return {"metric_planner": MetricPlanner(tol=1e-4).plan(flow, cal["z"], _cond(cal, guidance)),
                "calibrated_planner": CalibratedPlanner(tol=1e-4, max_error=max_error, seed=seed).plan(
                    flow, cal["z"], _cond(cal, guidance))}


def measure(model: StarFlow, data: dict[str, Any], guidance: float, args: argparse.Namespace) -> dict[str, Any]:
    """Every sampler on one model and guidance weight: calls, work, time, error vs serial."""
    flow = as_flow(model, guidance=guidance)
    cond, text = _cond(data, guidance), _public_text(data, guidance)
    newton = data["z"][0].numel() <= NEWTON_MAX_SIZE
    plans = {"serial": Serial(), **_our_plans(args.tiny, newton)}
    if not args.tiny:
        plans.update(_planned(model, data, guidance, args.max_error, args.seed + 1))
    fns: dict[str, Callable[[], Any]] = {"public_serial": lambda: public_reverse(model, data["z"], text, guidance)}
    for th, bs in PUBLIC_SETTINGS:
        fns[f"public_jacobi_th{th:g}_bs{bs}"] = (
            lambda th=th, bs=bs: public_jacobi(model, data["z"], text, guidance, th, bs, 32))
    for name, plan in plans.items():
        fns[name] = lambda plan=plan: solve(flow, data["z"], plan, cond=cond, throw=False)
    with torch.no_grad():
        times, outputs = timed_rounds(fns, rounds=args.repeats, until=time.monotonic() + args.deadline,
                                      first_round_s=0.0, sync=lambda: None)
    reference = outputs["serial"][-1].x
    rows = {}
    for name, out in outputs.items():
        if isinstance(out[-1], tuple):
            x, calls, work = out[-1]
            row: dict[str, Any] = {"calls_per_block": calls, "work_per_block": [round(w, 3) for w in work]}
        else:
            sol = out[-1]
            x = sol.x
            row = {"plan": str(plans[name]), "status": sol.status.name,
                   "calls_per_block": [b.passes for b in sol.blocks],
                   "work_per_block": [round(b.work, 3) for b in sol.blocks]}
        row.update(calls=sum(row["calls_per_block"]), work=round(sum(row["work_per_block"]), 3),
                   wall=time_summary(times[name]), **_compare(x, reference))
        rows[name] = row
    return {"guidance": guidance, "batch": int(data["z"].shape[0]), "samplers": rows,
            "targets": _targets(rows, args.max_error)}


def _targets(rows: dict[str, Any], max_error: float) -> dict[str, Any]:
    """Per public Jacobi setting: our cheapest sampler within `max_error`, and whether it makes no more calls."""
    ours = {n: r for n, r in rows.items() if not n.startswith("public") and r["max_abs_err_vs_serial"] <= max_error}
    best = min(ours, key=lambda n: (ours[n]["calls"], ours[n]["max_abs_err_vs_serial"]), default=None)
    exact = [n for n in ("jacobi_exact", "gs4_exact") if n in rows]
    targets: dict[str, Any] = {"max_error": max_error, "exact_modes_err": {n: rows[n]["max_abs_err_vs_serial"]
                                                                          for n in exact}}
    for th, bs in PUBLIC_SETTINGS:
        public = rows[f"public_jacobi_th{th:g}_bs{bs}"]
        targets[f"th{th:g}_bs{bs}"] = {
            "public_calls": public["calls"], "public_err": public["max_abs_err_vs_serial"],
            "ours": best, "our_calls": None if best is None else ours[best]["calls"],
            "our_err": None if best is None else ours[best]["max_abs_err_vs_serial"],
            "met": best is not None and ours[best]["calls"] <= public["calls"]}
    return targets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the fixture only, unguided, a few samplers, one round")
    p.add_argument("--large", action=argparse.BooleanOptionalAction, default=True, help="also the larger model")
    p.add_argument("--guidance", type=float, nargs="*", default=[0.0, 2.5])
    p.add_argument("--large-batch", type=int, default=4)
    p.add_argument("--init-scale", type=float, default=0.5, help="proj_out std x sqrt(width) of the large model")
    p.add_argument("--max-error", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--deadline", type=float, default=3000.0, help="seconds; rounds that would end later are skipped")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.large, args.guidance, args.repeats = False, [0.0], 1
    models = {"fixture": load_fixture()}
    if args.large:
        models["large"] = build_large(args.large_batch, args.init_scale, args.seed)
    result: dict[str, Any] = {"benchmark": "starflow", "env": environment(torch.device("cpu")),
                              "settings": {k: v for k, v in vars(args).items() if k != "json"},
                              "large_config": LARGE, "models": {}}
    for name, (model, data) in models.items():
        result["models"][name] = {f"guidance_{g:g}": measure(model, data, g, args) for g in args.guidance}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(Path(args.json), result)
    return result


if __name__ == "__main__":
    main()
