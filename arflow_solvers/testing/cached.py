"""The KV-cache contract: `affine_range` after `commit` equals the same rows of a full `affine` pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._evaluate import select_rows
from ..protocol import CachedARBlock
from ._common import (ConformanceError, as_solved, default_atol, magnitude, random_like, row_errors, shown,
                      validate)

__all__ = ["check_cached_range"]


@torch.no_grad()
def check_cached_range(
    block: Any,
    z: Tensor,
    cond: Any = None,
    *,
    commits: Sequence[int] | None = None,
    atol: float | None = None,
    seed: int = 0,
) -> None:
    """Check a [`CachedARBlock`][arflow_solvers.CachedARBlock]: cached rows equal full passes.

    On one cache (`init_cache(z, cond)`), for each commit point `c` (increasing, as the
    protocol requires of callers) it commits a random iterate's first `c` positions and then
    calls `affine_range` the way the solvers do, each time on a new iterate that keeps the
    committed prefix and changes everything after it:

    - rows `[c, T)` of every sample (a Jacobi iteration),
    - rows `[c, mid)` of the samples `rows = [1, 3, 5, ...]` (`[0]` when `B = 1`): a batch
      from which converged samples were dropped, never a prefix of the batch,
    - row `c` of every sample (a serial step),
    - rows `[c, T)` of every sample on the first iterate again (the cache must notice that
      what it last saw was another iterate),

    and compares each with the same rows of `affine(iterate, cond)`. A block with a
    `snapshot()` method is checked, and so is its snapshot (what solves call).

    Arguments:
        block: the block to check (it must have `init_cache`, `affine_range`, `commit`).
        z: `(B, T, D)` noise, passed to `init_cache`; iterates are random, shaped like it.
        cond: the conditioning for the whole batch; the check passes the subset's rows of it
            (tensors whose first dimension is `B`) together with `rows`.
        commits: the commit points; `None`: `0, 1, T // 2, T - 1` (those in `[0, T)`).
        atol: largest difference allowed; `None`: `eps(dtype) ** 0.75` times the outputs'
            magnitude when above 1.
        seed: seed of the iterates.

    Raises:
        ConformanceError: `affine_range` disagrees with `affine`, or returned the wrong
            shape; the message names the call, the positions and the difference.
        TypeError: the block is not a `CachedARBlock`, or `z` is not a floating tensor.
        ValueError: `z` has the wrong shape, or `commits` is not increasing in `[0, T)`.

    Examples:
        >>> import torch
        >>> class Stale:  # caches the first answer and never recomputes it
        ...     seq_len = 3
        ...     def affine(self, x, cond=None):
        ...         return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1), torch.zeros_like(x)
        ...     def init_cache(self, z, cond=None):
        ...         return {}
        ...     def affine_range(self, cache, x, start, stop, cond=None, rows=None):
        ...         mu, log_sigma = cache.setdefault("out", self.affine(x, cond))
        ...         mu = mu if rows is None else mu[rows]
        ...         log_sigma = log_sigma if rows is None else log_sigma[rows]
        ...         return mu[:, start:stop], log_sigma[:, start:stop]
        ...     def commit(self, cache, x, upto, cond=None):
        ...         pass
        >>> check_cached_range(Stale(), torch.zeros(2, 3, 1, dtype=torch.float64))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        arflow_solvers.testing.ConformanceError: Stale failed check_cached_range: ...
    """
    check = "check_cached_range"
    validate(block, z, check)
    if not isinstance(block, CachedARBlock):
        raise TypeError(
            f"{check}: block must have init_cache, affine_range and commit (CachedARBlock); "
            f"got {type(block).__name__}"
        )
    seq_len = z.shape[1]
    points = sorted({0, 1, seq_len // 2, seq_len - 1} & set(range(seq_len))) if commits is None else list(commits)
    if not points or any(not 0 <= c < seq_len for c in points) or points != sorted(set(points)):
        raise ValueError(f"{check}: commits must be strictly increasing ints in [0, {seq_len}); got {points}")
    for name, target in as_solved(block, check):
        if isinstance(target, CachedARBlock):  # a snapshot without a cache is solved by full passes
            _check_cached_range_one(name, target, z, cond, points, atol, seed)


def _check_cached_range_one(name: str, block: Any, z: Tensor, cond: Any, points: list[int],
                            atol: float | None, seed: int) -> None:
    check = "check_cached_range"
    batch, seq_len = z.shape[:2]
    subset = torch.arange(1 if batch > 1 else 0, batch, 2, device=z.device)
    x = random_like(z, seed)
    cache = block.init_cache(z, cond)
    committed = 0
    limit: float | None = atol
    counter = [seed]

    def fresh(c: int) -> Tensor:
        """`x` with everything from position `c` on redrawn."""
        counter[0] += 1
        new = x.clone()
        new[:, c:] = random_like(z, counter[0])[:, c:]
        return new

    def compare(iterate: Tensor, start: int, stop: int, rows: Tensor | None, call: str) -> None:
        nonlocal limit
        sub = iterate if rows is None else iterate[rows]
        got = block.affine_range(cache, sub, start, stop, select_rows(cond, rows, batch), rows)
        full = block.affine(iterate, cond)
        expected = [t[:, start:stop] if rows is None else t[rows, start:stop] for t in full]
        if limit is None:
            limit = default_atol(z.dtype, magnitude(*full), 0.75)
        for output, have, want in zip(("mu", "log_sigma"), got, expected):
            if not isinstance(have, Tensor) or have.shape != want.shape:
                raise ConformanceError(
                    name, check, list(range(start, stop)), float("inf"),
                    f"{call} returned {output} of shape {tuple(getattr(have, 'shape', ()))}; "
                    f"expected {tuple(want.shape)}",
                )
            errors = row_errors(have, want)
            if bool((errors > limit).any()):
                where = (torch.nonzero(errors > limit).flatten() + start).tolist()
                worst = float(errors.max())
                raise ConformanceError(
                    name, check, where, worst,
                    f"{call} differs from the same rows of affine(x) in {output} at positions "
                    f"{shown(where)} by up to {worst:.3g} (atol {limit:.3g})",
                )

    for c in points:
        if c > committed:
            block.commit(cache, x, c, cond)
            committed = c
        mid = c + max(1, (seq_len - c) // 2)
        first = fresh(c)
        rows_text = shown(subset.tolist())
        compare(first, c, seq_len, None, f"affine_range(start={c}, stop={seq_len}) after commit(upto={c})")
        compare(fresh(c), c, mid, subset,
                f"affine_range(start={c}, stop={mid}, rows={rows_text}) after commit(upto={c})")
        compare(fresh(c), c, c + 1, None, f"affine_range(start={c}, stop={c + 1}) after commit(upto={c})")
        compare(first, c, seq_len, None,
                f"affine_range(start={c}, stop={seq_len}) after commit(upto={c}), on an earlier iterate again")
