"""Exactness at the bound: Jacobi and GS-Jacobi with `max_iters=None` give the serial answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._sweep import NotCausalError
from ..solve import solve
from ..solvers import GSJacobi, Jacobi, Serial
from ._common import (ConformanceError, default_atol, block_name, row_errors, magnitude, shown, validate)

__all__ = ["check_exact_at_bound"]


@torch.no_grad()
def check_exact_at_bound(
    block: Any,
    z: Tensor,
    cond: Any = None,
    *,
    segments: Sequence[int] = (2, 3),
    atol: float | None = None,
) -> None:
    """Check that Jacobi and GS-Jacobi at the exactness bound give the serial answer.

    Solves with `Serial()`, `Jacobi(tol=0.0)` and `GSJacobi(k, tol=0.0)` for each `k` in
    `segments` (`max_iters=None`: the bound), through
    [`solve`][arflow_solvers.solve], and compares. In exact arithmetic they are equal for any
    causal block; in floating point they agree to rounding, so run it in float64 (a
    non-causal block typically misses by far more than rounding). Also runs the block's
    cached path when it has one.

    Arguments:
        block: the block to check.
        z: `(B, T, D)` noise, ideally float64; it must not make the block overflow serially.
        cond: the block's conditioning, or `None`.
        segments: the GS-Jacobi segment counts to try.
        atol: largest difference allowed; `None`: `eps(dtype) ** 0.6` times the magnitude of
            the serial answer when above 1 (`4e-10` in float64).

    Raises:
        ConformanceError: a solver's answer differs from serial; the message names the
            solver, the positions and the difference.
        TypeError: `block` satisfies neither protocol, or `z` is not a floating tensor.
        ValueError: `z` has the wrong shape, or the serial answer is not finite.

    Examples:
        >>> import torch
        >>> class Halver:  # x_t = z_t + x_{t-1} / 2
        ...     seq_len = 6
        ...     def affine(self, x, cond=None):
        ...         mu = 0.5 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        ...         return mu, torch.zeros_like(x)
        >>> check_exact_at_bound(Halver(), torch.randn(2, 6, 1, dtype=torch.float64))
    """
    check = "check_exact_at_bound"
    validate(block, z, check)
    serial = solve(block, z, Serial(), cond=cond, throw=False).x
    if not bool(torch.isfinite(serial).all()):
        raise ValueError(f"{check}: {block_name(block)} overflows on this z even serially; use smaller noise")
    limit = atol if atol is not None else default_atol(z.dtype, magnitude(serial), 0.6)
    solvers = [Jacobi(tol=0.0)] + [GSJacobi(k, tol=0.0) for k in segments]
    for solver in solvers:
        try:
            x = solve(block, z, solver, cond=cond, throw=False).x
        except NotCausalError as error:
            raise ConformanceError(block_name(block), check, [error.row], error.moved,
                                   f"{solver!r} stopped: {error}") from error
        errors = row_errors(x, serial)
        if bool((errors > limit).any()):
            where = torch.nonzero(errors > limit).flatten().tolist()
            worst = float(errors.max())
            raise ConformanceError(
                block_name(block), check, where, worst,
                f"{solver!r} at the bound differs from Serial() at positions {shown(where)} "
                f"by up to {worst:.3g} (atol {limit:.3g}); a causal block gives the serial "
                "answer to rounding",
            )
