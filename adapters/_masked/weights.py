"""Values derived from a module's weights, reused only while the weights are provably the same."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["WeightCache"]

Value = TypeVar("Value")


@dataclass(frozen=True)
class _Entry(Generic[Value]):
    copies: tuple[Tensor, ...]
    value: Value


def _same(copies: tuple[Tensor, ...], tensors: list[Tensor]) -> bool:
    return len(copies) == len(tensors) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(copies, tensors)
    )


class WeightCache(Generic[Value]):
    """`build(module)`, recomputed whenever a parameter or buffer of `module` changed.

    The proof of "unchanged" is an element-wise comparison with a copy taken when the value
    was built: version counters and storage pointers cannot see updates through `p.data`
    (the usual EMA pattern), and a cache must never serve stale weights. The comparison
    reads the weights twice; callers consult the cache once per solve, not once per pass.
    Entries die with their module.
    """

    def __init__(self, build: Callable[[Any], Value]):
        self._build = build
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, module: nn.Module) -> Value:
        tensors = [t.detach() for t in (*module.parameters(), *module.buffers())]
        entry = self._entries.get(module)
        if entry is None or not _same(entry.copies, tensors):
            with torch.no_grad():
                entry = _Entry(tuple(t.clone() for t in tensors), self._build(module))
            self._entries[module] = entry
        return entry.value
