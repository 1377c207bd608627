"""Many samples across ranks with torch.distributed: seeded per sample, sharded, resumable."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._progress import progress

__all__ = ["ShardSpec", "sample_noise", "shard_path", "sample_many", "merge_shards"]

Sampler = Callable[[Tensor, Any], Tensor]
"""`sampler(noise, cond) -> samples`: e.g. `lambda z, y: solve_inverse(flow, z, plan, cond=y)`."""


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


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """`(len(indices), *shape)` standard normal noise, sample `i` drawn from seed `(seed, i)`."""
    rows = []
    for i in indices:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        rows.append(torch.randn(*shape, generator=generator, dtype=dtype))
    return torch.stack(rows) if rows else torch.empty(0, *shape, dtype=dtype)


def shard_path(out_dir: str | Path, shard: int) -> Path:
    """Where shard `shard` is written."""
    return Path(out_dir) / f"shard_{shard:06d}.pt"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _write_atomically(payload: dict[str, Any], path: Path) -> None:
    partial = path.with_suffix(f".partial.{os.getpid()}")
    torch.save(payload, partial)
    os.replace(partial, path)  # a shard file exists whole or not at all


def sample_many(
    sampler: Sampler,
    spec: ShardSpec,
    noise_shape: Sequence[int],
    out_dir: str | Path,
    *,
    labels: Callable[[Tensor], Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> Path | None:
    """Solve this rank's shards, write each as it finishes, and merge on rank 0.

    Works in one process, or under `torchrun` after `torch.distributed.init_process_group`
    (NCCL on GPUs, gloo on CPU). Shards already on disk are skipped, so a restarted job
    finishes what an interrupted one left, with nothing lost or duplicated; files are
    written atomically. Rank 0 shows a progress bar and, after a barrier, merges the shards.

    Arguments:
        sampler: `sampler(noise, cond) -> samples` for a batch of noise on `device`.
        spec: the sample set and its sharding.
        noise_shape: the shape of one sample's noise, e.g. `(T, D)`.
        out_dir: the directory of the shards and of `samples.pt`.
        labels: `labels(indices) -> cond` for a `(n,)` LongTensor of sample indices
            (e.g. `lambda i: i % 10` for class labels); `None` passes `cond=None`.
        device: where the noise is put before sampling.
        dtype: the noise dtype.
        show_progress: progress bar on rank 0.

    Returns:
        The path of the merged `samples.pt` on rank 0, `None` on other ranks.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size = _world()
    todo = [k for k in spec.shards_of(rank, world_size) if not shard_path(out, k).exists()]
    for shard in progress(todo, show_progress and rank == 0, desc=f"rank {rank} shards", unit="shard"):
        indices = torch.tensor(list(spec.indices(shard)), dtype=torch.long)
        noise = sample_noise(indices.tolist(), noise_shape, spec.seed, dtype).to(device)
        cond = labels(indices.to(device)) if labels is not None else None
        with torch.no_grad():
            samples = sampler(noise, cond)
        _write_atomically({"indices": indices, "samples": samples.cpu()}, shard_path(out, shard))
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        return None
    return merge_shards(out, spec)


def merge_shards(out_dir: str | Path, spec: ShardSpec) -> Path:
    """Gather every shard into `samples.pt` (`{"indices", "samples"}` in index order).

    Raises `FileNotFoundError` naming the missing shards, and `ValueError` if a shard does
    not hold exactly the indices it should.
    """
    out = Path(out_dir)
    missing = [k for k in range(spec.num_shards) if not shard_path(out, k).exists()]
    if missing:
        raise FileNotFoundError(f"shards {missing[:10]} of {spec.num_shards} are missing in {out}")
    samples = []
    for shard in range(spec.num_shards):
        data = torch.load(shard_path(out, shard), weights_only=True)
        if data["indices"].tolist() != list(spec.indices(shard)):
            raise ValueError(f"{shard_path(out, shard)} holds the wrong sample indices")
        samples.append(data["samples"])
    merged = out / "samples.pt"
    _write_atomically({"indices": torch.arange(spec.num_samples), "samples": torch.cat(samples)}, merged)
    return merged
