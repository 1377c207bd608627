r"""A plan's promise checked on held-out noise: per-sample errors, and the largest of many estimated from few.

A planner promises a max-abs error over the samples a user will draw, many more than it can
afford to check. Per-sample errors of an iterative plan are spread over orders of magnitude
(a few ill-conditioned noise vectors amplify rounding), so the largest of `n` held-out errors
understates the largest of `N > n`. The estimate here fits a normal distribution to the
logarithms of the non-zero held-out errors and reads its quantile at $1 - 1/N$ (corrected for
the share of exact zeros), never less than the largest error observed. It is an estimate of
the worst case over `N` samples, not a bound.

Samples on which the flow's own serial sampling (in its dtype) is further than `max_error`
from a float64 solve are not judged: no plan can keep a promise there, and counting them
would make every promise fail for reasons no plan controls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from .._evaluate import select_rows
from ..flow import Flow
from ..solve import solve
from ..solution import finite_samples
from ..solvers import Serial
from ._float64 import float64_answer

__all__ = ["per_sample_errors", "largest_of", "HeldOut"]


def per_sample_errors(x: Tensor, reference: Tensor) -> Tensor:
    """`(B,)` max-abs error of each sample vs `reference` (`inf` where `x` is not finite)."""
    return (x - reference).abs().flatten(1).nan_to_num(math.inf).amax(1).double()


def largest_of(errors: Tensor, count: int) -> float:
    """An estimate of the largest of `count` errors drawn like the per-sample `errors`.

    Examples:
        >>> import torch
        >>> largest_of(torch.zeros(8), 1000)  # an exact plan stays exact
        0.0
        >>> errors = torch.tensor([1e-6, 1e-5, 1e-4], dtype=torch.float64)
        >>> largest_of(errors, 3)  # no more samples than observed
        0.0001
        >>> largest_of(errors, 1000) > 1e-4
        True
    """
    if errors.numel() == 0:
        return 0.0
    observed = float(errors.max())
    positive = errors[errors > 0]
    if count <= errors.numel() or positive.numel() < 2 or not math.isfinite(observed):
        return observed
    tail = 1.0 / (count * positive.numel() / errors.numel())  # P(error > q | error > 0)
    if tail >= 1:
        return observed
    logs = positive.log()
    quantile = float(logs.mean()) + float(logs.std()) * NormalDist().inv_cdf(1 - tail)
    return max(observed, math.exp(quantile))


@dataclass(frozen=True)
class HeldOut:
    """The held-out samples a plan is judged on, with their serial answer.

    Attributes:
        flow, z, cond: the flow and the judged held-out samples.
        serial: serial sampling of them, in their dtype.
        excluded: held-out samples not judged (their serial answer is further than
            `max_error` from float64, or not finite).
    """

    flow: Flow
    z: Tensor
    cond: Any
    serial: Tensor
    excluded: int

    @classmethod
    def of(cls, flow: Flow, z: Tensor, cond: Any, max_error: float) -> HeldOut:
        """Solve the held-out samples serially and keep those a plan can be judged on."""
        serial = solve(flow, z, Serial(), cond=cond, throw=False).x
        judged = finite_samples(serial)
        if z.dtype != torch.float64 and z.shape[0]:
            truth = float64_answer(flow, z, cond)
            if truth is not None:
                judged &= per_sample_errors(serial.double(), truth).to(judged.device) <= max_error
        rows = torch.nonzero(judged).flatten()
        return cls(flow, z[rows], select_rows(cond, rows, z.shape[0]), serial[rows],
                   int(z.shape[0] - rows.numel()))

    def errors(self, plan: Any) -> Tensor:
        """`(n,)` per-sample errors of `plan` vs serial on the judged samples."""
        if self.z.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64)
        return per_sample_errors(solve(self.flow, self.z, plan, cond=self.cond, throw=False).x, self.serial)
