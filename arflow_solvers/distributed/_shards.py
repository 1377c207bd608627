"""Shard files: written atomically, checked before they are trusted, moved aside when bad."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._spec import SHARD_KEYS, ShardSpec, shard_path


class BadShard(Exception):
    """A shard file that cannot be trusted; the message names it and says why.

    Attributes:
        moved: where the file was renamed to (`*.corrupt`).
    """

    def __init__(self, message: str, moved: Path) -> None:
        super().__init__(message)
        self.moved = moved


def write_atomically(payload: dict[str, Any] | str, path: Path) -> None:
    """Save a dict with `torch.save` (a str as text) so that `path` exists whole or not at all."""
    partial = path.with_name(f"{path.name}.partial.{os.getpid()}")
    if isinstance(payload, str):
        partial.write_text(payload)
    else:
        torch.save(payload, partial)
    os.replace(partial, path)


def load_shard(out: Path, spec: ShardSpec, shard: int, run: str, like: Tensor | None = None) -> dict[str, Any]:
    """Read shard `shard` of run `run` and check it (against `like`'s sample shape and dtype).

    Raises:
        BadShard: the file is unreadable or holds the wrong samples; it has been renamed to
            `*.corrupt`, so that the shard is solved again.
    """
    path = shard_path(out, shard)
    try:
        data = _read(path, spec, shard, run)
        if like is not None:
            _check_like(like, data["samples"])
        return data
    except _Problem as problem:
        raise BadShard(f"{path} {problem}", quarantine(path)) from None


def trusted(out: Path, spec: ShardSpec, shard: int, run: str) -> bool:
    """Whether the shard on disk is whole and this run's; a bad one is moved aside."""
    if not shard_path(out, shard).exists():
        return False
    try:
        load_shard(out, spec, shard, run)
        return True
    except BadShard as bad:
        warnings.warn(f"{bad}; moved to {bad.moved.name}, solving it again", RuntimeWarning, stacklevel=3)
        return False


def quarantine(path: Path) -> Path:
    """Rename a bad shard aside (`*.corrupt`, numbered if taken) so that it is redone."""
    target = path.with_name(path.name + ".corrupt")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.corrupt.{number}")
    os.replace(path, target)
    return target


class _Problem(Exception):
    """Why a shard file cannot be trusted (before it is moved aside)."""


def _read(path: Path, spec: ShardSpec, shard: int, run: str) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, garbage: torch raises many kinds
        raise _Problem(f"is unreadable ({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(data, dict) or any(key not in data for key in SHARD_KEYS):
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise _Problem(f"is not a shard of sample_many (holds {keys})")
    if data["run"] != run:
        raise _Problem("was written by another run")
    expected = list(spec.indices(shard))
    if not isinstance(data["indices"], Tensor) or data["indices"].tolist() != expected:
        raise _Problem(f"holds the wrong sample indices (expected {expected[0]}..{expected[-1]})")
    for key in ("samples", "status", "attempts"):
        value = data[key]
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != len(expected):
            rows = value.shape[0] if isinstance(value, Tensor) and value.dim() else "no"
            raise _Problem(f"holds {rows} rows of {key!r} for {len(expected)} samples")
    return data


def _check_like(first: Tensor, samples: Tensor) -> None:
    if samples.shape[1:] != first.shape[1:] or samples.dtype != first.dtype:
        raise _Problem(f"holds samples of shape {tuple(samples.shape[1:])} and {samples.dtype}; "
                       f"shard 0 holds {tuple(first.shape[1:])} and {first.dtype}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else "no message"
