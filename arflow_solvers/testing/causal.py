"""Causality by perturbation: row `t` of a block's update may read only `x[:, :t]` (and `z[:, t]`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._common import (ConformanceError, as_solved, default_atol, positions_to_check,
                      random_like, row_errors, magnitude, shown, update_rows, validate)

__all__ = ["check_causal"]


@torch.no_grad()
def check_causal(
    block: Any,
    z: Tensor,
    cond: Any = None,
    *,
    positions: Iterable[int] | None = None,
    atol: float | None = None,
    seed: int = 0,
) -> None:
    """Check by perturbation that row `t` of the block's update reads only `x[:, :t]`.

    For each position `s` checked, `x[:, s]` of a random iterate is perturbed and the
    block re-evaluated at the same batch shape: no row `t <= s` of `affine`'s `mu` and
    `log_sigma`, nor of `inverse_map`'s update (a
    [`CausalMapBlock`][arflow_solvers.CausalMapBlock]), may change; a block with both has
    both checked. Perturbing the noise `z[:, s]` must change no row of `inverse_map` but `s`. A
    position's perturbation that changes nothing later is allowed (a block need not read
    everything it may). Evaluates in `z`'s dtype and device, under `torch.no_grad()`. A
    block with a `snapshot()` method is checked, and so is its snapshot (what solves call).

    Arguments:
        block: the block to check.
        z: `(B, T, D)` noise; the random iterate has its shape, dtype and device.
        cond: the block's conditioning for this batch, or `None`.
        positions: the positions `s` to perturb; `None`: all when `T <= 16`, else 16 spread
            over `[0, T)` including the first two and the last two.
        atol: largest change allowed in a row that must not change; `None`:
            `eps(dtype) ** 0.75` times the outputs' magnitude when above 1 (a causal block
            usually leaves those rows bit-identical).
        seed: seed of the random iterate and perturbations.

    Raises:
        ConformanceError: a row changed that must not have; the message names the
            perturbed positions, the rows that changed and by how much.
        TypeError: `block` satisfies neither protocol, or `z` is not a floating tensor.
        ValueError: `z` is not `(B, T, D)` with `T = block.seq_len`, or bad `positions`.

    Examples:
        >>> import torch
        >>> class Leaky:  # row t reads x_t itself: not autoregressive
        ...     seq_len = 4
        ...     def affine(self, x, cond=None):
        ...         return 0.5 * x, torch.zeros_like(x)
        >>> check_causal(Leaky(), torch.zeros(2, 4, 1, dtype=torch.float64))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        arflow_solvers.testing.ConformanceError: Leaky failed check_causal: perturbing x[:, s] changed mu rows t <= s, which may read only x[:, :t]: s=0 changed rows [0]; s=1 changed rows [1]; s=2 changed rows [2]; s=3 changed rows [3]; largest change ... at positions [0, 1, 2, 3] (atol ...)
        >>> class Shift:  # x_t = z_t + x_{t-1}
        ...     seq_len = 4
        ...     def affine(self, x, cond=None):
        ...         return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1), torch.zeros_like(x)
        >>> check_causal(Shift(), torch.zeros(2, 4, 1, dtype=torch.float64))
    """
    check = "check_causal"
    validate(block, z, check)
    chosen = positions_to_check(positions, z.shape[1], check)
    for name, target in as_solved(block, check):
        _check_causal_one(name, target, z, cond, chosen, atol, seed)


def _check_causal_one(name: str, block: Any, z: Tensor, cond: Any, chosen: list[int],
                      atol: float | None, seed: int) -> None:
    check = "check_causal"
    seq_len = z.shape[1]
    evaluate = update_rows(block)
    has_map = callable(getattr(block, "inverse_map", None))
    x = random_like(z, seed)
    noise = z.clone()
    base = evaluate(x, noise, cond)
    limit = atol if atol is not None else default_atol(z.dtype, magnitude(*(t for _, t in base)), 0.75)

    rows = torch.arange(seq_len)
    failures: list[tuple[str, int, list[str], list[int], float]] = []  # (var, s, outputs, rows, error)
    for s in chosen:
        bump = random_like(z[:, s : s + 1], seed + 1 + s)
        perturbed = x.clone()
        perturbed[:, s : s + 1] += bump
        trials = [("x", evaluate(perturbed, noise, cond))]
        if has_map:
            other = noise.clone()
            other[:, s : s + 1] += bump
            trials.append(("z", evaluate(x, other, cond)))
        for var, outputs in trials:
            forbidden = rows <= s if var == "x" else rows != s
            changed = [(what, row_errors(new, old)) for (what, old), (_, new) in zip(base, outputs)]
            bad = [(what, (errors > limit) & forbidden, errors) for what, errors in changed]
            hit = torch.stack([mask for _, mask, _ in bad]).any(0)
            if bool(hit.any()):
                worst = max(float(errors[mask].max()) for _, mask, errors in bad if bool(mask.any()))
                names = [what for what, mask, _ in bad if bool(mask.any())]
                failures.append((var, s, names, rows[hit].tolist(), worst))
    if failures:
        worst = max(f[-1] for f in failures)
        where = sorted({f[1] for f in failures})
        rules = {"x": "rows t <= s, which may read only x[:, :t]", "z": "rows t != s, which may read only z[:, t]"}
        parts = []
        for var in ("x", "z"):
            mine = [f for f in failures if f[0] == var]
            if mine:
                outputs = "/".join(dict.fromkeys(name for f in mine for name in f[2]))
                cases = "; ".join(f"s={s} changed rows {shown(changed)}" for _, s, _, changed, _ in mine[:6])
                parts.append(f"perturbing {var}[:, s] changed {outputs} {rules[var]}: {cases}"
                             + ("; ..." if len(mine) > 6 else ""))
        detail = " | ".join(parts) + f"; largest change {worst:.3g} at positions {shown(where)} (atol {limit:.3g})"
        raise ConformanceError(name, check, where, worst, detail)
