"""Solving a run's shards on every rank, and merging them on rank 0."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._progress import progress
from ..solution import Solution, SolveError, Status, finite_samples
from ._manifest import claim, describe_run, recorded_run
from ._merged import Merged
from ._shards import BadShard, load_shard, trusted, write_atomically
from ._spec import (
    MERGED,
    Sampler,
    ShardSpec,
    failed_rows,
    index_tensor,
    sample_noise,
    shard_path,
)


def sample_many(
    sampler: Sampler,
    spec: ShardSpec,
    noise_shape: Sequence[int],
    out_dir: str | Path,
    *,
    labels: Callable[[Tensor], Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model: Any = None,
    sampler_id: str | None = None,
    redraws: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Merged | None:
    """Solve this rank's shards, write each as it finishes, and merge on rank 0.

    Works in one process, or under `torchrun` after `torch.distributed.init_process_group`
    (NCCL on GPUs, gloo on CPU). Files are written atomically. Rank 0 shows a progress bar
    and, after a barrier, merges the shards.

    **Resuming.** The first run writes `manifest.json`: the spec, noise shape and dtype, a
    fingerprint of the model's weights, the sampler's description, the first shard's
    conditioning and `redraws`. A rerun into the same directory finishes what an interrupted
    one left (nothing lost or duplicated) only if its manifest is the same; otherwise
    [`ResumeError`][arflow_solvers.distributed.ResumeError] says what differs. Each shard on
    disk is read and checked (its run, indices and row counts) before it is skipped; one
    that fails is renamed to `shard_*.pt.corrupt` with a warning and solved again.

    **Failed samples.** A sample the model cannot produce (non-finite, or given up) does not
    stop the run: a sampler that raises [`SolveError`][arflow_solvers.SolveError] (as
    `solve_inverse` does) is read through the error's solution, and each sample's status is
    stored. By default (`redraws=0`) failed rows are kept, marked in `status`, and the merge
    warns how many there are. With `redraws=n` a failed sample is solved again, up to `n`
    times, from the next vectors of its own generator (`sample_noise(..., draw=d)`), and
    `attempts` records which draw its row comes from: reproducible, but the set is then
    conditioned on the model not failing, which changes its distribution slightly.

    Arguments:
        sampler: `sampler(noise, cond)` for a batch of noise on `device`, returning one
            sample per noise row, in order: a tensor (a row with non-finite values counts as
            `NONFINITE`) or a [`Solution`][arflow_solvers.Solution] (its `sample_status` is
            kept), e.g. `lambda z, y: solve(flow, z, plan, cond=y, throw=False)`.
        spec: the sample set and its sharding.
        noise_shape: the shape of one sample's noise, e.g. `(T, D)`.
        out_dir: the directory of the manifest, the shards and `samples.pt`.
        labels: `labels(indices) -> cond` for a `(n,)` LongTensor of sample indices
            (e.g. `lambda i: i % 10` for class labels); `None` passes `cond=None`.
        device: where the noise is put before sampling.
        dtype: the noise dtype.
        model: what the samples depend on (a module, a `Flow`, tensors); its fingerprint
            goes into the manifest. `None` fingerprints what `sampler` closes over, which
            misses a model the sampler reads from a global: pass it.
        sampler_id: how the sampler solves, e.g. `str(plan)`; into the manifest. `None`
            uses the sampler's qualified name and the plans and numbers it closes over.
        redraws: how many times a failed sample is solved again from fresh noise (>= 0).
        overwrite: delete the manifest, shards and `samples.pt` in `out_dir` (other files
            are left) and start again, instead of resuming.
        show_progress: progress bar on rank 0.

    Returns:
        On rank 0, the [`Merged`][arflow_solvers.distributed.Merged] result (path-like: the
        merged `samples.pt`); `None` on other ranks.

    Raises:
        ResumeError: `out_dir` holds another run's manifest, or shards but no manifest.
        ValueError: the sampler returned another number of rows than it was given.
        TypeError: the sampler returned neither a tensor nor a `Solution`.

    Examples:
        >>> import tempfile
        >>> from arflow_solvers import Jacobi, solve
        >>> class Halver:  # x_t = z_t + x_{t-1} / 2
        ...     seq_len = 4
        ...     def affine(self, x, cond=None):
        ...         mu = 0.5 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        ...         return mu, torch.zeros_like(x)
        >>> flow = Halver()
        >>> sampler = lambda z, y: solve(flow, z, Jacobi(tol=0.0), throw=False)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     merged = sample_many(sampler, ShardSpec(6, shard_size=4), (4, 1), out,
        ...                          sampler_id="Jacobi(tol=0)", show_progress=False)
        ...     torch.load(merged)["samples"].shape, merged.failed.tolist()
        (torch.Size([6, 4, 1]), [])
    """
    if not isinstance(redraws, int) or redraws < 0:
        raise ValueError(f"redraws must be an int >= 0; got {redraws!r}")
    out = Path(out_dir)
    rank, world_size = _world()
    manifest = describe_run(sampler, spec, noise_shape, dtype, labels, device, model, sampler_id, redraws)
    run = claim(out, manifest, rank, world_size, overwrite)
    todo = [k for k in spec.shards_of(rank, world_size) if not trusted(out, spec, k, run)]
    for shard in progress(todo, show_progress and rank == 0, desc=f"rank {rank} shards", unit="shard"):
        payload = solve_shard(sampler, spec, shard, noise_shape, dtype, device, labels, redraws)
        write_atomically({**payload, "run": run}, shard_path(out, shard))
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        return None
    return merge_shards(out, spec)


def merge_shards(out_dir: str | Path, spec: ShardSpec) -> Merged:
    """Gather every shard into `samples.pt` and report the samples that failed.

    Writes `{"indices", "samples", "status", "attempts"}` in index order and warns
    (`RuntimeWarning`) how many samples failed.

    Arguments:
        out_dir: the directory `sample_many` wrote.
        spec: the sample set, as given to `sample_many`.

    Returns:
        The [`Merged`][arflow_solvers.distributed.Merged] result.

    Raises:
        ResumeError: `out_dir` has no manifest, or one for another spec.
        FileNotFoundError: naming the missing shards.
        ValueError: a shard is unreadable or holds the wrong samples; it is renamed to
            `*.corrupt`, so rerunning `sample_many` solves it again.
    """
    out = Path(out_dir)
    run = recorded_run(out, spec)
    missing = [k for k in range(spec.num_shards) if not shard_path(out, k).exists()]
    if missing:
        raise FileNotFoundError(f"shards {missing[:10]} of {spec.num_shards} are missing in {out}")
    shards: list[dict[str, Tensor]] = []
    for shard in range(spec.num_shards):
        try:
            shards.append(load_shard(out, spec, shard, run, like=shards[0]["samples"] if shards else None))
        except BadShard as bad:
            raise ValueError(f"{bad}; it was moved to {bad.moved.name}; "
                             "rerun sample_many to solve that shard again") from None
    gathered = {key: torch.cat([s[key] for s in shards]) for key in ("samples", "status", "attempts")}
    merged = Merged(out / MERGED, gathered["status"], gathered["attempts"])
    write_atomically({"indices": torch.arange(spec.num_samples), **gathered}, merged.path)
    if merged.failed.numel():
        warnings.warn(f"{merged.summary()}; their rows are not usable (see 'status' in the file)",
                      RuntimeWarning, stacklevel=2)
    return merged


def solve_shard(sampler: Sampler, spec: ShardSpec, shard: int, noise_shape: Sequence[int],
                dtype: torch.dtype, device: Any, labels: Callable[[Tensor], Any] | None,
                redraws: int) -> dict[str, Tensor]:
    """Solve one shard; redraw failed samples up to `redraws` times."""

    def solve_draw(indices: Tensor, draw: int) -> tuple[Tensor, Tensor]:
        noise = sample_noise(indices.tolist(), noise_shape, spec.seed, dtype, draw=draw).to(device)
        cond = labels(indices.to(device)) if labels is not None else None
        return _samples_and_status(sampler, noise, cond, shard)

    indices = index_tensor(spec, shard)
    samples, status = solve_draw(indices, 0)
    attempts = torch.zeros(len(indices), dtype=torch.long)
    for draw in range(1, redraws + 1):
        rows = failed_rows(status)
        if rows.numel() == 0:
            break
        samples[rows], status[rows] = solve_draw(indices[rows], draw)
        attempts[rows] = draw
    return {"indices": indices, "samples": samples, "status": status, "attempts": attempts}


def _samples_and_status(sampler: Sampler, noise: Tensor, cond: Any, shard: int) -> tuple[Tensor, Tensor]:
    """The sampler's rows for `noise` (on the CPU) and the status of each."""
    with torch.no_grad():
        try:
            result = sampler(noise, cond)
        except SolveError as error:  # solve_inverse: the solution is in the error
            if error.solution is None:
                raise
            result = error.solution
    if isinstance(result, Solution):
        samples, status = result.x, result.sample_status
    elif isinstance(result, Tensor):
        samples, status = result, None
    else:
        raise TypeError(f"the sampler must return a Tensor or a Solution; got {type(result).__name__}")
    if samples.dim() == 0 or samples.shape[0] != len(noise):
        rows = samples.shape[0] if samples.dim() else "a scalar, no"
        raise ValueError(
            f"the sampler returned {rows} rows for the {len(noise)} noise rows of shard {shard}; "
            "it must return one sample per noise row, in order"
        )
    samples = samples.detach().cpu()
    if status is None:
        status = torch.where(finite_samples(samples), Status.CONVERGED, Status.NONFINITE)
    return samples, status.cpu().long()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
