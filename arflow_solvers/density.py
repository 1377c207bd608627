r"""The log-density of the samples: the base density of the noise minus every step's log-determinant.

Sampling maps noise $z$ through steps $x_k = f_k(x_{k-1})$ to $x$, so

$$\log q(x) = \log p(z) - \sum_k \log\left|\det \partial f_k / \partial x_{k-1}\right|.$$

An autoregressive block's Jacobian is triangular in its order: for an affine block
($x = e^{\log\sigma(x)} z + \mu(x)$) its log-determinant is $\sum \log\sigma(x^*)$, one
evaluation at the solution; a [`CausalMapBlock`][arflow_solvers.CausalMapBlock] gives its own
by `log_det(x, z, cond)`. Other steps give `with_log_det(x, cond) -> (x, log_det)`.
Everything here is ordinary torch code, so it differentiates through $x^*$ (by the implicit
adjoint) and through the parameters.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .protocol import AffineARBlock

__all__ = ["standard_normal_log_prob", "block_log_det", "step_with_log_det"]

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """`(B,)` log-density of `z` under a standard normal over all its non-batch elements."""
    flat = z.flatten(1)
    return -0.5 * (flat * flat).sum(1) - 0.5 * flat.shape[1] * _LOG_2PI


def checked_log_det(log_det: Any, batch: int, what: str) -> Tensor:
    if not isinstance(log_det, Tensor) or log_det.shape != (batch,):
        raise ValueError(f"{what} must return a log-determinant of shape ({batch},); "
                         f"got {tuple(getattr(log_det, 'shape', ())) or type(log_det).__name__}")
    return log_det


def block_log_det(block: Any, x: Tensor, z: Tensor, cond: Any, index: int) -> Tensor:
    """`(B,)` log |det dx/dz| of block `index`'s sampling map at its solution `x` for noise `z`."""
    name = type(block).__name__
    if callable(getattr(block, "log_det", None)):
        return checked_log_det(block.log_det(x, z, cond), x.shape[0], f"block {index} ({name}).log_det")
    if isinstance(block, AffineARBlock):
        _, log_sigma = block.affine(x, cond)
        return log_sigma.flatten(1).sum(1)
    raise TypeError(f"block {index} ({name}) has an inverse_map but no log_det(x, z, cond), so the "
                    "log-density of its samples is unknown; give it one to use log_prob")


def step_with_log_det(step: Any, x: Tensor, cond: Any, position: int) -> tuple[Tensor, Tensor]:
    """`step(x, cond)` and its `(B,)` log |det|, through the step's `with_log_det`."""
    with_log_det = getattr(step, "with_log_det", None)
    name = getattr(step, "__name__", type(step).__name__)
    if not callable(with_log_det):
        raise TypeError(f"steps[{position}] ({name}) has no with_log_det(x, cond) -> (x, log_det), so the "
                        "log-density of the samples is unknown; give it one (a volume-preserving step "
                        "returns zeros) to use log_prob")
    out, log_det = with_log_det(x, cond)
    return out, checked_log_det(log_det, x.shape[0], f"steps[{position}] ({name}).with_log_det")
