"""zuko's monotonic rational-quadratic spline inverse on a flat set of elements, operation for operation.

zuko builds a `MonotonicRQSTransform` from `(B, F, K)` parameters and inverts `(B, F)`
values; the exact mode's certified sweeps (see `MaskedARBlock.inverse_map_rows`) only need the
elements whose rows are not final yet, gathered into `(N, 3K - 1)` parameters and `(N,)`
values. `rqs_inverse` computes the same arithmetic as zuko in the same order, each operation
elementwise (or along one element's bins), without zuko's broadcasts, stacks and unpacking
copies. The solvers never rely on it for exactness: a certified sweep checks its answer with
zuko's own code.

References:
    Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["rqs_options", "rqs_inverse"]


def rqs_options(univariate: Any, shapes: Any) -> dict[str, float] | None:
    """`{"bins", "bound", "slope"}` of a zuko `MonotonicRQSTransform` univariate, or `None` for anything else.

    The univariate must be the class itself or a `functools.partial` of it by keywords (as
    zuko's `NSF` builds it), reading parameters of shapes `[(K,), (K,), (K - 1,)]`.
    """
    try:
        from zuko.transforms import MonotonicRQSTransform
    except ImportError:  # pragma: no cover - zuko is what calls this
        return None
    keywords: dict[str, Any] = {}
    while isinstance(univariate, functools.partial):
        if univariate.args:
            return None
        keywords = {**univariate.keywords, **keywords}
        univariate = univariate.func
    if univariate is not MonotonicRQSTransform or set(keywords) - {"bound", "slope"}:
        return None
    sizes = [tuple(shape) for shape in shapes]
    if len(sizes) != 3 or any(len(size) != 1 for size in sizes):
        return None
    bins = sizes[0][0]
    if sizes != [(bins,), (bins,), (bins - 1,)]:
        return None
    defaults = inspect.signature(MonotonicRQSTransform).parameters
    return {"bins": bins, "bound": float(keywords.get("bound", defaults["bound"].default)),
            "slope": float(keywords.get("slope", defaults["slope"].default))}


def _soft(values: Tensor, factor: int, log_slope: float) -> Tensor:
    """zuko's soft clip of unconstrained parameters, `v / (1 + |factor v / log(slope)|)`."""
    scaled = values * factor if factor != 1 else values
    return values / (1 + abs(scaled / log_slope))


def _knots(unnormalised: Tensor, bound: float) -> Tensor:
    """The `K + 1` knots `bound (2 cumsum([0, softmax(w)]) - 1)` of each element."""
    cumulative = torch.cumsum(F.pad(F.softmax(unnormalised, dim=-1), (1, 0), value=0), dim=-1)
    return bound * (2 * cumulative - 1)


def rqs_inverse(params: Tensor, y: Tensor, bins: int, bound: float, slope: float) -> Tensor:
    """`MonotonicRQSTransform(widths, heights, derivatives, bound, slope).inv(y)` for `(N, 3K - 1)` params, `(N,)` y."""
    log_slope = math.log(slope)
    widths, heights, derivatives = params.split((bins, bins, bins - 1), dim=-1)
    horizontal = _knots(_soft(widths, 2, log_slope), bound)
    vertical = _knots(_soft(heights, 2, log_slope), bound)
    slopes = torch.exp(F.pad(_soft(derivatives, 1, log_slope), (1, 1), value=0))

    k = torch.sum(vertical < y[..., None], dim=-1) - 1
    mask = torch.logical_and(0 <= k, k < bins)
    k = (k % bins).unsqueeze(-1)
    k1 = k + 1
    x0, x1 = horizontal.gather(-1, k).squeeze(-1), horizontal.gather(-1, k1).squeeze(-1)
    y0, y1 = vertical.gather(-1, k).squeeze(-1), vertical.gather(-1, k1).squeeze(-1)
    d0, d1 = slopes.gather(-1, k).squeeze(-1), slopes.gather(-1, k1).squeeze(-1)

    s = (y1 - y0) / (x1 - x0)
    y_ = mask * (y - y0)
    a = (y1 - y0) * (s - d0) + y_ * (d0 + d1 - 2 * s)
    b = (y1 - y0) * d0 - y_ * (d0 + d1 - 2 * s)
    c = -s * y_
    z = 2 * c / (-b - (b**2 - 4 * a * c).sqrt())
    x = x0 + z * (x1 - x0)
    return torch.where(mask, x, y)
