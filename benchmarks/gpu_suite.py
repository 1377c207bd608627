"""The GPU suite: one command that measures TarFlow, STARFlow, MAF and zuko sampling on one CUDA GPU.

    python benchmarks/gpu_suite.py --out benchmarks/results/gpu        # on a GPU, < 10 minutes
    python benchmarks/gpu_suite.py --smoke --out /tmp/gpu_smoke        # CPU, tiny shapes, < 1 minute
    python benchmarks/gpu_suite.py --smoke --out /tmp/s --parts correctness tarflow_afhq

Writes one JSON file per part into `--out` as soon as the part finishes (and a `running`
version while it runs), plus `suite.json`, the index: the machine (GPU model, date, torch and
CUDA versions), each part's status and headline ratios. Parts, in the order they run:

- `correctness_tarflow`: the public TarFlow fixture (tests/fixtures/tarflow_public_tiny.pt)
  reproduced in float32 and under bfloat16 autocast, with Serial, exact Jacobi and GS-Jacobi;
- `correctness_nflows`: nflows' exact mode `torch.equal` to `flow.sample`;
- `maf_nflows`: the MNIST-shaped nflows MAF (784 features, 5 layers, hidden 512): `flow.sample`
  vs the exact mode and tolerance plans;
- `maf_zuko`: a zuko MAF with 200 features, if `arflow_solvers.adapters.zuko` exists;
- `tarflow_img64_uncond`, `tarflow_img64_cond_cfg`, `tarflow_afhq`, `tarflow_afhq_cfg`: the
  public-style serial loop vs our `Serial()` vs the paper's published plan at the paper's
  shapes (T = 1024, width 768, 8 x 8 layers), random weights, per block and overall;
- `starflow_t2i_3b`: STARFlow at the public 3B text-to-image shapes (T = 1024, width 3072, layers
  [2, 2, 2, 2, 2, 24], a 128-token text prefix), random weights, float32, guidance 3.6: the public
  serial and block-wise Jacobi samplers vs our `Serial()`, Jacobi, GS-Jacobi and the exact mode
  run to a cap; calls per block, wall time, max abs error vs serial (`_gpu_starflow.py`);
- `starflow_fixture`: the public-code STARFlow fixture (T = 64): `Newton(tol=1e-3)` (a few
  wide calls) vs the public block-wise Jacobi at its two settings and our `Jacobi(tol=1e-4)`,
  in wall time on the device.

Time: a global deadline (`--deadline`, 540 s on a GPU) and a nominal time limit per part; each
part gets its share of the time left, in proportion to its nominal limit among the parts still
to run (so time an early part leaves unused is spread over the later ones).
Timed rounds are round-robin; a round starts only if it is predicted to end in time, so a
slow machine gets fewer rounds (best of the rounds run, spread reported), never a kill.
Without CUDA the full suite refuses to run; `--smoke` runs every part on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from _common import environment, synchronizer, write_json  # noqa: E402
from _gpu_checks import Skip  # noqa: E402

__all__ = ["main", "PART_LIMITS"]

PART_LIMITS: dict[str, tuple[float, float]] = {  # part -> (seconds on a GPU, seconds in smoke mode)
    "correctness_tarflow": (30, 8),
    "correctness_nflows": (30, 2),
    "maf_nflows": (40, 3),
    "maf_zuko": (25, 2),
    "tarflow_img64_uncond": (60, 5),
    "tarflow_img64_cond_cfg": (85, 5),
    "tarflow_afhq": (60, 5),
    "tarflow_afhq_cfg": (80, 5),
    "starflow_t2i_3b": (120, 5),
    "starflow_fixture": (30, 8),
}
MIN_PART_S = (5.0, 0.5)  # below this a part is skipped rather than started
NO_CUDA = ("gpu_suite: no CUDA device is available (torch.cuda.is_available() is False). The full suite "
           "measures GPU sampling and refuses to run on CPU; use --smoke to run every part on CPU with "
           "tiny shapes (what the tests do).")


@dataclass
class Context:
    """What a part sees: the device, its deadline, the options, a logger and a partial-result writer."""

    device: torch.device
    smoke: bool
    args: argparse.Namespace
    until: float
    log: Callable[[str], None]
    checkpoint: Callable[[dict[str, Any]], None]
    sync: Callable[[], None] = field(init=False)

    def __post_init__(self) -> None:
        self.sync = synchronizer(self.device)


def _parts() -> dict[str, Callable[[Context], dict[str, Any]]]:
    from _gpu_checks import correctness_nflows, correctness_tarflow, maf_nflows, maf_zuko
    from _gpu_starflow import fixture_part, starflow_part
    from _gpu_tarflow import CONFIGS, tarflow_part

    parts: dict[str, Callable[[Context], dict[str, Any]]] = {
        "correctness_tarflow": correctness_tarflow, "correctness_nflows": correctness_nflows,
        "maf_nflows": maf_nflows, "maf_zuko": maf_zuko}
    for cfg in CONFIGS:
        parts[cfg.part] = lambda ctx, cfg=cfg: tarflow_part(cfg, ctx)
    parts["starflow_t2i_3b"] = starflow_part
    parts["starflow_fixture"] = fixture_part
    assert list(parts) == list(PART_LIMITS)
    return parts


def select(names: list[str] | None) -> list[str]:
    """The parts named, each name a part or a prefix of parts (`tarflow`, `correctness`), in suite order."""
    if not names:
        return list(PART_LIMITS)
    unknown = [n for n in names if not any(p.startswith(n) for p in PART_LIMITS)]
    if unknown:
        raise SystemExit(f"gpu_suite: unknown parts {unknown}; choose from {list(PART_LIMITS)} or a prefix")
    return [p for p in PART_LIMITS if any(p.startswith(n) for n in names)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the JSON files (created)")
    p.add_argument("--smoke", action="store_true", help="every part on CPU with tiny shapes, < 1 minute")
    p.add_argument("--parts", nargs="+", metavar="PART", help=f"a subset, by name or prefix: {list(PART_LIMITS)}")
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole suite (540; smoke 40)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds at most (best kept, spread reported)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="TarFlow speed parts: bfloat16 autocast as the public sampler (default) or float32")
    p.add_argument("--batch-img64", type=int, default=64)
    p.add_argument("--batch-afhq", type=int, default=16)
    p.add_argument("--batch-starflow", type=int, default=2, help="STARFlow samples (guided: 2x rows in the deep block)")
    p.add_argument("--starflow-scope", choices=["auto", "all", "deep"], default="auto",
                   help="STARFlow: every block, the deep block only, or auto (every block if a round fits)")
    p.add_argument("--batch-smoke", type=int, default=2)
    p.add_argument("--maf-samples", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (smoke default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.deadline is None:
        args.deadline = 40.0 if args.smoke else 540.0
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def _warm_up(device: torch.device) -> None:
    """Start the CUDA context, cuBLAS and attention kernels before any part is timed."""
    if device.type != "cuda":
        return
    a = torch.randn(256, 256, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (a @ a).sum().item()
    q = torch.randn(2, 4, 64, 64, device=device)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
    torch.cuda.synchronize(device)


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("ratios", "passed", "judged", "reason")
    out = {k: result[k] for k in keys if k in result}
    if "methods" in result:
        out["best_s"] = {k: v.get("best_s") for k, v in result["methods"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    deadline = began + args.deadline

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:7.1f}s] {message}", flush=True)

    if not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.smoke else "cuda")
    names = select(args.parts)
    env = environment(device)
    mode = "smoke (CPU, tiny shapes)" if args.smoke else "gpu"
    log(f"gpu_suite {mode} on {env['device_name']}, torch {env['torch']}: parts {names}, "
        f"deadline {args.deadline:.0f} s, out {args.out}")
    _warm_up(device)
    parts = _parts()
    index = {"suite": "gpu_suite", "mode": mode, "env": env, "argv": sys.argv[1:] if argv is None else argv,
             "deadline_s": args.deadline, "parts": {}}
    column = 1 if args.smoke else 0
    failed = False
    for i, name in enumerate(names):
        now = time.monotonic()
        share = PART_LIMITS[name][column] / sum(PART_LIMITS[n][column] for n in names[i:])
        budget = (deadline - now) * share
        base = {"part": name, "mode": mode, "env": env, "time_limit_s": round(budget, 1)}
        path = args.out / f"{name}.json"
        if budget < MIN_PART_S[column]:
            result = {**base, "status": "skipped", "reason": "skipped: global deadline reached"}
            log(f"{name}: skipped (deadline)")
        else:
            log(f"{name}: start, {budget:.0f} s")
            ctx = Context(device, args.smoke, args, now + budget, lambda m, n=name: log(f"{n}: {m}"),
                          lambda partial, b=base, p=path: write_json(p, {**b, "status": "running", **partial}))
            try:
                result = {**base, "status": "ok", **parts[name](ctx)}
            except Skip as skip:
                result = {**base, "status": "skipped", "reason": str(skip)}
            except Exception as error:  # a part's failure is recorded; the suite goes on
                result = {**base, "status": "error", "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()}
            result["elapsed_s"] = round(time.monotonic() - now, 2)
            detail = result.get("ratios") or result.get("reason") or result.get("error") or ""
            log(f"{name}: {result['status']} in {result['elapsed_s']:.1f} s {detail}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write_json(path, result)
        failed |= result["status"] in ("error", "failed")
        index["parts"][name] = {"status": result["status"], "file": path.name, "elapsed_s": result.get("elapsed_s"),
                                **_headline(result)}
        index["elapsed_s"] = round(time.monotonic() - began, 2)
        write_json(args.out / "suite.json", index)
    log(f"done in {time.monotonic() - began:.1f} s: "
        + ", ".join(f"{n} {v['status']}" for n, v in index["parts"].items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
