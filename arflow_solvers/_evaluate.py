"""One solve's view of a block: evaluates update rows for a subset of samples and counts the cost."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Evaluator", "select_rows", "affine_update"]


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


class Evaluator:
    """Evaluates rows `[start, stop)` of the inverse update for some samples of one block.

    Uses the block's KV cache (`affine_range` / `commit`) when it has one, its own
    `inverse_map` when it has one, and a full `affine` pass otherwise. Counts network calls
    (`passes`) and full-pass equivalents (`work`).
    """

    def __init__(self, block: Any, z: Tensor, cond: Any, update_dtype: torch.dtype | None):
        self.block = block
        self.z = z
        self.cond = cond
        self.update_dtype = update_dtype
        self.batch_size, self.seq_len = z.shape[0], z.shape[1]
        self.finite = torch.isfinite(z.flatten(1)).all(1)
        self.has_map = callable(getattr(block, "inverse_map", None))
        self.cached = not self.has_map and callable(getattr(block, "affine_range", None))
        self.cache = block.init_cache(z, cond) if self.cached else None
        self.committed = 0
        self.passes = 0
        self.work = 0.0
        self._checked = False

    def update(self, x: Tensor, rows: Tensor | None, start: int, stop: int) -> Tensor:
        """New values of rows `[start, stop)` for samples `rows` (`None`: all).

        `x` holds those samples' iterates, `(b, T, D)`; returns `(b, stop - start, D)`.
        """
        cond = select_rows(self.cond, rows, self.batch_size)
        self.passes += 1
        if self.has_map:
            self.work += x.shape[0] / self.batch_size
            z = self.z if rows is None else self.z[rows]
            x_new = self.block.inverse_map(x, z, cond)
            self._check("inverse_map", (x_new,), tuple(x.shape), x)
            return x_new[:, start:stop]
        # Only rows [start, stop) of the noise are needed: gather just those.
        z = self.z[:, start:stop] if rows is None else self.z[rows, start:stop]
        if self.cached:
            mu, log_sigma = self.block.affine_range(self.cache, x, start, stop, cond, rows)
            self._check("affine_range", (mu, log_sigma), (x.shape[0], stop - start, x.shape[2]), x)
            self.work += x.shape[0] * (stop - self.committed) / (self.batch_size * self.seq_len)
            return affine_update(z, mu, log_sigma, self.update_dtype)
        self.work += x.shape[0] / self.batch_size
        mu, log_sigma = self.block.affine(x, cond)
        self._check("affine", (mu, log_sigma), tuple(x.shape), x)
        return affine_update(z, mu[:, start:stop], log_sigma[:, start:stop], self.update_dtype)

    def commit(self, x: Tensor, upto: int) -> None:
        """Declare `x[:, :upto]` final for every sample (feeds the block's cache)."""
        if self.cached and upto > self.committed:
            self.block.commit(self.cache, x, upto, self.cond)
            self.committed = upto

    def _check(self, method: str, outputs: tuple[Tensor, ...], shape: tuple, x: Tensor) -> None:
        if self._checked:
            return
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
