"""Train a small class-conditional TarFlow on MNIST (or synthetic digits) and cache a checkpoint.

Real MNIST is read when `--data` points to IDX files (a folder with `train-images-idx3-ubyte[.gz]`
and `train-labels-idx1-ubyte[.gz]`), `mnist.npz` (Keras layout) or `mnist.pkl.gz` (the classic
pickle); without `--data` a synthetic digit-like dataset is drawn in code. Nothing is ever
downloaded. Training follows the public TarFlow recipe: images in `[-1, 1]`, Gaussian noise
augmentation of std `--noise-std`, random label drop (label `-1`) for classifier-free guidance,
AdamW with betas (0.9, 0.95) and a warmup + cosine learning-rate schedule.

References:
    Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
    https://arxiv.org/abs/2412.06329

Example:
    python examples/train_tarflow.py --data .cache/mnist/mnist.pkl.gz --minutes 10
"""

from __future__ import annotations

import argparse
import gzip
import math
import pickle
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arflow_solvers.adapters.tarflow import TarFlow  # noqa: E402

__all__ = ["load_mnist", "synthetic_digits", "checkpoint_path", "load_checkpoint", "train"]


# ----------------------------------------------------------------------------- data


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST training images `(N, 28, 28)` in `[0, 1]` and labels `(N,)` from a local file.

    Arguments:
        path: a folder with IDX files, an IDX image file, `mnist.npz` or `mnist.pkl.gz`.
    """
    path = Path(path)
    if path.is_dir():
        images = next((p for p in sorted(path.iterdir()) if p.name.startswith("train-images")), None)
        if images is None:
            raise ValueError(f"--data folder {path} has no train-images-idx3-ubyte[.gz]")
        path = images
    name = path.name
    if name.endswith(".npz"):
        with np.load(path) as d:
            return d["x_train"].astype(np.float32) / 255.0, d["y_train"].astype(np.int64)
    if name.endswith(".pkl.gz") or name.endswith(".pkl"):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            (x, y), _, _ = pickle.load(f, encoding="latin1")
        return x.reshape(-1, 28, 28).astype(np.float32), y.astype(np.int64)
    if "idx3" in name:
        labels = path.with_name(name.replace("images", "labels").replace("idx3", "idx1"))
        return _read_idx(path).astype(np.float32) / 255.0, _read_idx(labels).astype(np.int64)
    raise ValueError(f"--data must be IDX files, mnist.npz or mnist.pkl.gz; got {path}")


# seven-segment strokes (x0, y0, x1, y1) in a unit box, and which digits light each
_SEGMENTS = {
    "a": (0.2, 0.1, 0.8, 0.1), "b": (0.8, 0.1, 0.8, 0.5), "c": (0.8, 0.5, 0.8, 0.9),
    "d": (0.2, 0.9, 0.8, 0.9), "e": (0.2, 0.5, 0.2, 0.9), "f": (0.2, 0.1, 0.2, 0.5),
    "g": (0.2, 0.5, 0.8, 0.5),
}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def synthetic_digits(n: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """`n` digit-like images `(n, size, size)` in `[0, 1]` with labels: jittered, slanted,
    blurred seven-segment strokes. A stand-in for MNIST when no file is available."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.zeros((n, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        scale = rng.uniform(0.55, 0.75)
        ox, oy = rng.uniform(0.12, 0.88 - scale, 2)
        slant = rng.uniform(-0.25, 0.25)
        width = rng.uniform(0.035, 0.06)
        img = np.zeros((size, size), dtype=np.float32)
        for seg in _DIGITS[label]:
            x0, y0, x1, y1 = (np.array(_SEGMENTS[seg]) + rng.normal(0, 0.03, 4)).tolist()
            x0, x1 = x0 + slant * (0.5 - y0), x1 + slant * (0.5 - y1)
            p0 = np.array([ox + scale * x0, oy + scale * y0])
            p1 = np.array([ox + scale * x1, oy + scale * y1])
            d = p1 - p0
            t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
            dist = np.hypot(xx - p0[0] - t * d[0], yy - p0[1] - t * d[1])
            img = np.maximum(img, np.clip(1.5 - dist / width, 0, 1))
        images[i] = img
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------- model files


def checkpoint_path(out_dir: str | Path, args: argparse.Namespace) -> Path:
    """`runs/tarflow_{data}_{patch}_{channels}_{blocks}_{layers}_{noise}.pt`."""
    data = "mnist" if args.data else "synthetic"
    return Path(out_dir) / (
        f"tarflow_{data}_{args.patch_size}_{args.channels}_{args.blocks}_{args.layers}_{args.noise_std:.2f}.pt"
    )


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[TarFlow, dict]:
    """Rebuild the model saved by `train`; returns `(model, meta)`."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = TarFlow(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}


# ----------------------------------------------------------------------------- training


def _lr(step: int, progress: float, warmup: int, max_lr: float, min_lr: float = 1e-6) -> float:
    """Linear warmup over `warmup` steps, then cosine decay over `progress` in `[0, 1]`."""
    if step < warmup:
        return min_lr + (max_lr - min_lr) * step / warmup
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (max_lr - min_lr)


def train(args: argparse.Namespace) -> Path:
    """Train (or reuse a cached checkpoint) and return the checkpoint path."""
    path = checkpoint_path(args.out, args)
    if path.exists() and not (args.force or args.resume):
        print(f"cached checkpoint {path} (use --force to retrain)")
        return path
    torch.manual_seed(args.seed)
    if args.data:
        images, labels = load_mnist(args.data)
    else:
        images, labels = synthetic_digits(args.synthetic_size, seed=args.seed)
    x_all = torch.from_numpy(images).unsqueeze(1) * 2 - 1  # [-1, 1], as the public Normalize(0.5, 0.5)
    y_all = torch.from_numpy(labels)
    config = dict(in_channels=1, img_size=28, patch_size=args.patch_size, channels=args.channels,
                  num_blocks=args.blocks, layers_per_block=args.layers, nvp=True, num_classes=10,
                  head_dim=args.head_dim, expansion=4)
    model = TarFlow(**config)
    done_before = 0
    if args.resume:
        if not path.exists():
            raise SystemExit(f"--resume: no checkpoint {path} to continue")
        previous = torch.load(path, map_location="cpu", weights_only=True)
        if previous["config"] != config:
            raise SystemExit(f"--resume: {path} has config {previous['config']}, not {config}")
        model.load_state_dict(previous["state_dict"], strict=True)
        done_before = int(previous.get("steps", 0))
        print(f"resuming {path} after {done_before} steps (fresh optimizer and lr schedule)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-4)
    steps_per_epoch = len(x_all) // args.batch_size
    total = args.epochs * steps_per_epoch if args.steps is None else args.steps
    began = time.time()
    deadline = began + 60 * args.minutes if args.minutes else math.inf
    bar = tqdm(total=total, desc="train", unit="step")
    step, ema = 0, None
    model.train()
    while step < total and time.time() < deadline:
        order = torch.randperm(len(x_all))
        for i in range(steps_per_epoch):
            if step >= total or time.time() >= deadline:
                break
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = x_all[idx] + args.noise_std * torch.randn(len(idx), 1, 28, 28)
            y = y_all[idx]
            drop = torch.rand(len(idx)) < args.drop_label
            y = torch.where(drop, torch.full_like(y, -1), y)
            for group in opt.param_groups:
                progress = max(step / total, (time.time() - began) / (deadline - began))
                group["lr"] = _lr(step, progress, args.warmup, args.lr)
            z, _, logdets = model(x, y)
            loss = model.get_loss(z, logdets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}")
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "state_dict": model.state_dict(), "noise_std": args.noise_std,
                "steps": done_before + step, "loss": ema, "data": "mnist" if args.data else "synthetic"}, path)
    print(f"saved {path} after {done_before + step} steps, loss {ema:.4f}")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="IDX folder/file, mnist.npz or mnist.pkl.gz; default synthetic")
    p.add_argument("--out", default="runs", help="checkpoint folder")
    p.add_argument("--patch-size", type=int, default=4, choices=[2, 4])
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--noise-std", type=float, default=0.05)
    p.add_argument("--drop-label", type=float, default=0.1, help="fraction of labels dropped to -1 (for CFG)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides --epochs)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this wall time")
    p.add_argument("--synthetic-size", type=int, default=20000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    p.add_argument("--resume", action="store_true",
                   help="continue training the cached checkpoint of the same config (new optimizer, new lr schedule)")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    train(arguments)
