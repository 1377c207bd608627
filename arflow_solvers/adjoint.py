r"""Gradients through a solve: the implicit adjoint of one block's fixed point.

A block's sample is the fixed point $x^* = F(x^*; z, \theta)$ of its update
$F(x) = e^{\log\sigma(x)} z + \mu(x)$ (or its own `inverse_map`). Differentiating
$x^* - F(x^*) = 0$ gives, for a loss gradient $g = \partial L / \partial x^*$,

$$\lambda = g + (\partial F / \partial x)^\top \lambda, \qquad
\partial L / \partial(z, \theta) = \lambda^\top \partial F / \partial(z, \theta).$$

$\partial F / \partial x$ is strictly lower triangular in the block's positions, so Jacobi on
vector-Jacobian products reaches $\lambda$ exactly in at most $T$ iterations (row $t$ of
$\lambda$ is final after $T - t$), usually after a few. Where the plan segments a block, the
adjoint is solved on the same segments, last first (each exact after its length). Memory: one evaluation's graph at
$x^*$, whatever $T$ and the number of iterations.

References:
    Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
    https://arxiv.org/abs/2505.12849
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ._evaluate import affine_update
from .density import checked_log_det, block_log_det
from .solvers import Serial, Solver
from .stopping import StoppingRule

__all__ = ["AdjointStats", "AdjointError", "AutogradLinearisation", "Linearisation", "adjoint_segments",
           "differentiable_solve", "linearise", "parameters_of", "wants_gradients"]


class AdjointError(RuntimeError):
    """The adjoint of a block became non-finite: its gradient would be NaN."""


@dataclass
class AdjointStats:
    """The backward solve of one block, filled in when autograd runs it.

    Attributes:
        index: the block's number in sampling order.
        iterations: Jacobi iterations on vector-Jacobian products (`None` until backward ran).
        residual: the last max-abs change of the adjoint.
    """

    index: int
    iterations: int | None = None
    residual: float | None = None
    history: list[float] = field(default_factory=list)


def parameters_of(block: Any) -> list[Tensor]:
    """The block's parameters that require grad (`block.parameters()`, as an `nn.Module` has)."""
    parameters = getattr(block, "parameters", None)
    if not callable(parameters):
        return []
    return [p for p in parameters() if isinstance(p, Tensor) and p.requires_grad]


def _tensors(cond: Any) -> list[Tensor]:
    """Floating tensors inside `cond` (nested tuples, lists and dicts), in a fixed order."""
    if isinstance(cond, Tensor):
        return [cond] if cond.is_floating_point() else []
    if isinstance(cond, (tuple, list)):
        return [t for item in cond for t in _tensors(item)]
    if isinstance(cond, dict):
        return [t for key in sorted(cond, key=str) for t in _tensors(cond[key])]
    return []


def _replace(cond: Any, new: list[Tensor]) -> Any:
    """`cond` with its floating tensors replaced, in `_tensors` order, by `new` (consumed)."""
    if isinstance(cond, Tensor):
        return new.pop(0) if cond.is_floating_point() else cond
    if isinstance(cond, (tuple, list)):
        return type(cond)(_replace(item, new) for item in cond)
    if isinstance(cond, dict):
        return {key: _replace(cond[key], new) for key in sorted(cond, key=str)}
    return cond


def wants_gradients(flow_blocks: list[Any], z: Tensor, cond: Any) -> bool:
    """Whether autograd is recording and something a solve reads requires grad."""
    if not torch.is_grad_enabled():
        return False
    if z.requires_grad or any(t.requires_grad for t in _tensors(cond)):
        return True
    return any(parameters_of(block) for block in flow_blocks)


def update(block: Any, x: Tensor, z: Tensor, cond: Any) -> Tensor:
    """`F(x)`: every row of the block's inverse update, through the block's own differentiable calls."""
    if callable(getattr(block, "inverse_map", None)):
        return block.inverse_map(x, z, cond)
    mu, log_sigma = block.affine(x, cond)
    return affine_update(z, mu, log_sigma, None)


def update_and_log_det(block: Any, x: Tensor, z: Tensor, cond: Any, index: int) -> tuple[Tensor, Tensor]:
    """`F(x)` and the block's `(B,)` log-determinant at `x`, from one evaluation where the block allows.

    One evaluation: a block's `inverse_map_and_log_det`, or an affine block's `affine`
    (whose `log_sigma` sums to the log-determinant); otherwise `update` and `block_log_det`.
    """
    both = getattr(block, "inverse_map_and_log_det", None)
    if callable(both):
        out, log_det = both(x, z, cond)
        return out, checked_log_det(log_det, x.shape[0], f"block {index} ({type(block).__name__}).inverse_map_and_log_det")
    if not callable(getattr(block, "inverse_map", None)) and not callable(getattr(block, "log_det", None)):
        mu, log_sigma = block.affine(x, cond)
        return affine_update(z, mu, log_sigma, None), log_sigma.flatten(1).sum(1)
    return update(block, x, z, cond), block_log_det(block, x, z, cond, index)


class Linearisation(Protocol):
    r"""A block's update linearised at its solution: what the adjoint needs of it.

    The default ([`AutogradLinearisation`][arflow_solvers.adjoint.AutogradLinearisation]) is
    the autograd graph of one evaluation. A block may give its own, cheaper one through
    `linearise(x, z, cond, with_log_det)` (for instance one that reads the partial
    derivatives of an elementwise tail once instead of differentiating it every iteration),
    called with grad enabled on leaves; returning `None` means the default.

    Attributes:
        log_det: the `(B,)` log-determinant at `x` (when asked for), detached, else `None`.
    """

    log_det: Tensor | None

    def pull_x(self, lam: Tensor, g_log_det: Tensor | None) -> Tensor | None:
        r"""$(\partial F/\partial x)^\top \lambda + (\partial \log\det/\partial x)^\top g$ (`None`: zero)."""
        ...

    def pull(self, lam: Tensor, g_log_det: Tensor | None, targets: list[Tensor]) -> list[Tensor | None]:
        """The same pull onto `targets`: the leaves `z`, `cond` tensors and parameters given to `linearise`."""
        ...


class AutogradLinearisation:
    """The default linearisation: the graph of `F(x)` (and the log-determinant) at the leaf `x`."""

    def __init__(self, x: Tensor, out: Tensor, log_det: Tensor | None):
        self.x, self.out, self._log_det = x, out, log_det
        self.log_det = None if log_det is None else log_det.detach()

    def _roots(self, lam: Tensor, g_log_det: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
        if self._log_det is None or g_log_det is None:
            return [self.out], [lam]
        return [self.out, self._log_det], [lam, g_log_det]

    def pull_x(self, lam: Tensor, g_log_det: Tensor | None) -> Tensor | None:
        roots, seeds = self._roots(lam, g_log_det)
        return torch.autograd.grad(roots, self.x, seeds, retain_graph=True, allow_unused=True)[0]

    def pull(self, lam: Tensor, g_log_det: Tensor | None, targets: list[Tensor]) -> list[Tensor | None]:
        roots, seeds = self._roots(lam, g_log_det)
        return list(torch.autograd.grad(roots, targets, seeds, allow_unused=True))


def linearise(block: Any, x: Tensor, z: Tensor, cond: Any, index: int, with_log_det: bool) -> Linearisation:
    """The block's linearisation at the leaf `x`: its own `linearise` if it has one, else autograd's."""
    own = getattr(block, "linearise", None)
    at = own(x, z, cond, with_log_det) if callable(own) else None
    if at is not None:
        return at
    if with_log_det:
        return AutogradLinearisation(x, *update_and_log_det(block, x, z, cond, index))
    return AutogradLinearisation(x, update(block, x, z, cond), None)


@dataclass
class _Leaves:
    """The inputs of one block's linearisation, as fresh leaves, and the linearisation."""

    z: Tensor
    cond: list[Tensor]
    params: tuple[Tensor, ...]
    at: Linearisation


def _linearise(ctx: Any, x: Tensor, z: Tensor, inputs: tuple[Tensor, ...], with_log_det: bool) -> _Leaves:
    """The block linearised at `x`, with a graph to `z`, the `cond` tensors and the parameters."""
    n_cond = len(_tensors(ctx.cond))
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        z_in = z.detach().requires_grad_(ctx.needs_input_grad[_FIRST_INPUT])
        cond_in = [t.detach().requires_grad_(needs) for t, needs in
                   zip(inputs[:n_cond], ctx.needs_input_grad[_FIRST_INPUT + 1:_FIRST_INPUT + 1 + n_cond])]
        at = linearise(ctx.block, x, z_in, _replace(ctx.cond, list(cond_in)), ctx.adjoint.index, with_log_det)
    return _Leaves(z_in, cond_in, tuple(inputs[n_cond:]), at)


_FIRST_INPUT = 7  # the position of `z` among _BlockSolve.forward's arguments after ctx


class _BlockSolve(torch.autograd.Function):
    """Forward: the plan's solver, no graph. Backward: the adjoint fixed point, then one VJP.

    With `with_log_det` the forward also returns the block's log-determinant at the solution:
    the one evaluation it needs is made there, with a graph, and the backward reuses it.
    """

    @staticmethod
    def forward(ctx: Any, solver: Solver, block: Any, cond: Any, index: int, record: dict,
                rule: StoppingRule, with_log_det: bool, z: Tensor, *inputs: Tensor) -> Any:
        with torch.no_grad():
            x, stats = solver.solve(block, z, cond, index)
        record["stats"] = stats
        ctx.block, ctx.cond, ctx.rule, ctx.adjoint = block, cond, rule, record["adjoint"]
        ctx.bounds = adjoint_segments(solver, stats.bounds, z.shape[1])
        if with_log_det:
            ctx.leaves = _linearise(ctx, x, z, inputs, True)
            return x, ctx.leaves.at.log_det
        ctx.leaves = None
        ctx.save_for_backward(x, z, *inputs)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_log_det: Tensor | None = None) -> tuple:
        if torch.is_grad_enabled():  # backward(create_graph=True)
            raise RuntimeError("cannot differentiate twice through a solve: its backward is an implicit "
                               "adjoint solve, differentiable once; call backward without create_graph")
        leaves = ctx.leaves
        if leaves is None:
            x, z, *inputs = ctx.saved_tensors
            leaves = _linearise(ctx, x, z, tuple(inputs), False)
        ctx.leaves = None  # the graph is freed as soon as it has served
        lam = _adjoint(leaves.at, grad, grad_log_det, ctx.bounds, ctx.rule, ctx.adjoint)
        wanted = [leaves.z, *leaves.cond, *leaves.params]
        targets = [t for t in wanted if t.requires_grad]
        found = iter(leaves.at.pull(lam, grad_log_det, targets) if targets else ())
        grads = [next(found) if t.requires_grad else None for t in wanted]
        return (None, None, None, None, None, None, None, *grads)


def adjoint_segments(solver: Solver, bounds: tuple[tuple[int, int], ...], seq_len: int) -> tuple[tuple[int, int], ...]:
    """The segments the adjoint is solved on: the forward's, except for `Serial` (one segment).

    A plan segments a block (`GSJacobi`) where Jacobi over the whole block converges too
    slowly; the adjoint shares the block's Jacobian, so it is solved on the same segments.
    `Serial`'s one-position segments serve its KV cache, which a backward pass cannot use:
    there the whole block is one segment, exact at the same bound `T`.
    """
    return ((0, seq_len),) if isinstance(solver, Serial) else tuple(bounds)


def _adjoint(at: Linearisation, grad: Tensor, g_log_det: Tensor | None, bounds: tuple[tuple[int, int], ...],
             rule: StoppingRule, stats: AdjointStats) -> Tensor:
    r"""`lambda = grad + (dF/dx)^T lambda (+ (d log_det/dx)^T g)`, segment by segment, last segment first.

    Row `t` of $(\partial F/\partial x)^\top \lambda$ reads only rows after `t`, so once the
    later segments are final, Jacobi on a segment of `n` rows is exact after `n` iterations
    (Gauss-Seidel across segments, in reverse); each segment stops by the rule or that bound.
    A log-determinant that reads `x` adds its constant pull to every iteration, in the same pull.
    """
    whole = len(bounds) == 1  # then each iterate replaces the last, without a copy
    lam = grad if whole else grad.clone()
    iterations = 0
    for start, stop in reversed(bounds):
        for _ in range(stop - start):
            iterations += 1
            pulled = at.pull_x(lam, g_log_det)
            new = grad[:, start:stop] if pulled is None else grad[:, start:stop] + pulled[:, start:stop]
            change = float((new - lam[:, start:stop]).abs().max()) if new.numel() else 0.0  # NaN or inf: so is new
            stats.history.append(change)
            if not math.isfinite(change):
                raise AdjointError(f"the adjoint of block {stats.index} became non-finite at iteration "
                                   f"{iterations}: its gradient would be NaN (the block overflows near x*?)")
            if whole:
                lam = new
            else:
                lam[:, start:stop] = new
            if change <= rule.atol + rule.rtol * float(lam.abs().max()):
                break
    stats.iterations, stats.residual = iterations, stats.history[-1] if stats.history else 0.0
    return lam


def differentiable_solve(solver: Solver, block: Any, z: Tensor, cond: Any, index: int, rule: StoppingRule,
                         with_log_det: bool = False) -> tuple[Tensor, Tensor | None, Any, AdjointStats]:
    """`solver.solve(block, z, cond)` whose result differentiates w.r.t. `z`, `cond` and parameters.

    Returns `(x, log_det, stats, adjoint_stats)`; `log_det` (the block's `(B,)`
    log-determinant at `x`, differentiable too) is `None` unless `with_log_det`.
    """
    record: dict[str, Any] = {"adjoint": AdjointStats(index)}
    inputs = [*_tensors(cond), *parameters_of(block)]
    out = _BlockSolve.apply(solver, block, cond, index, record, rule, with_log_det, z, *inputs)
    x, log_det = out if with_log_det else (out, None)
    return x, log_det, record["stats"], record["adjoint"]
