"""What a merge wrote, and how each sample went."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..solution import Status
from ._spec import failed_rows


@dataclass(frozen=True, eq=False)
class Merged:
    """What [`merge_shards`][arflow_solvers.distributed.merge_shards] wrote, and how each sample went.

    Path-like: `torch.load(merged)` reads the merged file, `{"indices", "samples", "status",
    "attempts"}` in index order.

    Attributes:
        path: the merged `samples.pt`.
        status: `(N,)` [`Status`][arflow_solvers.Status] value of each sample; rows of
            failed samples (`NONFINITE`, `GAVE_UP`) hold whatever the sampler returned
            (usually NaN) and must not be used.
        attempts: `(N,)` which noise draw each sample's row comes from: 0 for its own seed,
            `d > 0` for its `d`-th redraw (see `sample_many(..., redraws=)`).
    """

    path: Path
    status: Tensor
    attempts: Tensor

    @property
    def num_samples(self) -> int:
        return int(self.status.numel())

    @property
    def failed(self) -> Tensor:
        """`(n,)` indices of the samples that are not usable."""
        return failed_rows(self.status)

    @property
    def redrawn(self) -> Tensor:
        """`(n,)` indices of the samples whose row comes from a redrawn noise vector."""
        return torch.nonzero(self.attempts > 0).flatten()

    def counts(self) -> dict[str, int]:
        """How many samples ended in each status, by name (only statuses that occur)."""
        values, counts = torch.unique(self.status, return_counts=True)
        return {Status(int(v)).name: int(c) for v, c in zip(values, counts)}

    def summary(self) -> str:
        """One line: where the samples are, how many failed (which) and how many were redrawn."""
        failed, redrawn = self.failed, self.redrawn
        line = f"{self.num_samples} samples in {self.path}: {failed.numel()} failed"
        if failed.numel():
            shown = ", ".join(map(str, failed[:10].tolist())) + (", ..." if failed.numel() > 10 else "")
            line += f" (indices {shown}; {self.counts()})"
        if redrawn.numel():
            line += f", {redrawn.numel()} redrawn"
        return line

    def __fspath__(self) -> str:
        return str(self.path)
