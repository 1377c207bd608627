"""Sample a large set across ranks: `torchrun --nproc_per_node=N examples/sample_many.py`.

Each rank solves its shards (noise seeded per sample, so the result does not depend on N),
writes them as they finish, and rank 0 merges them into OUT/samples.pt. Rerun the same
command after an interruption: finished shards are skipped (a run with other settings into
the same OUT is refused; --overwrite starts again). Samples the model cannot produce are kept
as NaN rows and marked in the file's `status` (--redraws N solves them again from fresh,
recorded noise). Without torchrun it runs in one process. Uses NCCL on GPUs and gloo on CPU.
The model is a seeded MADE MAF (or a TarFlow checkpoint with --tarflow PATH), so the example
runs anywhere.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from arflow_solvers import Jacobi, Plan, solve
from arflow_solvers.distributed import ResumeError, ShardSpec, sample_many


def build_sampler(args, device):
    """`(sampler, noise shape, model, plan)` for the chosen model."""
    if args.tarflow:
        from arflow_solvers.adapters.tarflow import TarFlow, as_flow

        checkpoint = torch.load(args.tarflow, map_location=device, weights_only=True)
        model = TarFlow(**checkpoint["config"]).to(device).eval()
        model.load_state_dict(checkpoint["state_dict"])
        flow = as_flow(model)
        num_patches = (model.img_size // model.patch_size) ** 2
        shape = (num_patches, model.in_channels * model.patch_size**2)
    else:
        from arflow_solvers.adapters.made import MAF

        torch.manual_seed(0)  # the same weights on every rank
        model = MAF(args.features, num_layers=3, hidden_features=[128]).to(device).eval()
        flow = model.as_flow()
        shape = (args.features, 1)
    plan = Plan.parse(args.plan) if args.plan else Jacobi(tol=args.tol)
    return (lambda z, cond: solve(flow, z, plan, cond=cond, throw=False)), shape, model, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sample_many")
    parser.add_argument("--features", type=int, default=64, help="MAF dimension (default model)")
    parser.add_argument("--tarflow", help="TarFlow checkpoint ({'config', 'state_dict'})")
    parser.add_argument("--plan", help="plan in the paper's notation (default: Jacobi(tol))")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--redraws", type=int, default=0,
                        help="solve a failed sample again from fresh noise up to N times (default: keep it, marked)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run in --out (manifest, shards, samples.pt) and start again")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="testing aid: exit after this many shards, as if killed")
    args = parser.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cpu")
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    sampler, shape, model, plan = build_sampler(args, device)
    if args.stop_after is not None:
        sampler = _stop_after(sampler, args.stop_after)
    spec = ShardSpec(args.num_samples, args.shard_size, args.seed)
    try:
        merged = sample_many(sampler, spec, shape, args.out, device=device, model=model, sampler_id=str(plan),
                             redraws=args.redraws, overwrite=args.overwrite)
    except ResumeError as error:  # another run's files in --out: say so in one line
        raise SystemExit(f"sample_many.py: error: {error}") from None
    if merged is not None:
        print(f"wrote {merged.summary()}")
    if distributed:
        dist.destroy_process_group()


def _stop_after(sampler, shards: int):
    done = [0]

    def counting(z, cond):
        if done[0] == shards:
            os._exit(3)  # an abrupt death, no cleanup: what a killed rank looks like
        done[0] += 1
        return sampler(z, cond)

    return counting


if __name__ == "__main__":
    main()
