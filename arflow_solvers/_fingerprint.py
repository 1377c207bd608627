"""Fingerprints of models and tensors, so that cached results are only reused for what made them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["fingerprint"]


def _tensors(obj: Any, seen: set[int]) -> Iterator[tuple[str, Tensor]]:
    """Named tensors that define `obj`: a module's state, or those of a wrapper's attributes."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield "", obj
    elif isinstance(obj, nn.Module):
        yield from obj.state_dict(keep_vars=False).items()
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            for name, tensor in _tensors(item, seen):
                yield f"{i}.{name}", tensor
    elif hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            if isinstance(value, (Tensor, nn.Module, list, tuple)) or hasattr(value, "__dict__"):
                for name, tensor in _tensors(value, seen):
                    yield f"{key}.{name}", tensor


def fingerprint(*objects: Any) -> str:
    """A SHA-256 over the names, shapes, dtypes and bytes of every tensor that defines `objects`.

    Examples:
        >>> import torch
        >>> a = fingerprint(torch.nn.Linear(2, 2))
        >>> len(a), a == fingerprint(torch.nn.Linear(2, 2))
        (64, False)
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    for index, obj in enumerate(objects):
        digest.update(f"#{index}:{type(obj).__name__}".encode())
        for name, tensor in _tensors(obj, seen):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
