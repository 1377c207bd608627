"""Input checks shared by the entry points: the noise, and what each block receives."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .solution import finite_samples

__all__ = ["check_noise", "check_block_input"]


def check_noise(z: Tensor, allow_nonfinite: bool = False) -> None:
    """Raise naming the problem unless `z` is a floating tensor with a batch dimension (and finite)."""
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor; got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor; got dtype {z.dtype}")
    if z.dim() == 0:
        raise ValueError("z must have a batch dimension; got a scalar")
    if z.is_meta:
        raise ValueError("z is on the 'meta' device, which holds no values; create it on a real device")
    if allow_nonfinite:
        return
    bad = ~finite_samples(z)
    if bool(bad.any()):
        indices = torch.nonzero(bad).flatten().tolist()
        raise ValueError(
            f"z contains non-finite values (nan or inf) in samples {indices[:10]}"
            f"{' ...' if len(indices) > 10 else ''}; with throw=False those samples are marked "
            "NONFINITE and the others solved"
        )


def check_block_input(block: Any, x: Tensor, index: int) -> None:
    """Raise naming block `index` unless `x` fits it: `(B, T, D)`, same device and dtype."""
    seq_len = getattr(block, "seq_len", None)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise TypeError(f"block {index} must have an int attribute seq_len >= 1; got {seq_len!r}")
    if x.dim() != 3 or x.shape[1] != seq_len:
        raise ValueError(
            f"block {index} expects input of shape (B, T={seq_len}, D); got {tuple(x.shape)}"
        )
    parameters = getattr(block, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            if first.device != x.device:
                raise ValueError(
                    f"block {index} has parameters on {first.device} but its input is on "
                    f"{x.device}; move the model or z"
                )
            if first.is_floating_point() and first.dtype != x.dtype:
                raise TypeError(
                    f"block {index} has {first.dtype} parameters but its input is {x.dtype}; "
                    "convert one of them (the solvers never change precision silently)"
                )
