"""The Jacobi sweep over one segment: iterate, stop each sample by the rule, hand divergence to a policy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._evaluate import Evaluator
from .divergence import DivergencePolicy, Watch
from .solution import Status
from .stopping import StoppingRule

__all__ = ["SweepOptions", "Outcome", "NotCausalError", "sweep"]


@dataclass(frozen=True)
class SweepOptions:
    """How a segment is iterated: the stopping rule, divergence watch and policy, batch shape."""

    rule: StoppingRule
    patience: int
    policy: DivergencePolicy
    drop_converged: bool


@dataclass
class Outcome:
    """Per-sample result of sweeping one segment (all `B` samples; others untouched)."""

    iterations: Tensor  # (B,)
    residuals: Tensor  # (K, B), nan where a sample was not iterating
    status: Tensor  # (B,)


def sweep(ev: Evaluator, x: Tensor, start: int, stop: int, samples: Tensor, *, max_iters: int,
          first_exact: int, options: SweepOptions) -> Outcome:
    """Jacobi on rows `[start, stop)` of `samples`, earlier rows frozen; updates `x` in place.

    Iteration `k` computes $X^{k+1} = F(X^k)$ on the rows not yet exact: after it, rows
    `< start + first_exact + k` equal the serial answer, so the sweep ends at `stop` at the
    latest (the exactness bound). While every sample is swept, exact rows are committed to a
    KV cache as they become exact.
    """
    batch = x.shape[0]
    iterations = torch.zeros(batch, dtype=torch.long, device=x.device)
    status = torch.zeros(batch, dtype=torch.long, device=x.device)
    history: list[tuple[Tensor, Tensor]] = []
    watch = Watch(batch, options.patience, x)
    finite = ev.finite_noise(samples)
    if not bool(finite.all()):  # non-finite noise: no solver can give a finite answer
        x[samples[~finite], start:stop] = math.nan
        status[samples[~finite]] = Status.NONFINITE
    active = samples[finite]
    exact = start + first_exact
    for _ in range(max_iters):
        if exact >= stop or active.numel() == 0:
            break
        # Full-pass blocks also recompute the last row this sweep made exact, for free: with
        # the rows before it frozen, it must not move.
        recheck = exact > start and not ev.cached
        new = _evaluate(ev, x, samples, active, exact - recheck, stop, options.drop_converged)
        if recheck:
            _check_still(ev, x[active, exact - 1], new[:, 0], exact - 1)
            new = new[:, 1:]
        old = x[:, exact:stop] if active.numel() == batch else x[active, exact:stop]
        distance = options.rule.distance(new, old)
        converged = options.rule.met(distance, new)
        if active.numel() == batch:
            x[:, exact:stop] = new
        else:
            x[active, exact:stop] = new
        del new, old
        exact += 1
        iterations[active] += 1
        history.append((active, distance))
        if exact >= stop:
            break
        diverging = watch.diverging(active, distance)
        if bool(diverging.any()):
            _diverged(ev, x, active[diverging], exact, stop, iterations, status, options)
        if samples.numel() == batch:  # rows < exact are final for every sample
            ev.commit(x, exact)
        active = active[~(converged | diverging)]
    if exact < stop and active.numel():
        status[active] = Status.MAX_ITERS
    return Outcome(iterations, _residuals(history, batch, x), status)


class NotCausalError(ValueError):
    """A block's update of a row changed although every row before it was final.

    Attributes:
        row: the row that moved.
        moved: by how much (max-abs over the samples and channels that moved).
    """

    def __init__(self, message: str, row: int, moved: float):
        super().__init__(message)
        self.row, self.moved = row, moved


def _check_still(ev: Evaluator, before: Tensor, after: Tensor, row: int) -> None:
    """Raise `NotCausalError` if exact row `row` moved by more than rounding when recomputed."""
    eps = torch.finfo(before.dtype).eps
    moved = (after - before).abs().amax(dim=-1)
    limit = 1e3 * eps * (1 + before.abs().amax(dim=-1))
    bad = torch.isfinite(moved) & (moved > limit)
    if bool(bad.any()):
        raise NotCausalError(
            f"{type(ev.block).__name__} is not causal: row {row} of its update changed by "
            f"{float(moved[bad].max()):.3g} after rows 0..{row} were final (row t may read only "
            "x[:, :t]); the solvers would converge to a wrong answer. "
            "arflow_solvers.testing.check_causal names the positions that leak.",
            row, float(moved[bad].max()),
        )


def _diverged(ev: Evaluator, x: Tensor, suspects: Tensor, exact: int, stop: int,
              iterations: Tensor, status: Tensor, options: SweepOptions) -> None:
    """Hand diverging samples to the policy; those whose exact prefix overflowed stop here."""
    # A non-finite exact prefix is the serial answer itself overflowing: nothing can help.
    hopeless = ~torch.isfinite(x[suspects, :exact].flatten(1)).all(1)
    status[suspects[hopeless]] = Status.NONFINITE
    suspects = suspects[~hopeless]
    if suspects.numel() == 0:
        return

    def resolve(samples: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        x[samples, lo:hi] = ev.noise(samples, lo, hi)
        outcome = sweep(ev, x, lo, hi, samples, max_iters=hi - lo, first_exact=0, options=options)
        return outcome.iterations[samples], outcome.status[samples]

    spent, outcome = options.policy.handle(x, suspects, exact, stop, resolve)
    iterations[suspects] += spent
    status[suspects] = outcome


def _evaluate(ev: Evaluator, x: Tensor, samples: Tensor, active: Tensor, start: int, stop: int,
              drop_converged: bool) -> Tensor:
    """New rows `[start, stop)` of the `active` samples, without copying when all are active."""
    batch = x.shape[0]
    if active.numel() == batch:
        return ev.update(x, None, start, stop)
    if drop_converged:
        return ev.update(x[active], active, start, stop)
    # Evaluate every sample of the segment so the network always sees the same batch shape.
    if samples.numel() == batch:
        new = ev.update(x, None, start, stop)
    else:
        new = ev.update(x[samples], samples, start, stop)
    return new[torch.searchsorted(samples, active)]


def _residuals(history: list[tuple[Tensor, Tensor]], batch: int, like: Tensor) -> Tensor:
    """`(K, B)` update sizes per iteration, `nan` where a sample was not iterating."""
    residuals = torch.full((len(history), batch), math.nan, dtype=like.dtype, device=like.device)
    for k, (members, distance) in enumerate(history):
        residuals[k, members] = distance
    return residuals
