"""Benchmark: sample an nflows MAF with nflows and with Jacobi / GS-Jacobi plans; print one JSON.

No training: the MAF gets random but well-conditioned weights (output scales near 1), or
the weights of a checkpoint written by `examples/mnist_maf.py` (`--checkpoint`). Random
weights converge in fewer iterations than a trained model; quote trained numbers.

    python benchmarks/maf.py --samples 16 --layers 2 --hidden 128   # quick
    python benchmarks/maf.py --checkpoint runs/mnist_maf/maf-....pt

Baselines, both measured in the same run: nflows' `flow.sample` (under `no_grad`) and our
`Serial` solver; methods are timed round-robin (`--repeats` rounds, fastest kept). Errors
are against `Serial`, in the flow's output (logit) space, and against a float64 exact solve
of the same noise (the truth float32 serial sampling itself misses by its rounding).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from _plans import parse_plan  # noqa: E402
from mnist_maf import Packed, build_flow, compare, methods  # noqa: E402

__all__ = ["condition_", "main"]


def condition_(flow: torch.nn.Module, seed: int = 0, weight_scale: float = 0.1) -> None:
    """Give every MADE random output weights whose scales are near 1 (in place).

    nflows' default initialisation makes a deep 784-d MAF overflow when inverted (scales
    near `softplus(0) = 0.69` compound over layers and dimensions); this keeps the raw
    scale at `softplus(0.5413 + noise) ~ 1`, with random shifts and hidden weights.
    """
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in flow.modules():
            if isinstance(module, MaskedAffineAutoregressiveTransform):
                final = module.autoregressive_net.final_layer
                fan_in = final.weight.shape[1]
                final.weight.copy_(weight_scale * torch.randn(final.weight.shape, generator=gen)
                                   / fan_in**0.5)
                final.bias.copy_(0.1 * torch.randn(final.bias.shape, generator=gen))
                final.bias[0::2] += 0.5413


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    if args.checkpoint:
        saved = torch.load(args.checkpoint, map_location="cpu")
        trained = saved.get("args", {})
        hidden = trained.get("hidden", args.hidden)
        layers = trained.get("layers", args.layers)
        blocks = trained.get("blocks", args.blocks)
        flow = build_flow(args.features, hidden, layers, blocks)
        flow.load_state_dict(saved["state_dict"])
        source = {"weights": "checkpoint", "checkpoint": str(args.checkpoint),
                  "train_steps": len(saved.get("losses", []))}
    else:
        torch.manual_seed(args.seed)
        hidden, layers, blocks = args.hidden, args.layers, args.blocks
        flow = build_flow(args.features, hidden, layers, blocks)
        condition_(flow, args.seed)
        source = {"weights": "random, well-conditioned"}
    model = {"features": args.features, "hidden": hidden, "layers": layers,
             "blocks_per_layer": blocks, **source}
    return flow.eval(), model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint from examples/mnist_maf.py")
    p.add_argument("--features", type=int, default=784)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--blocks", type=int, default=1, help="residual blocks per MADE")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--methods", help="comma-separated subset of the method names (nflows and serial always run)")
    p.add_argument("--repeats", type=int, default=1, help="round-robin rounds; the fastest run counts")
    p.add_argument("--slot-seconds", type=float, default=0.0,
                   help="per round, rerun a method until it has used this long (default: once)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="tqdm progress on stderr")
    p.add_argument("--plan", action="append", default=[], metavar="NAME=PLAN",
                   help="also run PLAN (paper notation such as '[*]@1e-6', serial, jacobi, gs<M>, "
                        "or a .json file written by Plan.save / `arflow-solvers plan`); repeatable")
    p.add_argument("--packed-plan", action="append", default=[], metavar="NAME=PLAN",
                   help="like --plan, on packed MADEs (`wrap(flow, bitwise=False)`); repeatable")
    p.add_argument("--no-float64", action="store_true",
                   help="skip the float64 reference (errors vs the exact answer)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flow, model = _load(args)
    plans = methods(model["layers"])
    if args.methods:
        wanted = {"nflows", "serial", *(m.strip() for m in args.methods.split(","))}
        unknown = wanted - set(plans)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(plans)}")
        plans = {k: v for k, v in plans.items() if k in wanted}
    for packed, specs in ((False, args.plan), (True, args.packed_plan)):
        for spec in specs:
            name, _, text = spec.partition("=")
            if not text:
                raise SystemExit(f"--{'packed-' if packed else ''}plan needs NAME=PLAN; got {spec!r}")
            plan = parse_plan(text, model["layers"])
            plans[name] = Packed(plan) if packed else plan
    rows, _ = compare(flow, args.samples, plans, seed=args.seed, repeats=args.repeats,
                      progress=args.progress, float64=not args.no_float64,
                      slot_seconds=args.slot_seconds)
    result = {"benchmark": "maf", "model": model, "num_samples": args.samples,
              "repeats": args.repeats, "slot_seconds": args.slot_seconds,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "methods": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
