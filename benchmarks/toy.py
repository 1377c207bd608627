"""Jacobi and GS-Jacobi vs Serial on a toy causal transformer block (CPU); prints one JSON object.

    python benchmarks/toy.py --seq-len 64 --batch 16
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from arflow_solvers import GSJacobi, Jacobi, Serial, solve


class ToyCausalTransformer(nn.Module):
    """A small causal transformer block: row t of (mu, log_sigma) reads x[:, :t]."""

    def __init__(self, seq_len: int, dim: int, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.seq_len = seq_len
        self.proj_in = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj_out = nn.Linear(width, 2 * dim)
        nn.init.normal_(self.proj_out.weight, std=0.02)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len))

    def affine(self, x: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.proj_in(x) + self.pos, mask=self.mask, is_causal=True)
        out = self.proj_out(h)
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # row t from x_<t
        mu, log_sigma = out.chunk(2, dim=-1)
        return mu, torch.tanh(log_sigma)


def timed(block, z, solver, repeats: int):
    best, sol = float("inf"), None
    for _ in range(repeats):
        began = time.perf_counter()
        sol = solve(block, z, solver)
        best = min(best, time.perf_counter() - began)
    return best, sol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    block = ToyCausalTransformer(args.seq_len, args.dim).eval()
    z = torch.randn(args.batch, args.seq_len, args.dim)
    serial_time, serial = timed(block, z, Serial(), args.repeats)
    solvers = {
        "jacobi_tol1e-5": Jacobi(tol=1e-5),
        "jacobi_exact": Jacobi(tol=0.0),
        "gs4_tol1e-5": GSJacobi(4, tol=1e-5),
        "jacobi_cap10": Jacobi(max_iters=10),
    }
    results = {}
    for name, solver in solvers.items():
        seconds, sol = timed(block, z, solver, args.repeats)
        error = (sol.x - serial.x).abs()
        results[name] = {
            "solver": repr(solver),
            "seconds": round(seconds, 5),
            "speedup_vs_serial": round(serial_time / seconds, 3),
            "passes": sol.passes,
            "work": round(sol.work, 3),
            "max_abs_error": error.max().item(),
            "mean_abs_error": error.mean().item(),
        }
    print(json.dumps({
        "benchmark": "toy causal transformer block",
        "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.machine(),
        "torch": torch.__version__, "seq_len": args.seq_len, "dim": args.dim, "batch": args.batch,
        "serial": {"seconds": round(serial_time, 5), "passes": serial.passes},
        "solvers": results,
    }, indent=2))


if __name__ == "__main__":
    main()
