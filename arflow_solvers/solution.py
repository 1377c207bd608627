"""What a solve returns: the samples, a status, and the cost of getting them."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._evaluate import finite_rows

__all__ = ["Status", "BlockStats", "Solution", "SolveError", "finite_samples", "merge_block_stats"]


class Status(enum.IntEnum):
    """Outcome of a solve, per sample and overall; a larger value is a worse outcome.

    Each member's `message` says what happened and what to try next.
    """

    CONVERGED = 0
    MAX_ITERS = 1
    FELL_BACK = 2
    NONFINITE = 3
    GAVE_UP = 4

    @property
    def message(self) -> str:
        """What happened and what to try next."""
        return _MESSAGES[self]

    @property
    def usable(self) -> bool:
        """Whether the samples are finite (`NONFINITE` and `GAVE_UP` are not)."""
        return self < Status.NONFINITE


_MESSAGES = {
    Status.CONVERGED: "Every sample met the tolerance or reached the exactness bound.",
    Status.MAX_ITERS: (
        "Some samples hit the iteration cap before meeting the tolerance; their error vs "
        "serial is not bounded by it. Raise `max_iters`, use more segments, or `Serial()`."
    ),
    Status.FELL_BACK: (
        "A residual became non-finite or kept growing, so those samples were re-solved with "
        "smaller segments (down to serial) from their last exact prefix. The result is "
        "correct; a plan with more segments on that block would be faster."
    ),
    Status.NONFINITE: (
        "The result has non-finite values: a block overflows on this noise even when solved "
        "serially (its exact prefix is non-finite), or received non-finite input from an "
        "earlier block. No solver can repair it; check the model, its dtype, or the noise."
    ),
    Status.GAVE_UP: (
        "Some samples diverged and the solver gave up on them on purpose "
        "(on_divergence='give_up'): their values after the exact prefix are NaN. "
        "on_divergence='fall_back' re-solves them instead, down to serial."
    ),
}


def finite_samples(x: Tensor) -> Tensor:
    """`(B,)` bool: whether every value of each sample (leading dimension) is finite."""
    return finite_rows(x) if x.dim() > 1 else torch.isfinite(x)


class SolveError(RuntimeError):
    """Raised by `solve(..., throw=True)` when some samples are not usable.

    Attributes:
        status: the worst outcome.
        solution: the whole [`Solution`][arflow_solvers.Solution]: the good samples and the
            per-sample status of every block, so no work is lost.
        failed: `(n,)` indices of the samples that are not usable.
    """

    def __init__(self, status: Status, solution: "Solution | None" = None):
        self.status = status
        self.solution = solution
        self.failed = torch.zeros(0, dtype=torch.long)
        message = status.message
        if solution is not None:
            self.failed = torch.nonzero(solution.sample_status >= Status.NONFINITE).flatten()
            shown = ", ".join(map(str, self.failed[:10].tolist()))
            more = ", ..." if self.failed.numel() > 10 else ""
            message = (f"{self.failed.numel()} of {solution.x.shape[0]} samples failed "
                       f"(indices {shown}{more}): {message} The solution is in `error.solution`; "
                       "solve(..., throw=False) returns it.")
        super().__init__(message)


@dataclass(frozen=True)
class BlockStats:
    """The cost and outcome of inverting one autoregressive block.

    Attributes:
        index: the block's number in sampling order.
        solver: `repr` of the solver used.
        bounds: `(start, stop)` of each segment.
        iterations: `(B, M)` int tensor, Jacobi iterations per sample and segment
            (`Serial` counts one per position).
        residuals: one `(K, B)` tensor per segment: the max-abs update of each sample at each
            iteration, `nan` where the sample was no longer iterating.
        status: `(B,)` tensor of [`Status`][arflow_solvers.Status] values per sample.
        passes: network calls made on this block (each for the active samples only).
        work: the same in full-pass equivalents (samples x positions evaluated / (B x T)).
        wall_time: seconds spent on the block.
    """

    index: int
    solver: str
    bounds: tuple[tuple[int, int], ...]
    iterations: Tensor
    residuals: tuple[Tensor, ...]
    status: Tensor
    passes: int
    work: float
    wall_time: float

    @property
    def worst(self) -> Status:
        """The worst per-sample status."""
        return Status(int(self.status.max())) if self.status.numel() else Status.CONVERGED

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (per-sample tensors reduced to mean and max)."""
        per_segment = self.iterations.float()
        return {
            "index": self.index,
            "solver": self.solver,
            "segments": len(self.bounds),
            "status": self.worst.name,
            "passes": self.passes,
            "work": round(self.work, 4),
            "wall_time": self.wall_time,
            "iterations_mean": per_segment.sum(1).mean().item() if per_segment.numel() else 0.0,
            "iterations_max": int(self.iterations.sum(1).max()) if self.iterations.numel() else 0,
            "fell_back": int((self.status == Status.FELL_BACK).sum()),
        }


@dataclass(frozen=True)
class Solution:
    """The result of [`solve`][arflow_solvers.solve].

    Attributes:
        x: the samples, shaped as the flow's last step returns them.
        status: the worst outcome over all blocks and samples.
        blocks: one [`BlockStats`][arflow_solvers.BlockStats] per block, in sampling order.
        wall_time: seconds for the whole solve.
        adjoint: for a differentiable solve, one `AdjointStats` per block (see
            [`arflow_solvers.adjoint`][arflow_solvers.adjoint]), filled in when backward runs;
            empty otherwise.
        log_prob: with `solve(..., log_prob=...)`, the `(B,)` log-density of each sample
            (differentiable like `x`); `None` otherwise.
        log_det: with `log_prob`, the `(B,)` log |det dx/dz| of the whole sampling map;
            `log_prob` is the base log-density of `z` minus it.
    """

    x: Tensor
    status: Status
    blocks: tuple[BlockStats, ...] = field(default_factory=tuple)
    wall_time: float = 0.0
    adjoint: tuple = field(default_factory=tuple)
    log_prob: Tensor | None = None
    log_det: Tensor | None = None

    @property
    def passes(self) -> int:
        """Network calls over all blocks."""
        return sum(b.passes for b in self.blocks)

    @property
    def work(self) -> float:
        """Full-pass equivalents over all blocks (serial costs `T` per block without a cache)."""
        return sum(b.work for b in self.blocks)

    @property
    def sample_status(self) -> Tensor:
        """`(B,)` worst status of each sample over all blocks (`NONFINITE` at least where `x` is)."""
        batch = self.x.shape[0]
        worst = torch.zeros(batch, dtype=torch.long)
        for block in self.blocks:
            worst = torch.maximum(worst, block.status)
        finite = finite_samples(self.x).cpu()
        return torch.where(finite, worst, worst.clamp(min=Status.NONFINITE))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary of the solve."""
        return {
            "status": self.status.name,
            "passes": self.passes,
            "work": round(self.work, 4),
            "wall_time": self.wall_time,
            "blocks": [b.to_dict() for b in self.blocks],
        }

    def to_json(self, **kwargs: Any) -> str:
        """`to_dict()` as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)


def merge_block_stats(parts: list[BlockStats]) -> BlockStats:
    """One block's statistics over several batch chunks, as if solved as one batch."""
    sizes = [p.status.shape[0] for p in parts]
    total = max(sum(sizes), 1)
    residuals = []
    for segment in range(len(parts[0].residuals)):
        pieces = [p.residuals[segment] for p in parts]
        length = max(r.shape[0] for r in pieces)
        padded = [torch.cat([r, r.new_full((length - r.shape[0], r.shape[1]), float("nan"))]) for r in pieces]
        residuals.append(torch.cat(padded, dim=1))
    return BlockStats(
        index=parts[0].index,
        solver=parts[0].solver,
        bounds=parts[0].bounds,
        iterations=torch.cat([p.iterations for p in parts]),
        residuals=tuple(residuals),
        status=torch.cat([p.status for p in parts]),
        passes=sum(p.passes for p in parts),
        work=sum(p.work * n for p, n in zip(parts, sizes)) / total,
        wall_time=sum(p.wall_time for p in parts),
    )
