"""How hard a block is to invert: IGM, CRM and measured iterations to tolerance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from ._progress import progress

from . import init as inits
from ._checks import check_block_input, check_noise
from ._evaluate import affine_update
from .flow import Flow, is_ar_block
from .solvers import GSJacobi, Serial, Solver

__all__ = ["matrix_norm", "igm", "crm", "iterations_to_tolerance", "trace", "BlockTrace",
           "BlockMetrics", "flow_metrics", "max_abs_error"]

Norm = Literal["spectral", "frobenius", "max"]


def matrix_norm(a: Tensor, norm: Norm = "spectral") -> Tensor:
    """Norm of each `(T, D)` matrix in a `(B, T, D)` batch (or of one 2-d matrix).

    `spectral` is the largest singular value (the paper's choice), `frobenius` the
    root-sum-of-squares, `max` the largest absolute entry.
    """
    if norm == "spectral":
        # a matrix with a non-finite entry has norm inf (the SVD would raise instead)
        finite = torch.isfinite(a).all(dim=-1).all(dim=-1)
        if not bool(finite.all()):
            value = torch.linalg.matrix_norm(torch.where(finite[..., None, None], a, 0).double(), ord=2)
            return torch.where(finite, value, torch.inf).to(a.dtype)
        return torch.linalg.matrix_norm(a.double(), ord=2).to(a.dtype)
    if norm == "frobenius":
        return torch.linalg.matrix_norm(a, ord="fro")
    if norm == "max":
        return a.abs().amax(dim=(-2, -1))
    raise ValueError(f"norm must be 'spectral', 'frobenius' or 'max'; got {norm!r}")


def igm(block: Any, z: Tensor, x_star: Tensor, init: inits.Init = inits.noise,
        cond: Any = None, norm: Norm = "spectral") -> float:
    r"""Initial guessing metric: $\|\Sigma(X_0) Z + M(X_0) - X^*\|$, averaged over the batch.

    How far one Jacobi iteration from the initial guess `X0 = init(block, z, cond)` lands
    from the answer `x_star`; the smaller, the better the guess.

    Arguments:
        block: an `AffineARBlock`.
        z: `(B, T, D)` noise.
        x_star: `(B, T, D)` the serial answer for `z`.
        init: the initial guess to score.
        cond: the block's conditioning.
        norm: `spectral` (the paper's), `frobenius` or `max`, per `(T, D)` sample.

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Examples:
        >>> import torch
        >>> class Shift:
        ...     seq_len = 3
        ...     def affine(self, x, cond=None):
        ...         return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1), torch.zeros_like(x)
        >>> z = torch.ones(1, 3, 1); x_star = torch.tensor([[[1.0], [2.0], [3.0]]])
        >>> igm(Shift(), z, x_star, norm="max")  # one step from X0 = Z gives [1, 2, 2]
        1.0
    """
    with torch.no_grad():
        x0 = init(block, z, cond)
        mu, log_sigma = block.affine(x0, cond)
        return matrix_norm(affine_update(z, mu, log_sigma, None) - x_star, norm).mean().item()


def crm(block: Any, x: Tensor, cond: Any = None, norm: Norm = "spectral") -> float:
    r"""Convergence ranking metric: $\|\Sigma^{-1} X\| \|W_s\| + \|W_u\|$, batch mean.

    `x` is the block's answer (its input in the density direction), `Sigma` its scale at
    `x`, and `W_s`, `W_u` the output-projection weights producing `log_sigma` and `mu`
    (the block must implement [`HasOutputProjection`][arflow_solvers.HasOutputProjection]).
    A block whose CRM dominates the others is slow to converge by Jacobi ("tough").

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849
    """
    projection = getattr(block, "output_projection", None)
    if not callable(projection):
        raise TypeError(
            f"crm needs a block with output_projection() (HasOutputProjection); "
            f"{type(block).__name__} has none"
        )
    with torch.no_grad():
        w_mu, w_log_sigma = projection()
        _, log_sigma = block.affine(x, cond)
        scaled = matrix_norm(torch.exp(-log_sigma) * x, norm).mean()
        weights = matrix_norm(w_log_sigma.detach(), "spectral"), matrix_norm(w_mu.detach(), "spectral")
        return (scaled * weights[0].to(scaled) + weights[1].to(scaled)).item()


def iterations_to_tolerance(block: Any, z: Tensor, tol: float = 1e-5, segments: int = 1,
                            cond: Any = None, init: inits.Init = inits.noise) -> Tensor:
    """`(B,)` Jacobi iterations each sample needs to meet `tol`, summed over `segments`."""
    _, stats = GSJacobi(segments, tol=tol, init=init).solve(block, z, cond)
    return stats.iterations.sum(1)


@dataclass(frozen=True)
class BlockTrace:
    """One block's problem during a solve: its noise `z`, its answer `x` and its conditioning."""

    index: int
    block: Any
    z: Tensor
    x: Tensor
    cond: Any


def trace(flow: Flow | Any, z: Tensor, cond: Any = None, solver: Solver = Serial()) -> list[BlockTrace]:
    """Solve the flow with `solver` and keep every block's `(z, x)` pair, in sampling order."""
    flow = flow if isinstance(flow, Flow) else Flow([flow])
    check_noise(z)
    if z.shape[0] == 0:
        raise ValueError("z is an empty batch; metrics and planners need at least one sample")
    traces = []
    x = z
    with torch.no_grad():
        for step in flow:
            if is_ar_block(step):
                check_block_input(step, x, len(traces))
                z_block = x
                x, _ = solver.solve(step, z_block, cond, len(traces))
                traces.append(BlockTrace(len(traces), step, z_block, x, cond))
            else:
                x = step(x, cond)
    return traces


@dataclass(frozen=True)
class BlockMetrics:
    """IGM of both paper guesses, CRM (if available) and iterations to tolerance of one block."""

    index: int
    igm_noise: float
    igm_zeros_first_exact: float
    crm: float | None
    iterations_mean: float
    iterations_max: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flow_metrics(flow: Flow | Any, z: Tensor, cond: Any = None, tol: float = 1e-5,
                 norm: Norm = "spectral", traces: Sequence[BlockTrace] | None = None,
                 show_progress: bool = False) -> list[BlockMetrics]:
    """Every block's metrics on a calibration batch `z` (a table row per block)."""
    traces = trace(flow, z, cond) if traces is None else traces
    rows = []
    for t in progress(traces, show_progress, desc="metrics", unit="block"):
        affine = callable(getattr(t.block, "affine", None))
        iterations = iterations_to_tolerance(t.block, t.z, tol, cond=t.cond).double()
        rows.append(BlockMetrics(
            index=t.index,
            igm_noise=igm(t.block, t.z, t.x, inits.noise, t.cond, norm) if affine else float("nan"),
            igm_zeros_first_exact=(
                igm(t.block, t.z, t.x, inits.zeros_first_exact, t.cond, norm) if affine else float("nan")
            ),
            crm=crm(t.block, t.x, t.cond, norm) if hasattr(t.block, "output_projection") else None,
            iterations_mean=iterations.mean().item(),
            iterations_max=int(iterations.max()),
        ))
    return rows


def max_abs_error(x: Tensor, reference: Tensor) -> float:
    """Max-abs error of `x` vs `reference` over the samples `reference` has finite.

    A sample the reference itself overflows on is skipped; a non-finite value of `x` where
    the reference is finite counts as `inf`, never as NaN.

    Examples:
        >>> import torch
        >>> ref = torch.tensor([[0.0, 1.0], [float("nan"), 2.0]])
        >>> max_abs_error(torch.tensor([[0.5, 1.0], [7.0, 7.0]]), ref)
        0.5
    """
    finite = torch.isfinite(reference.flatten(1)).all(1)
    if not bool(finite.any()):
        return 0.0
    return (x[finite] - reference[finite]).abs().nan_to_num(math.inf).max().item()
