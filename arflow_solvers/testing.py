"""Conformance checks for third-party blocks: run them on your own block before solving with it.

Each check evaluates the block on a noise batch `z` (`(B, T, D)`, in the dtype you want the
block checked in: nothing is cast) and raises [`ConformanceError`][arflow_solvers.testing.ConformanceError]
(an `AssertionError`, so it reads as a failed test under pytest) naming the block, the
check, the offending positions and the size of the violation. Run them in float64 where
the block allows it: the tolerances scale with the dtype's machine epsilon.

```python
from arflow_solvers.testing import check_block

def test_my_block_is_a_valid_autoregressive_block():
    check_block(MyBlock().double(), torch.randn(3, MyBlock.seq_len, 4, dtype=torch.float64))
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._evaluate import select_rows
from .protocol import AffineARBlock, CachedARBlock, CausalMapBlock
from .solve import solve
from .solvers import GSJacobi, Jacobi, Serial

__all__ = [
    "ConformanceError",
    "check_block",
    "check_cached_range",
    "check_causal",
    "check_exact_at_bound",
]

_MAX_POSITIONS = 16
"""`check_causal` perturbs every position of blocks with at most this many, else a spread."""


class ConformanceError(AssertionError):
    """A block broke its protocol's contract.

    Attributes:
        block: a short name of the block.
        check: the check that failed (`"check_causal"`, ...).
        positions: the offending positions (sequence indices).
        violation: the largest deviation found (absolute).
    """

    def __init__(self, block: str, check: str, positions: Sequence[int], violation: float, detail: str):
        self.block, self.check = block, check
        self.positions, self.violation = list(positions), float(violation)
        self.detail = detail
        super().__init__(f"{block} failed {check}: {detail}")

    def __reduce__(self) -> tuple:  # picklable (e.g. across pytest-xdist workers)
        return type(self), (self.block, self.check, self.positions, self.violation, self.detail)


# -- helpers ----------------------------------------------------------------------------------


def _name(block: Any) -> str:
    """`repr(block)` when it is short and says something, else the type's name."""
    text = repr(block)
    if "\n" in text or len(text) > 100 or " object at 0x" in text:
        return type(block).__name__
    return text


def _as_solved(block: Any, check: str) -> list[tuple[str, Any]]:
    """The block, and what a solve evaluates instead when the block defines `snapshot()`."""
    targets = [(_name(block), block)]
    snapshot = getattr(block, "snapshot", None)
    if callable(snapshot):
        solving = snapshot()  # under no_grad, as in a solve
        if not isinstance(solving, (AffineARBlock, CausalMapBlock)) or solving.seq_len != block.seq_len:
            raise ConformanceError(
                _name(block), check, [], float("inf"),
                f"snapshot() returned {type(solving).__name__}, not a block with seq_len={block.seq_len}",
            )
        if solving is not block:
            targets.append((f"{_name(block)}.snapshot()", solving))
    return targets


def _validate(block: Any, z: Tensor, check: str) -> None:
    if not isinstance(block, (AffineARBlock, CausalMapBlock)):
        raise TypeError(
            f"{check}: block must have `seq_len` and `affine(x, cond)` (AffineARBlock) or "
            f"`inverse_map(x, z, cond)` (CausalMapBlock); got {type(block).__name__}"
        )
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise TypeError(f"{check}: z must be a floating-point tensor; got {getattr(z, 'dtype', type(z).__name__)}")
    if z.dim() != 3 or z.shape[1] != block.seq_len or z.shape[0] < 1:
        raise ValueError(
            f"{check}: z must have shape (B >= 1, T={block.seq_len}, D); got {tuple(z.shape)}"
        )


def _default_atol(dtype: torch.dtype, scale: float, power: float) -> float:
    """`eps(dtype) ** power`, times the size of what is compared when that exceeds 1."""
    return float(torch.finfo(dtype).eps) ** power * max(1.0, scale)


def _scale(*tensors: Tensor) -> float:
    finite = [t[torch.isfinite(t)] for t in tensors]
    return max((float(t.abs().max()) for t in finite if t.numel()), default=0.0)


def _random_like(z: Tensor, seed: int) -> Tensor:
    """Standard normal values shaped like `z`, reproducible, on `z`'s device and dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(z.shape, generator=g, dtype=torch.float64).to(device=z.device, dtype=z.dtype)


def _update_rows(block: Any) -> Callable[[Tensor, Tensor, Any], list[tuple[str, Tensor]]]:
    """The block's per-row outputs: `inverse_map` (what the solvers iterate) and/or `affine`."""

    def evaluate(x: Tensor, z: Tensor, cond: Any) -> list[tuple[str, Tensor]]:
        outputs = []
        if callable(getattr(block, "inverse_map", None)):
            outputs.append(("inverse_map", block.inverse_map(x, z, cond)))
        if callable(getattr(block, "affine", None)):
            mu, log_sigma = block.affine(x, cond)
            outputs += [("mu", mu), ("log_sigma", log_sigma)]
        return outputs

    return evaluate


def _row_errors(new: Tensor, old: Tensor) -> Tensor:
    """`(T,)` max-abs difference of each row over batch and channels (NaN-aware: NaN vs NaN is 0)."""
    same = (new == old) | (torch.isnan(new) & torch.isnan(old))
    diff = torch.where(same, torch.zeros_like(new), (new - old).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return diff.amax(dim=(0, 2)).double().cpu()


def _positions(positions: Iterable[int] | None, seq_len: int, check: str) -> list[int]:
    if positions is None:
        if seq_len <= _MAX_POSITIONS:
            return list(range(seq_len))
        spread = torch.linspace(0, seq_len - 1, _MAX_POSITIONS - 2).round().long().tolist()
        return sorted({0, 1, seq_len - 2, seq_len - 1, *spread})
    chosen = sorted({int(s) for s in positions})
    if not chosen or chosen[0] < 0 or chosen[-1] >= seq_len:
        raise ValueError(f"{check}: positions must be a non-empty set of ints in [0, {seq_len}); got {chosen}")
    return chosen


def _shown(values: Sequence[int], limit: int = 8) -> str:
    values = list(values)
    return "[" + ", ".join(map(str, values[:limit])) + (", ..." if len(values) > limit else "") + "]"


# -- the checks -------------------------------------------------------------------------------


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
    _validate(block, z, check)
    chosen = _positions(positions, z.shape[1], check)
    for name, target in _as_solved(block, check):
        _check_causal_one(name, target, z, cond, chosen, atol, seed)


def _check_causal_one(name: str, block: Any, z: Tensor, cond: Any, chosen: list[int],
                      atol: float | None, seed: int) -> None:
    check = "check_causal"
    seq_len = z.shape[1]
    evaluate = _update_rows(block)
    has_map = callable(getattr(block, "inverse_map", None))
    x = _random_like(z, seed)
    noise = z.clone()
    base = evaluate(x, noise, cond)
    limit = atol if atol is not None else _default_atol(z.dtype, _scale(*(t for _, t in base)), 0.75)

    rows = torch.arange(seq_len)
    failures: list[tuple[str, int, list[str], list[int], float]] = []  # (var, s, outputs, rows, error)
    for s in chosen:
        bump = _random_like(z[:, s : s + 1], seed + 1 + s)
        perturbed = x.clone()
        perturbed[:, s : s + 1] += bump
        trials = [("x", evaluate(perturbed, noise, cond))]
        if has_map:
            other = noise.clone()
            other[:, s : s + 1] += bump
            trials.append(("z", evaluate(x, other, cond)))
        for var, outputs in trials:
            forbidden = rows <= s if var == "x" else rows != s
            changed = [(what, _row_errors(new, old)) for (what, old), (_, new) in zip(base, outputs)]
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
                cases = "; ".join(f"s={s} changed rows {_shown(changed)}" for _, s, _, changed, _ in mine[:6])
                parts.append(f"perturbing {var}[:, s] changed {outputs} {rules[var]}: {cases}"
                             + ("; ..." if len(mine) > 6 else ""))
        detail = " | ".join(parts) + f"; largest change {worst:.3g} at positions {_shown(where)} (atol {limit:.3g})"
        raise ConformanceError(name, check, where, worst, detail)


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
    _validate(block, z, check)
    if not isinstance(block, CachedARBlock):
        raise TypeError(
            f"{check}: block must have init_cache, affine_range and commit (CachedARBlock); "
            f"got {type(block).__name__}"
        )
    seq_len = z.shape[1]
    points = sorted({0, 1, seq_len // 2, seq_len - 1} & set(range(seq_len))) if commits is None else list(commits)
    if not points or any(not 0 <= c < seq_len for c in points) or points != sorted(set(points)):
        raise ValueError(f"{check}: commits must be strictly increasing ints in [0, {seq_len}); got {points}")
    for name, target in _as_solved(block, check):
        if isinstance(target, CachedARBlock):  # a snapshot without a cache is solved by full passes
            _check_cached_range_one(name, target, z, cond, points, atol, seed)


def _check_cached_range_one(name: str, block: Any, z: Tensor, cond: Any, points: list[int],
                            atol: float | None, seed: int) -> None:
    check = "check_cached_range"
    batch, seq_len = z.shape[:2]
    subset = torch.arange(1 if batch > 1 else 0, batch, 2, device=z.device)
    x = _random_like(z, seed)
    cache = block.init_cache(z, cond)
    committed = 0
    limit: float | None = atol
    counter = [seed]

    def fresh(c: int) -> Tensor:
        """`x` with everything from position `c` on redrawn."""
        counter[0] += 1
        new = x.clone()
        new[:, c:] = _random_like(z, counter[0])[:, c:]
        return new

    def compare(iterate: Tensor, start: int, stop: int, rows: Tensor | None, call: str) -> None:
        nonlocal limit
        sub = iterate if rows is None else iterate[rows]
        got = block.affine_range(cache, sub, start, stop, select_rows(cond, rows, batch), rows)
        full = block.affine(iterate, cond)
        expected = [t[:, start:stop] if rows is None else t[rows, start:stop] for t in full]
        if limit is None:
            limit = _default_atol(z.dtype, _scale(*full), 0.75)
        for output, have, want in zip(("mu", "log_sigma"), got, expected):
            if not isinstance(have, Tensor) or have.shape != want.shape:
                raise ConformanceError(
                    name, check, list(range(start, stop)), float("inf"),
                    f"{call} returned {output} of shape {tuple(getattr(have, 'shape', ()))}; "
                    f"expected {tuple(want.shape)}",
                )
            errors = _row_errors(have, want)
            if bool((errors > limit).any()):
                where = (torch.nonzero(errors > limit).flatten() + start).tolist()
                worst = float(errors.max())
                raise ConformanceError(
                    name, check, where, worst,
                    f"{call} differs from the same rows of affine(x) in {output} at positions "
                    f"{_shown(where)} by up to {worst:.3g} (atol {limit:.3g})",
                )

    for c in points:
        if c > committed:
            block.commit(cache, x, c, cond)
            committed = c
        mid = c + max(1, (seq_len - c) // 2)
        first = fresh(c)
        rows_text = _shown(subset.tolist())
        compare(first, c, seq_len, None, f"affine_range(start={c}, stop={seq_len}) after commit(upto={c})")
        compare(fresh(c), c, mid, subset,
                f"affine_range(start={c}, stop={mid}, rows={rows_text}) after commit(upto={c})")
        compare(fresh(c), c, c + 1, None, f"affine_range(start={c}, stop={c + 1}) after commit(upto={c})")
        compare(first, c, seq_len, None,
                f"affine_range(start={c}, stop={seq_len}) after commit(upto={c}), on an earlier iterate again")


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
    _validate(block, z, check)
    serial = solve(block, z, Serial(), cond=cond, throw=False).x
    if not bool(torch.isfinite(serial).all()):
        raise ValueError(f"{check}: {_name(block)} overflows on this z even serially; use smaller noise")
    limit = atol if atol is not None else _default_atol(z.dtype, _scale(serial), 0.6)
    solvers = [Jacobi(tol=0.0)] + [GSJacobi(k, tol=0.0) for k in segments]
    for solver in solvers:
        x = solve(block, z, solver, cond=cond, throw=False).x
        errors = _row_errors(x, serial)
        if bool((errors > limit).any()):
            where = torch.nonzero(errors > limit).flatten().tolist()
            worst = float(errors.max())
            raise ConformanceError(
                _name(block), check, where, worst,
                f"{solver!r} at the bound differs from Serial() at positions {_shown(where)} "
                f"by up to {worst:.3g} (atol {limit:.3g}); a causal block gives the serial "
                "answer to rounding",
            )


def check_block(block: Any, z: Tensor, cond: Any = None, *, atol: float | None = None) -> list[str]:
    """Run every check that applies to the block's protocols; return the names of those run.

    `check_causal` and `check_exact_at_bound` always, `check_cached_range` for a
    [`CachedARBlock`][arflow_solvers.CachedARBlock]. Causality runs first, since the other
    checks' failures usually follow from a causality violation.

    Arguments:
        block: the block to check.
        z: `(B, T, D)` noise in the dtype to check in (float64 recommended).
        cond: the block's conditioning for this batch, or `None`.
        atol: passed to every check (`None`: each check's default).

    Raises:
        ConformanceError: the first check that failed, naming the positions.
        TypeError: `block` satisfies neither protocol, or `z` is not a floating tensor.
        ValueError: `z` is not `(B, T, D)` with `T = block.seq_len`.

    Examples:
        >>> import torch
        >>> class Shift:  # x_t = z_t + x_{t-1}
        ...     seq_len = 5
        ...     def affine(self, x, cond=None):
        ...         return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1), torch.zeros_like(x)
        >>> check_block(Shift(), torch.randn(3, 5, 2, dtype=torch.float64))
        ['check_causal', 'check_exact_at_bound']
    """
    _validate(block, z, "check_block")
    done = []
    check_causal(block, z, cond, atol=atol)
    done.append("check_causal")
    if isinstance(block, CachedARBlock):
        check_cached_range(block, z, cond, atol=atol)
        done.append("check_cached_range")
    check_exact_at_bound(block, z, cond, atol=atol)
    done.append("check_exact_at_bound")
    return done
