"""The run's manifest: what its samples depend on, written once and checked on every resume."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._fingerprint import fingerprint
from ..plan import Plan
from ..solvers import Solver
from ._shards import write_atomically
from ._spec import (
    FORMAT,
    MANIFEST,
    MERGED,
    ResumeError,
    Sampler,
    ShardSpec,
    index_tensor,
)

_START_AGAIN = "use another out_dir, or overwrite=True (--overwrite) to"


def describe_run(sampler: Sampler, spec: ShardSpec, noise_shape: Sequence[int], dtype: torch.dtype,
                 labels: Callable[[Tensor], Any] | None, device: Any, model: Any,
                 sampler_id: str | None, redraws: int) -> dict[str, Any]:
    """Everything the samples depend on, as JSON-ready values: the manifest of the run."""
    captured = _captured(sampler)
    return {
        "format": FORMAT,
        "num_samples": spec.num_samples,
        "shard_size": spec.shard_size,
        "seed": spec.seed,
        "noise_shape": [int(n) for n in noise_shape],
        "dtype": str(dtype),
        "model": fingerprint(model) if model is not None else fingerprint(*captured),
        "sampler": sampler_id if sampler_id is not None else _describe(sampler, captured),
        "labels": None if labels is None else fingerprint(labels(index_tensor(spec, 0, device))),
        "redraws": redraws,
    }


def claim(out: Path, manifest: dict[str, Any], rank: int, world_size: int, overwrite: bool) -> str:
    """Rank 0 writes the manifest into a fresh directory; then every rank checks it.

    Returns:
        The run's id, which every shard of the run records.

    Raises:
        ResumeError: `out` holds another run's manifest, or shards but no manifest.
    """
    failure = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if overwrite:
                for path in _owned(out):
                    path.unlink()
            if not _owned(out):  # a fresh directory (the manifest is one of the run's files)
                write_atomically(json.dumps(manifest, indent=2, sort_keys=True), out / MANIFEST)
        except OSError as error:  # raised after the barrier, so that no rank waits forever
            failure = error
    if world_size > 1:
        dist.barrier()
    if failure is not None:
        raise failure
    differences = _differences(_read(out), manifest, "now")
    if differences:
        raise ResumeError(f"{out} holds samples of another run ({differences}); "
                          f"{_START_AGAIN} delete its shards and start again")
    return _run_id(manifest)


def recorded_run(out: Path, spec: ShardSpec) -> str:
    """The id of the run whose manifest is in `out`, checked to be of the sample set `spec`."""
    manifest = _read(out)
    asked = {"num_samples": spec.num_samples, "shard_size": spec.shard_size, "seed": spec.seed}
    differences = _differences(manifest, asked, "asked")
    if differences:
        raise ResumeError(f"{out / MANIFEST} describes another sample set ({differences})")
    return _run_id(manifest)


def _captured(sampler: Any) -> list[Any]:
    """The objects a function closes over (a lambda's model and plan)."""
    values = []
    for cell in getattr(sampler, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return values


def _describe(sampler: Any, captured: list[Any]) -> str:
    name = getattr(sampler, "__qualname__", type(sampler).__qualname__)
    settings = [str(v) for v in captured if isinstance(v, (Plan, Solver, str, int, float, bool))]
    return f"{getattr(sampler, '__module__', None)}.{name}" + (f" {settings}" if settings else "")


def _run_id(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _owned(out: Path) -> list[Path]:
    """The files of a run in `out`: what `overwrite=True` deletes."""
    names = [out / MANIFEST, out / MERGED]
    return [p for p in names if p.exists()] + sorted(out.glob("shard_*.pt"))


def _read(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.exists():
        if _owned(out):
            raise ResumeError(
                f"{out} holds shards but no {MANIFEST} (written by an older version or another "
                f"tool), so they cannot be checked; {_START_AGAIN} delete them and start again"
            )
        raise ResumeError(f"{out} has no {MANIFEST}: it was not written by sample_many")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ResumeError(f"{path} is unreadable ({error}); {_START_AGAIN} start again") from None


def _differences(found: dict[str, Any], wanted: dict[str, Any], now: str) -> str:
    """`key: <found> there, <wanted> now; ...` for each key whose values differ ('' if none)."""
    return "; ".join(f"{key}: {_short(found.get(key))} there, {_short(value)} {now}"
                     for key, value in wanted.items() if found.get(key) != value)


def _short(value: Any) -> str:
    text = repr(value)
    return text[:14] + "...'" if isinstance(value, str) and len(value) == 64 else text
