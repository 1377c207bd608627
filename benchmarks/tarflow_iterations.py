"""TarFlow per-block analysis: IGM, CRM, Jacobi iterations to tolerance and the cost ratio.

Prints ONE JSON object, for a checkpoint of `examples/train_tarflow.py`, on one batch:

- per block (sampling order): IGM of both initial guesses (`Z`, `Z0`), CRM;
- per block, tolerance and initial guess: mean / max Jacobi iterations per sample, the work
  in full-pass equivalents (the cached solver evaluates only tokens past the exact prefix of
  the samples still iterating) and the max abs error of the block's output vs serial;
- per block: minimum wall time of `Serial()` and of one full causal pass (`affine`), timed
  round-robin, and their ratio,
  the number of full passes a Jacobi solve may spend to break even with serial on this machine.

Example:
    python benchmarks/tarflow_iterations.py --checkpoint runs/tarflow_mnist_2_128_4_2_0.05.pt --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arflow_solvers.adapters.tarflow import as_flow, load_for_planning  # noqa: E402,F401
from arflow_solvers import Jacobi, Serial  # noqa: E402
from arflow_solvers import init as inits  # noqa: E402
from arflow_solvers.metrics import crm, igm, trace  # noqa: E402


def _min_times(fns, repeats: int) -> list[float]:
    """Minimum wall time of each function, timed round-robin after one warm-up (fair under load)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            began = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - began)
    return [min(ts) for ts in times]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tols", type=float, nargs="*", default=[1e-2, 3e-3, 1e-3, 1e-4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flow, z, cond = load_for_planning(args.checkpoint, args.batch_size, args.seed, "cpu")
    traces = trace(flow, z, cond)
    blocks = []
    with torch.no_grad():
        for t in traces:
            row = {
                "index": t.index,
                "igm_Z": igm(t.block, t.z, t.x, inits.noise, t.cond),
                "igm_Z0": igm(t.block, t.z, t.x, inits.zeros_first_exact, t.cond),
                "crm": crm(t.block, t.x, t.cond),
                "max_abs_x": float(t.x.abs().max()),
            }
            serial_s, pass_s = _min_times([lambda: Serial().solve(t.block, t.z, t.cond),
                                           lambda: t.block.affine(t.z, t.cond)], args.repeats)
            row.update(serial_s=serial_s, full_pass_s=pass_s, serial_over_pass=serial_s / pass_s)
            sweep = {}
            for init_name, init in (("Z", inits.noise), ("Z0", inits.zeros_first_exact)):
                for tol in args.tols:
                    x, stats = Jacobi(tol=tol, init=init).solve(t.block, t.z, t.cond)
                    its = stats.iterations.sum(1).double()
                    sweep[f"{init_name}@{tol:g}"] = {
                        "iters_mean": round(its.mean().item(), 1), "iters_max": int(its.max()),
                        "passes": stats.passes, "work": round(stats.work, 2),
                        "max_abs_err": float((x - t.x).abs().max()),
                    }
            row["jacobi"] = sweep
            blocks.append(row)
            print(json.dumps(row), file=sys.stderr)
    result = {"checkpoint": args.checkpoint, "batch_size": args.batch_size, "seq_len": z.shape[1],
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "loadavg": [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]],
              "blocks": blocks}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
