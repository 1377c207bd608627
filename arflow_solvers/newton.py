r"""Newton's method on one block's fixed point, with the block's whole causal Jacobian.

Jacobi iterates $x \leftarrow F(x)$ and needs tens of sequential network calls where a block
is strongly coupled: each call moves information a few positions along the sequence. Newton
solves the linearised problem instead,

$$(I - J(x))\,\delta = F(x) - x, \qquad x \leftarrow x + \delta, \qquad J = \partial F / \partial x,$$

where $J$ is strictly lower triangular (position $t$ reads positions $< t$), so $I - J$ is
unit lower triangular and the solve is one triangular substitution, no network call. As with
Jacobi, after $k$ iterations the first $k$ positions equal the serial answer (their update
no longer depends on anything inexact), so $T$ iterations reach it; near the answer the error
squares every iteration, so a handful suffice.

The Jacobian costs one network call per iteration: the block is evaluated once, with the
$T D$ unit tangent directions pushed forward through it in the same call (forward-mode
derivatives, batched by `torch.func.vmap`). That call does $1 + T D$ evaluations' work per
sample, and holds as many evaluations' activations: Newton trades work for sequential calls,
which pays where sequential calls are what costs (an accelerator with parallelism to spare,
a small block, a small batch), and not on a CPU or for large $T D$.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._evaluate import Evaluator, select_rows
from ._sweep import NotCausalError, _residuals
from .adjoint import update
from .divergence import Watch
from .solution import BlockStats, Status
from .solvers import _Iterating, Serial, _block_stats, _sync, check_optional_count, initial_guess

__all__ = ["Newton"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Newton(_Iterating):
    r"""Newton's method with the block's full causal Jacobian: fewest sequential calls, most work per call.

    Each iteration is one network call that returns the update $F(x)$ and its Jacobian (the
    block evaluated on the iterate and its $T D$ unit tangents, forward mode, batched), then
    a unit lower-triangular solve $(I - J)\delta = F(x) - x$. After `k` iterations the first
    `k` positions equal serial's, so `max_iters=None` (the bound, `T`) gives the serial answer
    in exact arithmetic; near it the error squares each iteration (see the module docs).

    **Stopping.** Per sample, by a [`StoppingRule`][arflow_solvers.StoppingRule] on the
    Newton step: stop when `||delta|| <= atol + tol * ||x||`. With quadratic convergence the
    answer is then much closer than `delta`: one more iteration than needed, at most. A
    converged sample leaves the batch.

    **Cost.** Every call evaluates the block on `1 + T*D` inputs per sample and keeps their
    activations; `chunk_size` bounds how many tangents are pushed at once (more calls, less
    memory). Worth it where calls, not work, set the wall time: small blocks on an
    accelerator with idle parallelism. Needs a block whose update supports forward-mode
    derivatives under `torch.func.vmap` (attention runs with the math kernel, which does);
    otherwise a `TypeError` says so.

    **Divergence.** A sample whose step is non-finite, or grows `patience` iterations in a
    row, is solved by `Serial()` instead (status `FELL_BACK`).

    Arguments:
        tol: relative tolerance of the stopping rule (> 0 or `atol` > 0: rounding keeps
            Newton's step from reaching exact zero).
        atol: absolute tolerance of the stopping rule.
        norm: norm of the stopping rule, `"max"` or `"rms"`.
        max_iters: iterations at most; `None` means the exactness bound `T`.
        init: initial guess, `init(block, z, cond) -> x0` (see `arflow_solvers.init`).
        patience: consecutive growing steps that count as divergence.
        chunk_size: tangent directions per network call (`None`: all `T*D` in one call).

    Examples:
        >>> import torch
        >>> from arflow_solvers import Newton, Serial, solve_inverse
        >>> class Squarer:  # x_t = z_t + 0.5 * x_{t-1}^2
        ...     seq_len = 5
        ...     def affine(self, x, cond=None):
        ...         previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        ...         return 0.5 * previous.square(), torch.zeros_like(x)
        >>> z = 0.5 * torch.randn(3, 5, 1, dtype=torch.float64)
        >>> x = solve_inverse(Squarer(), z, Newton(tol=1e-12))
        >>> bool(torch.allclose(x, solve_inverse(Squarer(), z, Serial()), atol=1e-12))
        True
    """

    patience: int = 3
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stopping_rule().tolerates:
            raise ValueError("Newton needs tol > 0 or atol > 0: rounding keeps its step from reaching exact "
                             "zero; for the exact answer use Jacobi(tol=0.0) or Serial()")
        check_optional_count("chunk_size", self.chunk_size)

    @torch.no_grad()
    def solve(self, block: Any, z: Tensor, cond: Any = None, index: int = 0) -> tuple[Tensor, BlockStats]:
        _sync(z)
        began = time.perf_counter()
        batch, seq_len = z.shape[:2]
        ev = Evaluator(block, z, cond, None)
        x = initial_guess(self.init, ev, z, cond)
        rule = self.stopping_rule()
        iterations = torch.zeros(batch, dtype=torch.long, device=z.device)
        status = torch.zeros(batch, dtype=torch.long, device=z.device)
        history: list[tuple[Tensor, Tensor]] = []
        watch = Watch(batch, self.patience, z)
        active = torch.arange(batch, device=z.device)
        cap = seq_len if self.max_iters is None else self.max_iters
        for _ in range(cap):
            if active.numel() == 0:
                break
            step = self._step(ev, x[active], z[active], select_rows(cond, active, batch))
            x[active] += step
            change = rule.size(step)
            history.append((active, change))
            iterations[active] += 1
            failed = watch.diverging(active, change)
            done = rule.met(change, x[active]) | failed
            if failed.any():
                self._fall_back(block, z, cond, x, active[failed], status, ev)
            active = active[~done]
        if active.numel() and self.max_iters is not None:  # at the bound T the answer is serial's
            status[active] = Status.MAX_ITERS
        stats = _block_stats(self, index, ev, x, began, bounds=((0, seq_len),), iterations=iterations[:, None],
                             residuals=(_residuals(history, batch, x),), status=status)
        return x, stats

    def _step(self, ev: Evaluator, x: Tensor, z: Tensor, cond: Any) -> Tensor:
        """The Newton step of samples `x`: `(I - J)^{-1} (F(x) - x)`, from one network call per chunk."""
        samples, flat = x.shape[0], x[0].numel()
        tangents = torch.eye(flat, dtype=x.dtype, device=x.device).reshape(flat, 1, *x.shape[1:])
        chunks = 1 if self.chunk_size is None else -(-flat // self.chunk_size)
        for _ in range(chunks):
            ev.count(samples * (1 + flat // chunks), ev.seq_len)

        def pushed(tangent: Tensor) -> tuple[Tensor, Tensor]:
            return torch.func.jvp(lambda v: update(ev.block, v, z, cond), (x,), (tangent.expand_as(x),))

        with torch.enable_grad(), _math_attention():  # blocks take their out= fast paths without grad
            try:
                out, columns = torch.func.vmap(pushed, chunk_size=self.chunk_size)(tangents)
            except (NotImplementedError, RuntimeError) as error:
                raise TypeError(f"Newton needs forward-mode derivatives of {type(ev.block).__name__}'s update "
                                f"under torch.func.vmap, which failed ({type(error).__name__}: {error}); use "
                                "Jacobi or GSJacobi for this block") from error
        out, columns = out.detach(), columns.detach()  # of parameters that require grad
        jacobian = columns.reshape(flat, samples, flat).permute(1, 2, 0)  # (samples, out, in)
        _check_causal(jacobian, ev.block, x.shape[1])
        residual = (out[0] - x).reshape(samples, flat, 1)
        eye = torch.eye(flat, dtype=x.dtype, device=x.device)
        step = torch.linalg.solve_triangular(eye - jacobian, residual, upper=False, unitriangular=True)
        return step.reshape(x.shape)

    def _fall_back(self, block: Any, z: Tensor, cond: Any, x: Tensor, samples: Tensor, status: Tensor,
                   ev: Evaluator) -> None:
        """Samples `samples` solved by `Serial()` instead, in `x` and `status`; their calls added to `ev`'s count."""
        x[samples], stats = Serial().solve(block, z[samples], select_rows(cond, samples, z.shape[0]))
        ev.record(stats.passes, stats.work * samples.numel() / z.shape[0])
        status[samples] = Status.FELL_BACK


def _check_causal(jacobian: Tensor, block: Any, seq_len: int) -> None:
    """Refuse a block whose update reads its own or later positions: Newton's solve would be wrong."""
    position = torch.arange(jacobian.shape[1], device=jacobian.device) // (jacobian.shape[1] // seq_len)
    not_before = position[None, :] >= position[:, None]  # (out, in): input at or after the output's position
    finite = torch.where(torch.isfinite(jacobian), jacobian.abs(), 0)  # overflow is the step's problem, not this
    reads = finite.amax(0).masked_fill(~not_before, 0)
    if bool(reads.ne(0).any()):
        row = int(position[reads.amax(1).ne(0)].min())
        raise NotCausalError(f"{type(block).__name__}'s update of row {row} reads its own or a later row (its "
                             "Jacobian is not strictly lower triangular in rows): Newton cannot invert it",
                             row, float(reads.max()))


@contextlib.contextmanager
def _math_attention() -> Any:
    """Scaled-dot-product attention by its math kernel, the one with forward-mode derivatives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
