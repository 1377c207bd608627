"""The floor of any plan's error: how far the flow's own serial sampling is from a float64 solve."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..flow import Flow
from ..metrics import max_abs_error
from ..solve import solve
from ..solvers import Jacobi

__all__ = ["in_float64", "float64_answer", "serial_floor"]


def _cast(obj: Any, seen: set[int]) -> None:
    """Cast, in place, every floating module and tensor attribute reachable from `obj` to float64."""
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        obj.double()
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else None
    if items is None and hasattr(obj, "__dict__"):
        items = vars(obj).items()
    for key, value in list(items or ()):
        if isinstance(value, (Tensor, tuple)):
            _put(obj, key, _double(value))
        for inner in value if isinstance(value, tuple) else (value,):
            if not isinstance(inner, Tensor):
                _cast(inner, seen)


def _put(obj: Any, key: Any, value: Any) -> None:
    if isinstance(obj, (dict, list)):
        obj[key] = value
    else:  # `obj` is our own deep copy: a frozen dataclass may be rewritten too
        object.__setattr__(obj, key, value)


def in_float64(flow: Flow) -> Flow | None:
    """A float64 copy of `flow` (its modules and tensors), or `None` when it cannot be copied."""
    try:
        twin = copy.deepcopy(flow)
        _cast(twin, set())
        return twin
    except Exception:  # noqa: BLE001 - a flow we cannot copy just has no floor
        return None


def float64_answer(flow: Flow, z: Tensor, cond: Any) -> Tensor | None:
    """The flow's answer for `z` computed in float64; `None` when the flow cannot be copied to
    float64 or one of its blocks refuses it."""
    twin = in_float64(flow)
    if twin is None:
        return None
    try:  # Jacobi at the bound is serial's answer (to float64 rounding), in far fewer passes
        return solve(twin, z.double(), Jacobi(tol=0.0), cond=_double(cond), throw=False).x
    except Exception:  # noqa: BLE001 - a block that refuses float64 has no floor either
        return None


def serial_floor(flow: Flow, z: Tensor, cond: Any, reference: Tensor, truth: Tensor | None = None) -> float | None:
    """Max-abs distance of `reference` (serial in `z`'s dtype) from the float64 answer.

    `truth` is that answer when the caller has it already. `0.0` when `z` is already float64;
    `None` when no float64 answer can be had (then no floor is known).
    """
    if z.dtype == torch.float64:
        return 0.0
    truth = float64_answer(flow, z, cond) if truth is None else truth
    return None if truth is None else max_abs_error(reference.double(), truth)


def _double(value: Any) -> Any:
    """Floating tensors (also inside a tuple) in float64; anything else as it is."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, tuple):
        return tuple(_double(v) for v in value)
    return value
