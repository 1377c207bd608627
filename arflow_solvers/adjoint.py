r"""Gradients through a solve: the implicit adjoint of one block's fixed point.

A block's sample is the fixed point $x^* = F(x^*; z, \theta)$ of its update
$F(x) = e^{\log\sigma(x)} z + \mu(x)$ (or its own `inverse_map`). Differentiating
$x^* - F(x^*) = 0$ gives, for a loss gradient $g = \partial L / \partial x^*$,

$$\lambda = g + (\partial F / \partial x)^\top \lambda, \qquad
\partial L / \partial(z, \theta) = \lambda^\top \partial F / \partial(z, \theta).$$

$\partial F / \partial x$ is strictly lower triangular in the block's positions, so Jacobi on
vector-Jacobian products reaches $\lambda$ exactly in at most $T$ iterations (row $t$ of
$\lambda$ is final after $T - t$), usually after a few. Memory: one evaluation's graph at
$x^*$, whatever $T$ and the number of iterations.

References:
    Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
    https://arxiv.org/abs/2505.12849
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._evaluate import affine_update
from .solvers import Solver
from .stopping import StoppingRule

__all__ = ["AdjointStats", "AdjointError", "differentiable_solve", "wants_gradients", "parameters_of"]


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


class _BlockSolve(torch.autograd.Function):
    """Forward: the plan's solver, no graph. Backward: the adjoint fixed point, then one VJP."""

    @staticmethod
    def forward(ctx: Any, solver: Solver, block: Any, cond: Any, index: int, record: dict,
                rule: StoppingRule, z: Tensor, *inputs: Tensor) -> Tensor:
        with torch.no_grad():
            x, stats = solver.solve(block, z, cond, index)
        record["stats"] = stats
        ctx.block, ctx.cond, ctx.rule, ctx.adjoint = block, cond, rule, record["adjoint"]
        ctx.count = len(inputs)
        ctx.save_for_backward(x, z, *inputs)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        if torch.is_grad_enabled():  # backward(create_graph=True)
            raise RuntimeError("cannot differentiate twice through a solve: its backward is an implicit "
                               "adjoint solve, differentiable once; call backward without create_graph")
        x, z, *inputs = ctx.saved_tensors
        n_cond = len(_tensors(ctx.cond))
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            z_in = z.detach().requires_grad_(ctx.needs_input_grad[6])
            cond_in = [t.detach().requires_grad_(needs) for t, needs in
                       zip(inputs[:n_cond], ctx.needs_input_grad[7:7 + n_cond])]
            out = update(ctx.block, x, z_in, _replace(ctx.cond, list(cond_in)))
        lam = _adjoint(out, x, grad, ctx.rule, ctx.adjoint)
        wanted = [z_in, *cond_in, *inputs[n_cond:]]
        targets = [t for t in wanted if t.requires_grad]
        found = iter(torch.autograd.grad(out, targets, lam, allow_unused=True)) if targets else iter(())
        grads = [next(found) if t.requires_grad else None for t in wanted]
        return (None, None, None, None, None, None, *grads)


def _adjoint(out: Tensor, x: Tensor, grad: Tensor, rule: StoppingRule, stats: AdjointStats) -> Tensor:
    """`lambda = grad + (dF/dx)^T lambda` by Jacobi, to the rule or the exactness bound `T`."""
    lam = grad
    iterations = 0
    for iterations in range(1, x.shape[1] + 1):
        (pulled,) = torch.autograd.grad(out, x, lam, retain_graph=True, allow_unused=True)
        new = grad if pulled is None else grad + pulled
        change = float((new - lam).abs().max()) if new.numel() else 0.0
        stats.history.append(change)
        if not torch.isfinite(new).all():
            raise AdjointError(f"the adjoint of block {stats.index} became non-finite at iteration "
                               f"{iterations}: its gradient would be NaN (the block overflows near x*?)")
        lam = new
        if change <= rule.atol + rule.rtol * float(lam.abs().max()):
            break
    stats.iterations, stats.residual = iterations, stats.history[-1] if stats.history else 0.0
    return lam


def differentiable_solve(solver: Solver, block: Any, z: Tensor, cond: Any, index: int,
                         rule: StoppingRule) -> tuple[Tensor, Any, AdjointStats]:
    """`solver.solve(block, z, cond)` whose result differentiates w.r.t. `z`, `cond` and parameters."""
    record: dict[str, Any] = {"adjoint": AdjointStats(index)}
    inputs = [*_tensors(cond), *parameters_of(block)]
    x = _BlockSolve.apply(solver, block, cond, index, record, rule, z, *inputs)
    return x, record["stats"], record["adjoint"]
