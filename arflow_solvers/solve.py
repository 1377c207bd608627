"""The entry points: `solve` (a Solution with statistics) and `solve_inverse` (just x)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor

from .adjoint import AdjointStats, differentiable_solve, wants_gradients
from .density import block_log_det, standard_normal_log_prob, step_with_log_det
from .flow import Flow, is_ar_block
from .plan import PlanLike, as_plan
from ._evaluate import select_rows
from ._checks import check_block_input, check_noise
from .solution import BlockStats, Solution, SolveError, Status, finite_samples, merge_block_stats
from .stopping import StoppingRule, check_tolerance

__all__ = ["solve", "solve_inverse"]

BlockOrFlow = Union[Flow, Any]
LogProb = Union[bool, Callable[[Tensor], Tensor]]


def solve(
    block_or_flow: BlockOrFlow,
    z: Tensor,
    plan: PlanLike,
    *,
    cond: Any = None,
    throw: bool = True,
    max_batch: int | None = None,
    adjoint_tol: float = 0.0,
    log_prob: LogProb = False,
) -> Solution:
    """Invert an autoregressive block or a whole flow for noise `z`, with statistics.

    Each block is inverted by the solver the plan gives it; other steps of a
    [`Flow`][arflow_solvers.Flow] are applied as they are. Records no graph unless something
    it reads requires grad (see Gradients below).

    Arguments:
        block_or_flow: an [`AffineARBlock`][arflow_solvers.AffineARBlock] (or
            [`CausalMapBlock`][arflow_solvers.CausalMapBlock]), or a `Flow` of them.
        z: the noise, a floating tensor; `(B, T, D)` for a single block, whatever the flow's
            first step takes otherwise. Must be finite.
        plan: a [`Plan`][arflow_solvers.Plan], one solver for every block, or the paper's
            notation such as `"[6-8-32-10]"`.
        cond: conditioning passed to every block and step (class labels, context).
        throw: raise [`SolveError`][arflow_solvers.SolveError] (which carries the Solution
            and names the failed samples) if some samples are not usable; with `False` the
            Solution's `status` and `sample_status` say so instead, and samples whose noise
            is non-finite are marked `NONFINITE` while the others are solved.
        max_batch: solve at most this many samples at a time (chunks along the batch), which
            bounds peak memory by `max_batch x T x D` times a small constant; statistics are
            merged as if solved at once. Each chunk is solved independently, so results are
            the same whatever `max_batch` is, up to the rounding of the batch shapes.
        adjoint_tol: relative tolerance of the backward (adjoint) solves; `0` iterates each
            until it stops changing or reaches its exactness bound.
        log_prob: also compute the log-density of each sample (`Solution.log_prob` and
            `Solution.log_det`, see [`arflow_solvers.density`][arflow_solvers.density]): `True`
            for a standard normal base over all non-batch elements of `z`, or a function
            `z -> (B,)` giving the base log-density. Costs one more evaluation per block, at
            its solution; every step of a flow must then give its log-determinant.

    Gradients: when autograd is recording and `z`, a floating tensor of `cond` or a parameter
    of a block (`block.parameters()`) requires grad, the result is differentiable. Each block's
    solve is then an implicit function: its backward solves the adjoint fixed point by Jacobi
    on vector-Jacobian products of one evaluation at the solution (see
    [`arflow_solvers.adjoint`][arflow_solvers.adjoint]), whatever solver the plan uses; its
    statistics land in `Solution.adjoint` when backward runs. Other steps differentiate as
    ordinary torch code, and so does `log_prob`. Double backward is not supported. Otherwise
    the solve records no graph.

    Returns:
        A [`Solution`][arflow_solvers.Solution].

    Examples:
        >>> import torch
        >>> from arflow_solvers import Jacobi, solve
        >>> class Halver:  # x_t = z_t + x_{t-1} / 2
        ...     seq_len = 8
        ...     def affine(self, x, cond=None):
        ...         mu = 0.5 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        ...         return mu, torch.zeros_like(x)
        >>> sol = solve(Halver(), torch.ones(2, 8, 1), Jacobi(tol=0.0))
        >>> sol.status.name, sol.blocks[0].passes
        ('CONVERGED', 8)
    """
    flow = block_or_flow if isinstance(block_or_flow, Flow) else _single(block_or_flow)
    chosen = as_plan(plan, flow.num_blocks)
    check_tolerance("adjoint_tol", adjoint_tol)
    base = _base_log_prob(log_prob)
    check_noise(z, allow_nonfinite=not throw)
    if max_batch is not None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be None or an int >= 1; got {max_batch!r}")
        if z.shape[0] > max_batch:
            return _solve_in_chunks(flow, z, chosen, cond, throw, max_batch, adjoint_tol, log_prob)
    began = time.perf_counter()
    differentiable = wants_gradients(list(flow.blocks), z, cond)
    rule = StoppingRule(adjoint_tol, 0.0) if differentiable else None
    with torch.set_grad_enabled(differentiable):
        x, stats, adjoints, log_det = _run(flow, z, chosen, cond, rule, base is not None)
        density = None if base is None else _density(base, z, log_det)
    status = max((b.worst for b in stats), default=Status.CONVERGED)
    if not bool(finite_samples(x).all()):
        status = max(status, Status.NONFINITE)
    solution = Solution(x=x, status=status, blocks=tuple(stats), wall_time=time.perf_counter() - began,
                        adjoint=tuple(adjoints), log_prob=density, log_det=log_det)
    if throw and not status.usable:
        raise SolveError(status, solution)
    return solution


def _run(flow: Flow, z: Tensor, plan: Any, cond: Any, rule: StoppingRule | None,
         with_density: bool) -> tuple[Tensor, list[BlockStats], list[AdjointStats], Tensor | None]:
    """Every step in turn; a `rule` makes each block's solve differentiable (the adjoint's stopping rule)."""
    stats: list[BlockStats] = []
    adjoints: list[AdjointStats] = []
    log_det = z.new_zeros(z.shape[0]) if with_density else None
    x = z
    if z.shape[0] == 0:
        return x, stats, adjoints, log_det
    for position, step in enumerate(flow):
        if not is_ar_block(step):
            if log_det is None:
                x = step(x, cond)
            else:
                x, step_log_det = step_with_log_det(step, x, cond, position)
                log_det = log_det + step_log_det
            continue
        index, noise = len(stats), x
        check_block_input(step, x, index)
        solver = plan.solver_for(index)
        block_log_det_at_x = None
        if rule is not None:
            x, block_log_det_at_x, block_stats, adjoint = differentiable_solve(
                solver, step, noise, cond, index, rule, with_log_det=log_det is not None)
            adjoints.append(adjoint)
        else:
            x, block_stats = solver.solve(step, noise, cond, index)
        stats.append(block_stats)
        if log_det is not None:
            if block_log_det_at_x is None:
                block_log_det_at_x = block_log_det(step, x, noise, cond, index)
            log_det = log_det + block_log_det_at_x
    return x, stats, adjoints, log_det


def _base_log_prob(log_prob: LogProb) -> Callable[[Tensor], Tensor] | None:
    if log_prob is False:
        return None
    if log_prob is True:
        return standard_normal_log_prob
    if not callable(log_prob):
        raise TypeError(f"log_prob must be a bool or a function z -> (B,) log-density; got {log_prob!r}")
    return log_prob


def _density(base: Callable[[Tensor], Tensor], z: Tensor, log_det: Tensor) -> Tensor:
    base_log_prob = base(z)
    if not isinstance(base_log_prob, Tensor) or base_log_prob.shape != log_det.shape:
        raise ValueError(f"log_prob's base density must return shape {tuple(log_det.shape)} for z of shape "
                         f"{tuple(z.shape)}; got {tuple(getattr(base_log_prob, 'shape', ()))}")
    return base_log_prob - log_det


def solve_inverse(
    block_or_flow: BlockOrFlow,
    z: Tensor,
    plan: PlanLike,
    *,
    cond: Any = None,
    max_batch: int | None = None,
    adjoint_tol: float = 0.0,
) -> Tensor:
    """The one-liner: `solve(block_or_flow, z, plan, cond=cond, max_batch=max_batch).x`.

    Raises [`SolveError`][arflow_solvers.SolveError] instead of returning non-finite samples.
    Differentiable like [`solve`][arflow_solvers.solve] when something it reads requires grad.

    Examples:
        >>> import torch
        >>> from arflow_solvers import GSJacobi, solve_inverse
        >>> class Halver:
        ...     seq_len = 4
        ...     def affine(self, x, cond=None):
        ...         mu = 0.5 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        ...         return mu, torch.zeros_like(x)
        >>> solve_inverse(Halver(), torch.ones(1, 4, 1), GSJacobi(2, tol=0.0)).flatten().tolist()
        [1.0, 1.5, 1.75, 1.875]
    """
    return solve(block_or_flow, z, plan, cond=cond, throw=True, max_batch=max_batch, adjoint_tol=adjoint_tol).x


def _solve_in_chunks(flow: Flow, z: Tensor, plan: Any, cond: Any, throw: bool, max_batch: int,
                     adjoint_tol: float, log_prob: LogProb) -> Solution:
    began = time.perf_counter()
    parts = []
    for start in range(0, z.shape[0], max_batch):
        rows = torch.arange(start, min(start + max_batch, z.shape[0]), device=z.device)
        parts.append(solve(flow, z[rows], plan, cond=select_rows(cond, rows, z.shape[0]), throw=False,
                           adjoint_tol=adjoint_tol, log_prob=log_prob))
    blocks = tuple(merge_block_stats([p.blocks[i] for p in parts]) for i in range(len(parts[0].blocks)))
    solution = Solution(
        x=torch.cat([p.x for p in parts]),
        status=max(p.status for p in parts),
        blocks=blocks,
        wall_time=time.perf_counter() - began,
        adjoint=tuple(a for p in parts for a in p.adjoint),
        log_prob=_cat([p.log_prob for p in parts]),
        log_det=_cat([p.log_det for p in parts]),
    )
    if throw and not solution.status.usable:
        raise SolveError(solution.status, solution)
    return solution


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]


def _single(block: Any) -> Flow:
    if not is_ar_block(block):
        raise TypeError(
            "block_or_flow must be a Flow or a block with `seq_len` and `affine(x, cond)` "
            f"(AffineARBlock) or `inverse_map(x, z, cond)` (CausalMapBlock); got "
            f"{type(block).__name__}"
        )
    return Flow([block])
