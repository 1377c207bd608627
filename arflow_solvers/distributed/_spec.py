"""What a sample set is: its sharding, each sample's noise, and the names of a run's files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from ..solution import Solution, Status

Sampler = Callable[[Tensor, Any], Union[Tensor, Solution]]
"""`sampler(noise, cond) -> samples or Solution`: e.g. `lambda z, y: solve(flow, z, plan, cond=y, throw=False)`."""

MANIFEST = "manifest.json"
MERGED = "samples.pt"
FORMAT = 1
"""The version of the manifest and shard layout."""
SHARD_KEYS = ("indices", "samples", "status", "attempts", "run")
"""What every shard file holds."""


class ResumeError(ValueError):
    """`out_dir` holds the work of another run (or of an unknown one), so it cannot be resumed."""


@dataclass(frozen=True)
class ShardSpec:
    """How a sample set is cut: `num_samples` samples in shards of `shard_size`.

    Shard `k` holds samples `[k * shard_size, (k + 1) * shard_size)` and belongs to rank
    `k % world_size`. Sample `i`'s noise comes from its own seed, so what a sample is does
    not depend on the number of ranks, only on `seed`, `i` and the shard it is solved in.
    """

    num_samples: int
    shard_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.shard_size < 1:
            raise ValueError(
                f"num_samples and shard_size must be >= 1; got {self.num_samples}, {self.shard_size}"
            )

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def indices(self, shard: int) -> range:
        """The sample indices of `shard`."""
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_samples))

    def shards_of(self, rank: int, world_size: int) -> list[int]:
        """The shards rank `rank` of `world_size` solves."""
        return list(range(rank, self.num_shards, world_size))


def index_tensor(spec: ShardSpec, shard: int, device: Any = None) -> Tensor:
    """`(n,)` LongTensor of the sample indices of `shard`."""
    return torch.tensor(list(spec.indices(shard)), dtype=torch.long, device=device)


def failed_rows(status: Tensor) -> Tensor:
    """`(n,)` positions of the samples whose status makes them unusable."""
    return torch.nonzero(status >= Status.NONFINITE).flatten()


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int = 0,
                 dtype: torch.dtype = torch.float32, *, draw: int = 0) -> Tensor:
    """`(len(indices), *shape)` standard normal noise, sample `i` drawn from seed `(seed, i)`.

    Arguments:
        indices: the sample indices.
        shape: the shape of one sample's noise.
        seed: the seed of the sample set.
        dtype: the noise dtype.
        draw: which vector of each sample's own generator: 0, the first, is the sample's
            noise; `d > 0` is its `d`-th redraw.

    Examples:
        >>> first = sample_noise([3], (2,), seed=1)
        >>> torch.equal(first, sample_noise([5, 3], (2,), seed=1)[1:])
        True
        >>> torch.equal(first, sample_noise([3], (2,), seed=1, draw=1))
        False
    """
    if not isinstance(draw, int) or draw < 0:
        raise ValueError(f"draw must be an int >= 0; got {draw!r}")
    rows = []
    for i in indices:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        for _ in range(draw + 1):
            row = torch.randn(*shape, generator=generator, dtype=dtype)
        rows.append(row)
    return torch.stack(rows) if rows else torch.empty(0, *shape, dtype=dtype)


def shard_path(out_dir: str | Path, shard: int) -> Path:
    """Where shard `shard` is written."""
    return Path(out_dir) / f"shard_{shard:06d}.pt"
