"""One solve's view of a block: evaluates update rows for a subset of samples and counts the cost."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Evaluator", "CountedBlock", "select_rows", "affine_update", "finite_rows"]


def finite_rows(values: Tensor) -> Tensor:
    """`(B,)` bool: whether every entry of each sample is finite.

    Two reductions (the least and largest entry of each sample: NaN propagates, and an
    infinity is one of them), several times faster than a boolean tensor the size of `values`.
    """
    if values.numel() == 0 or not values.is_floating_point():
        return torch.isfinite(values.flatten(1)).all(1)
    flat = values.flatten(1)
    return torch.isfinite(flat.amin(1)) & torch.isfinite(flat.amax(1))


def select_rows(cond: Any, rows: Tensor | None, batch_size: int) -> Any:
    """The conditioning of samples `rows`: tensors with a leading batch dim are indexed."""
    if rows is None or cond is None:
        return cond
    if isinstance(cond, Tensor):
        return cond[rows] if cond.dim() > 0 and cond.shape[0] == batch_size else cond
    if isinstance(cond, (tuple, list)):
        return type(cond)(select_rows(c, rows, batch_size) for c in cond)
    if isinstance(cond, dict):
        return {k: select_rows(v, rows, batch_size) for k, v in cond.items()}
    return cond


def affine_update(z: Tensor, mu: Tensor, log_sigma: Tensor, dtype: torch.dtype | None) -> Tensor:
    """`exp(log_sigma) * z + mu`, optionally computed in `dtype` and cast back."""
    if dtype is None or dtype == z.dtype:
        return torch.addcmul(mu, torch.exp(log_sigma), z)
    return torch.addcmul(mu.to(dtype), torch.exp(log_sigma.to(dtype)), z.to(dtype)).to(z.dtype)


def _unread_from(block: Any, seq_len: int) -> int:
    """The block's `unread_from` (positions from there on are read by no row), checked; `seq_len` if it has none."""
    value = getattr(block, "unread_from", seq_len)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= seq_len:
        raise ValueError(f"{type(block).__name__}.unread_from must be an int in [0, seq_len={seq_len}]; "
                         f"got {value!r}")
    return value


class Evaluator:
    """The one gateway of a solve to its block: evaluates update rows and counts every call.

    A block with a `snapshot()` method is asked for it once, here (see
    [`AffineARBlock`][arflow_solvers.AffineARBlock]), and the solve calls the snapshot. Rows
    `[start, stop)` of the inverse update are computed from the block's KV cache
    (`affine_range` / `commit`) when it has one, from its own `inverse_map` when it has one,
    and from a full `affine` pass otherwise. Initial guesses see the block through
    [`view`][arflow_solvers._evaluate.Evaluator.view], so their network calls are counted
    too. `passes` counts network calls, `work` full-pass equivalents.
    """

    def __init__(self, block: Any, z: Tensor, cond: Any, update_dtype: torch.dtype | None):
        snapshot = getattr(block, "snapshot", None)
        self.block = snapshot() if callable(snapshot) else block
        self._z = z
        self.cond = cond
        self.update_dtype = update_dtype
        self.batch_size, self.seq_len = z.shape[0], z.shape[1]
        self._finite = finite_rows(z)
        self.has_map = callable(getattr(block, "inverse_map", None))
        self.has_rows = self.has_map and callable(getattr(self.block, "inverse_map_rows", None))
        self.unread_from = _unread_from(self.block, self.seq_len) if self.has_rows else self.seq_len
        # `unread_from` holds by construction of `inverse_map`: its rows need no check of their own
        self.unread_proven = self.unread_from < self.seq_len and getattr(self.block, "unread_proven", False) is True
        # whether the block computes rows apart and reads `settled` to do so (its `reads_settled`, default yes)
        self.reads_settled = self.has_rows and bool(getattr(self.block, "reads_settled", True))
        self.cached = not self.has_map and callable(getattr(block, "affine_range", None))
        self.cache = block.init_cache(z, cond) if self.cached else None
        self.committed = 0
        self._passes = 0
        self._work = 0.0
        self._checked = False

    @property
    def passes(self) -> int:
        """Network calls so far."""
        return self._passes

    @property
    def work(self) -> float:
        """Full-pass equivalents so far (samples x positions evaluated / (B x T))."""
        return self._work

    @property
    def view(self) -> "CountedBlock":
        """The block with its network calls counted here: what an initial guess receives."""
        return CountedBlock(self)

    def noise(self, samples: Tensor | None, start: int, stop: int) -> Tensor:
        """Rows `[start, stop)` of the noise of `samples` (`None`: all)."""
        return self._z[:, start:stop] if samples is None else self._z[samples, start:stop]

    def finite_noise(self, samples: Tensor) -> Tensor:
        """`(len(samples),)` bool: whether each sample's noise is finite."""
        return self._finite[samples]

    def count(self, samples: int, positions: int) -> None:
        """Record one network call on `samples` samples and `positions` positions."""
        self._passes += 1
        self._work += samples * positions / (self.batch_size * self.seq_len)

    def record(self, passes: int, work: float) -> None:
        """Add calls made outside this evaluator (a nested solve's) to the counts."""
        self._passes += passes
        self._work += work

    def update(self, x: Tensor, rows: Tensor | None, start: int, stop: int, settled: Tensor | None = None) -> Tensor:
        """New values of rows `[start, stop)` for samples `rows` (`None`: all).

        `x` holds those samples' iterates, `(b, T, D)`; returns `(b, stop - start, D)`.
        `settled` (`(B,)`, for every sample of the solve): the rows before it are final, and a
        block with `inverse_map_rows` computes only rows `[start, stop)`, and may skip those
        (equal to its `inverse_map` to rounding).
        """
        cond = select_rows(self.cond, rows, self.batch_size)
        if settled is not None and self.has_rows:
            self.count(x.shape[0], stop - start)
            z = self._z if rows is None else self._z[rows]
            expected = (x.shape[0], stop - start, x.shape[2])
            x_new = self.block.inverse_map_rows(x, z, cond, start, settled if rows is None else settled[rows], stop)
            if not isinstance(x_new, Tensor) or tuple(x_new.shape) != expected or x_new.dtype != x.dtype:
                raise ValueError(f"block.inverse_map_rows must return a {x.dtype} tensor of shape {expected} for "
                                 f"rows from {start} of an iterate of shape {tuple(x.shape)}; got {_describe(x_new)}")
            return x_new
        if self.has_map:
            self.count(x.shape[0], self.seq_len)
            result = self.block.inverse_map(x, self._z if rows is None else self._z[rows], cond)
            (x_new,) = self._check("inverse_map", (result,), tuple(x.shape), x)
            return x_new[:, start:stop]
        z = self.noise(rows, start, stop)
        if self.cached:
            self.count(x.shape[0], stop - self.committed)
            result = self.block.affine_range(self.cache, x, start, stop, cond, rows)
            mu, log_sigma = self._check("affine_range", result, (x.shape[0], stop - start, x.shape[2]), x)
            return affine_update(z, mu, log_sigma, self.update_dtype)
        self.count(x.shape[0], self.seq_len)
        mu, log_sigma = self._check("affine", self.block.affine(x, cond), tuple(x.shape), x)
        return affine_update(z, mu[:, start:stop], log_sigma[:, start:stop], self.update_dtype)

    def commit(self, x: Tensor, upto: int) -> None:
        """Declare `x[:, :upto]` final for every sample (feeds the block's cache)."""
        if self.cached and upto > self.committed:
            self.block.commit(self.cache, x, upto, self.cond)
            self.committed = upto

    def _check(self, method: str, outputs: Any, shape: tuple, x: Tensor) -> tuple[Tensor, ...]:
        """`outputs`, after checking (on the first call) that they are what `method` promises."""
        if self._checked:
            return outputs
        if method != "inverse_map" and (not isinstance(outputs, (tuple, list)) or len(outputs) != 2):
            raise TypeError(f"block.{method} must return a pair (mu, log_sigma); got "
                            f"{_describe(outputs)}")
        for out in outputs:
            if not isinstance(out, Tensor):
                raise TypeError(f"block.{method} must return tensors; got {type(out).__name__}")
            if tuple(out.shape) != tuple(shape):
                raise ValueError(
                    f"block.{method} returned shape {tuple(out.shape)}; expected {tuple(shape)} "
                    f"for an iterate of shape {tuple(x.shape)}"
                )
            if out.dtype != x.dtype:
                raise TypeError(
                    f"block.{method} returned dtype {out.dtype} for an iterate of dtype {x.dtype}"
                )
        self._checked = True
        return tuple(outputs)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return type(value).__name__


class CountedBlock:
    """A block as an initial guess sees it: the same members, network calls counted by a solve.

    Calls of `affine`, `inverse_map` and `affine_range` are recorded by the
    [`Evaluator`][arflow_solvers._evaluate.Evaluator] (a range call as `stop - start`
    positions); every other member is the block's own.
    """

    def __init__(self, evaluator: Evaluator):
        self._evaluator = evaluator

    def __getattr__(self, name: str) -> Any:
        member = getattr(self._evaluator.block, name)
        if name not in _NETWORK_CALLS or not callable(member):
            return member
        positions = _NETWORK_CALLS[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._evaluator.count(*positions(self._evaluator, *args))
            return member(*args, **kwargs)

        return counted


_NETWORK_CALLS = {
    "affine": lambda ev, x, *rest: (x.shape[0], ev.seq_len),
    "inverse_map": lambda ev, x, *rest: (x.shape[0], ev.seq_len),
    "affine_range": lambda ev, cache, x, start, stop, *rest: (x.shape[0], stop - start),
}
