"""What a Jacobi-type solver does with a sample whose iteration diverges: detect it, then a policy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from .solution import Status

__all__ = ["Watch", "DivergencePolicy", "FallBack", "GiveUp", "POLICIES", "as_policy"]

Resolve = Callable[[Tensor, int, int], tuple[Tensor, Tensor]]
"""`resolve(samples, start, stop) -> (iterations, status)`: solve rows `[start, stop)` of
`samples` again from the noise, by the same solver, rows before `start` being exact."""


class Watch:
    """Flags samples whose update is non-finite or has grown `patience` iterations in a row."""

    def __init__(self, batch: int, patience: int, like: Tensor):
        self.patience = patience
        self.previous = torch.full((batch,), math.inf, dtype=like.dtype, device=like.device)
        self.growth = torch.zeros(batch, dtype=torch.long, device=like.device)

    def diverging(self, samples: Tensor, distance: Tensor) -> Tensor:
        """Record the update sizes of `samples` (increasing indices); `(len(samples),)` bool of those diverging."""
        if samples.numel() == self.growth.numel():  # every sample, in order: no gathers
            growth = self.growth.add_(1).mul_(distance > self.previous)
            self.previous.copy_(distance)
        else:
            grew = distance > self.previous[samples]
            growth = torch.where(grew, self.growth[samples] + 1, torch.zeros_like(grew, dtype=torch.long))
            self.growth[samples] = growth
            self.previous[samples] = distance
        return ~torch.isfinite(distance) | (growth >= self.patience)


@runtime_checkable
class DivergencePolicy(Protocol):
    """What happens to diverging samples whose rows before `exact` are exact and finite.

    `handle(x, samples, exact, stop, resolve)` may rewrite `x[samples, exact:stop]` and returns
    `(iterations, status)`, each `(len(samples),)`: the extra iterations spent and the status.
    """

    def handle(self, x: Tensor, samples: Tensor, exact: int, stop: int,
               resolve: Resolve) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class FallBack:
    """Re-solve from the exact prefix on two halves, each falling back again: down to serial.

    Length-1 halves are exact after one iteration, so the recursion ends. The result is the
    serial answer (or `NONFINITE` where serial overflows too); the status is `FELL_BACK`.
    """

    name = "fall_back"

    def handle(self, x: Tensor, samples: Tensor, exact: int, stop: int,
               resolve: Resolve) -> tuple[Tensor, Tensor]:
        middle = (exact + stop + 1) // 2
        iterations = torch.zeros(samples.numel(), dtype=torch.long, device=x.device)
        status = torch.full_like(iterations, Status.FELL_BACK)
        for start, end in ((exact, middle), (middle, stop)):
            if start < end:
                spent, outcome = resolve(samples, start, end)
                iterations += spent
                status = torch.maximum(status, outcome)
        return iterations, status


@dataclass(frozen=True)
class GiveUp:
    """Stop at once: the rows after the exact prefix become NaN and the status `GAVE_UP`.

    Much cheaper than falling back, but it may give up on a sample that serial would finish.
    """

    name = "give_up"

    def handle(self, x: Tensor, samples: Tensor, exact: int, stop: int,
               resolve: Resolve) -> tuple[Tensor, Tensor]:
        x[samples, exact:stop] = math.nan
        iterations = torch.zeros(samples.numel(), dtype=torch.long, device=x.device)
        return iterations, torch.full_like(iterations, Status.GAVE_UP)


POLICIES: dict[str, DivergencePolicy] = {"fall_back": FallBack(), "give_up": GiveUp()}
"""The policies a solver's `on_divergence` can name."""

PolicyLike = Union[str, DivergencePolicy]


def as_policy(policy: PolicyLike) -> DivergencePolicy:
    """The policy named `policy` (see `POLICIES`), or `policy` itself."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"on_divergence must be one of {sorted(POLICIES)} or a DivergencePolicy; "
                             f"got {policy!r}")
        return POLICIES[policy]
    if not isinstance(policy, DivergencePolicy):
        raise TypeError(f"on_divergence must be a policy name or a DivergencePolicy; got {policy!r}")
    return policy
