"""Sample a trained TarFlow with Serial, Jacobi and GS-Jacobi plans and save the grids side by side.

Uses the checkpoint written by `examples/train_tarflow.py` (the newest `runs/tarflow_*.pt` unless
`--checkpoint` is given). Every plan gets the same noise and labels, so the grids should look
the same; the script prints each plan's wall time, network passes and agreement with serial.
Writes a PNG with matplotlib when it is installed, else a PGM written with numpy.

References:
    Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
    https://arxiv.org/abs/2412.06329;
    Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
    https://arxiv.org/abs/2505.12849

Example:
    python examples/tarflow_sample.py --guidance 1.0 --out runs/tarflow_samples
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arflow_solvers.adapters.tarflow import as_flow, denoise  # noqa: E402
from arflow_solvers import GSJacobi, Jacobi, Plan, Serial, solve  # noqa: E402
from train_tarflow import load_checkpoint  # noqa: E402

__all__ = ["grid", "save_image", "main"]


def grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """`(N, 1, H, W)` images in `[-1, 1]` to one `(rows * (H + pad), nrow * (W + pad))` array in `[0, 1]`."""
    n, _, h, w = images.shape
    rows = -(-n // nrow)
    out = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    pics = ((images[:, 0].clamp(-1, 1) + 1) / 2).cpu().numpy()
    for i, pic in enumerate(pics):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = pic
    return out


def save_image(panels: dict[str, np.ndarray], path: Path) -> Path:
    """Save named grids side by side: PNG via matplotlib if available, else a PGM."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sep = np.ones((next(iter(panels.values())).shape[0], 6), dtype=np.float32)
        joined = np.concatenate([a for panel in panels.values() for a in (panel, sep)][:-1], axis=1)
        path = path.with_suffix(".pgm")
        with open(path, "wb") as f:
            f.write(f"P5 {joined.shape[1]} {joined.shape[0]} 255\n".encode())
            f.write((joined * 255).round().astype(np.uint8).tobytes())
        return path
    first = next(iter(panels.values()))
    width = 4.0
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), width * first.shape[0] / first.shape[1] + 0.8))
    for ax, (title, panel) in zip(np.atleast_1d(axes), panels.items()):
        ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = path.with_suffix(".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: newest runs/tarflow_*.pt")
    p.add_argument("--num", type=int, default=30, help="samples (labels cycle 0..9)")
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--segments", type=int, default=8, help="GS segments of the tough block (sampling block 0)")
    p.add_argument("--no-denoise", action="store_true")
    p.add_argument("--out", default="runs/tarflow_samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.checkpoint
    if path is None:
        found = sorted(Path("runs").glob("tarflow_*.pt"), key=lambda q: q.stat().st_mtime)
        if not found:
            raise SystemExit("no checkpoint in runs/; run examples/train_tarflow.py first")
        path = found[-1]
    model, meta = load_checkpoint(path)
    torch.manual_seed(args.seed)
    z = torch.randn(args.num, model.num_patches, model.blocks[0].in_channels)
    y = torch.arange(args.num) % model.num_classes if model.num_classes else None
    flow = as_flow(model, guidance=args.guidance)
    plans = {
        "Serial": Serial(),
        f"Jacobi tol={args.tol:g}": Jacobi(tol=args.tol),
        f"GS-Jacobi [0-{args.segments}-*-*]": Plan.parse(f"[0-{args.segments}-*-*]", tol=args.tol),
        f"GS-Jacobi {args.segments} segs everywhere": GSJacobi(segments=args.segments, tol=args.tol),
    }
    panels, reference = {}, None
    for name, plan in plans.items():
        began = time.perf_counter()
        sol = solve(flow, z, plan, cond=y)
        elapsed = time.perf_counter() - began
        x = sol.x if args.no_denoise else denoise(model, sol.x, y, meta.get("noise_std", 0.05))
        reference = x if reference is None else reference
        err = float((x - reference).abs().max())
        passes = sum(b.passes for b in sol.blocks)
        print(f"{name:32s} {elapsed:7.3f} s  passes {passes:4d}  max|x - serial| {err:.2e}  {sol.status.name}")
        panels[f"{name}\n{elapsed:.2f} s, {passes} passes"] = grid(x, nrow=10)
    out = save_image(panels, Path(args.out))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
