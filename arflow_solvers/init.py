"""Initial guesses `X0` for the Jacobi iterations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._evaluate import affine_update

__all__ = ["Init", "noise", "zeros", "zeros_first_exact", "exact_prefix"]

Init = Callable[[Any, Tensor, Any], Tensor]
"""An initial guess: `init(block, z, cond) -> x0`, `x0` shaped like `z` (`(B, T, D)`).

An init may carry an attribute `exact_prefix: int` saying how many leading positions of
`x0` already equal the serial answer; the solvers then need that many fewer iterations to
reach the exactness bound.
"""


def exact_prefix(init: Init) -> int:
    """How many leading positions `init` returns exactly (0 unless it says otherwise)."""
    return int(getattr(init, "exact_prefix", 0))


def noise(block: Any, z: Tensor, cond: Any = None) -> Tensor:
    """`X0 = Z`: start from the noise itself (the paper's default initial guess).

    Examples:
        >>> import torch
        >>> z = torch.ones(1, 3, 2)
        >>> bool(torch.equal(noise(None, z), z))
        True
    """
    return z.clone()


def zeros(block: Any, z: Tensor, cond: Any = None) -> Tensor:
    """`X0 = 0` (what nflows' inverse starts from)."""
    return torch.zeros_like(z)


def zeros_first_exact(block: Any, z: Tensor, cond: Any = None) -> Tensor:
    """The paper's `Z0`: zeros everywhere except position 0, which is solved exactly.

    Row 0 of an autoregressive block reads no position, so one evaluation of it gives
    `x_0 = sigma_0 z_0 + mu_0`. Blocks with a KV cache evaluate only that row; others spend
    one full pass (which is what makes this guess worth it mainly for cached blocks).
    """
    x0 = torch.zeros_like(z)
    if hasattr(block, "affine_range"):
        cache = block.init_cache(z, cond)
        mu, log_sigma = block.affine_range(cache, x0, 0, 1, cond, None)
        x0[:, :1] = affine_update(z[:, :1], mu, log_sigma, None)
    elif hasattr(block, "inverse_map"):
        x0[:, :1] = block.inverse_map(x0, z, cond)[:, :1]
    else:
        mu, log_sigma = block.affine(x0, cond)
        x0[:, :1] = affine_update(z[:, :1], mu[:, :1], log_sigma[:, :1], None)
    return x0


zeros_first_exact.exact_prefix = 1  # type: ignore[attr-defined]
