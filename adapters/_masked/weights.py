"""Values derived from a module's weights, reused only while the weights are provably the same."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["WeightCache", "all_tensors", "masks"]

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


def all_tensors(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of `module` (the default proof of "unchanged")."""
    return [*module.parameters(), *module.buffers()]


def masks(module: nn.Module) -> list[Tensor]:
    """Only the buffers named `mask`: for values that depend on the connectivity alone."""
    return [buffer for name, buffer in module.named_buffers() if name.rsplit(".", 1)[-1] == "mask"]


class WeightCache(Generic[Value]):
    """`build(module, *args)`, recomputed whenever a tensor of `module` changed.

    The proof of "unchanged" is an element-wise comparison with a copy taken when the value
    was built: version counters and storage pointers cannot see updates through `p.data`
    (the usual EMA pattern), and a cache must never serve stale weights. The comparison
    reads the tensors twice; callers consult the cache once per solve, not once per pass.
    Entries are keyed on the module alone (so `args` must be determined by it) and die with
    it.

    Arguments:
        build: computes the value from the module (and the extra arguments of the call).
        tensors: the tensors whose values the result depends on (default: every parameter
            and buffer; [`masks`][arflow_solvers.adapters._masked.weights.masks] for values
            that only depend on the connectivity).

    Examples:
        >>> import torch
        >>> cache = WeightCache(lambda layer: layer.weight.sum().item())
        >>> layer = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0)
        >>> cache(layer)
        2.0
        >>> layer.weight.data.mul_(3.0)  # no version bump through .data: still seen
        tensor([[3., 3.]])
        >>> cache(layer)
        6.0
    """

    def __init__(self, build: Callable[..., Value],
                 tensors: Callable[[nn.Module], list[Tensor]] = all_tensors):
        self._build = build
        self._tensors = tensors
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, module: nn.Module, *args: Any) -> Value:
        tensors = [t.detach() for t in self._tensors(module)]
        entry = self._entries.get(module)
        if entry is None or not _same(entry.copies, tensors):
            with torch.no_grad():
                entry = _Entry(tuple(t.clone() for t in tensors), self._build(module, *args))
            self._entries[module] = entry
        return entry.value
