"""The glue of a wrapped flow: library layout `(B, F)` between library steps, each block's order inside.

A masked block solves in the autoregressive order its masks imply, on the core's
`(B, T, 1)`; the library's other transforms work on `(B, F)` in the library's feature order.
[`sampling_steps`][arflow_solvers.adapters._masked.steps.sampling_steps] puts the
conversions between them and merges consecutive permutations (two blocks in reversed orders
meet without any copy). [`run_stages`][arflow_solvers.adapters._masked.steps.run_stages]
runs the same blocks and steps one by one and keeps each one's log-determinant, for the
adapters that mirror a library's `log_prob` or `sample`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import time

import torch
from torch import Tensor

from arflow_solvers.flow import Permute, is_ar_block
from arflow_solvers.plan import as_plan
from arflow_solvers.solution import Solution, SolveError, Status

__all__ = ["ToFeatures", "ToSequence", "run_stages", "sampling_steps"]


def _identity(order: Tensor) -> bool:
    return bool(torch.equal(order, torch.arange(len(order), device=order.device)))


class ToSequence:
    """`(B, F)` (or `(B, F, 1)`) in library order to the core's `(B, F, 1)` in a block's order."""

    def __init__(self, order: Tensor):
        self.order = order
        self.__name__ = "to_sequence" if _identity(order) else "to_sequence(permuted)"

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        features = len(self.order)
        if x.dim() == 3 and x.shape[1:] == (features, 1):
            x = x.squeeze(-1)
        if x.dim() != 2 or x.shape[1] != features:
            raise ValueError(f"expected noise of shape (B, {features}) or (B, {features}, 1); got {tuple(x.shape)}")
        x = x if _identity(self.order) else x.index_select(1, self.order.to(x.device))
        return x.unsqueeze(-1)

    def with_log_det(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """The reordered `x` and a zero log-determinant."""
        return self(x, cond), x.new_zeros(x.shape[0])


class ToFeatures:
    """The core's `(B, F, 1)` in a block's order back to `(B, F)` in library order."""

    def __init__(self, order: Tensor):
        self.position = torch.argsort(order)
        self.__name__ = "to_features" if _identity(order) else "to_features(permuted)"

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        if x.dim() == 2:
            return x
        x = x.squeeze(-1)
        return x if _identity(self.position) else x.index_select(1, self.position.to(x.device))

    def with_log_det(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """The reordered `x` and a zero log-determinant."""
        return self(x, cond), x.new_zeros(x.shape[0])


def sampling_steps(items: Sequence[Any], features: int) -> list[Callable]:
    """Steps in sampling order: each block (with `.order`) between conversions, library steps as they are.

    The flow built from them takes `(B, F)` (or `(B, F, 1)`) noise and returns `(B, F)`.

    Arguments:
        items: blocks and library steps (callables `step(x, cond)` on `(B, F)`), in sampling order.
        features: `F`.

    Examples:
        >>> import torch
        >>> class Block:  # a stand-in with the reversed order
        ...     seq_len, order = 3, torch.tensor([2, 1, 0])
        ...     def inverse_map(self, x, z, cond=None): return z
        >>> [getattr(s, "__name__", type(s).__name__) for s in sampling_steps([Block(), Block()], 3)]
        ['to_sequence(permuted)', 'Block', 'Block', 'to_features(permuted)']
    """
    steps: list[Callable] = []
    current: Tensor | None = None  # the order of the (B, F, 1) layout, or None: library (B, F)
    for item in items:
        if is_ar_block(item):
            order = item.order
            if current is None:
                steps.append(ToSequence(order))
            else:
                step = torch.argsort(current)[order]
                if not _identity(step):
                    steps.append(Permute(step))
            current = order
        elif current is not None:
            steps.append(ToFeatures(current))
            current = None
        elif not steps:
            steps.append(ToFeatures(torch.arange(features)))  # accept (B, F, 1) noise too
        steps.append(item)
    if current is not None:
        steps.append(ToFeatures(current))
    return steps


def run_stages(stages: Sequence[Any], x: Tensor, plan: Any, cond: Any = None,
               throw: bool = True) -> tuple[Tensor, list[Tensor], Solution]:
    """Apply blocks and steps in turn to `(B, F)` `x`, solving each block by `plan`; keep the log-determinants.

    A step has `with_log_det(x, cond) -> (x, log_det)`; a block (numbered in the order met)
    is solved in its own order and then gives `inverse_and_log_det(x, z, cond)` at its fixed
    point, in library order. Runs under `torch.no_grad()`.

    Returns:
        The output, one log-determinant per stage (as the stage gives it), and a
        [`Solution`][arflow_solvers.Solution] with one `BlockStats` per block.

    Raises:
        SolveError: `throw` and some sample is not finite.
    """
    began = time.perf_counter()
    chosen = as_plan(plan, sum(is_ar_block(stage) for stage in stages))
    log_dets, stats = [], []
    with torch.no_grad():
        for stage in stages:
            if not is_ar_block(stage):
                x, log_det = stage.with_log_det(x, cond)
            else:
                index, order = len(stats), stage.order.to(x.device)
                solved, block_stats = chosen.solver_for(index).solve(stage, x.index_select(1, order).unsqueeze(-1),
                                                                     cond, index)
                stats.append(block_stats)
                solved = solved.squeeze(-1).index_select(1, torch.argsort(order))
                x, log_det = stage.snapshot().inverse_and_log_det(solved, x, cond)
            log_dets.append(log_det)
    status = max((b.worst for b in stats), default=Status.CONVERGED)
    if not bool(torch.isfinite(x).all()):
        status = max(status, Status.NONFINITE)
    solution = Solution(x=x, status=status, blocks=tuple(stats), wall_time=time.perf_counter() - began)
    if throw and not status.usable:
        raise SolveError(status, solution)
    return x, log_dets, solution
