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

__all__ = ["SweepOptions", "Outcome", "NotCausalError", "sweep", "certify_rows", "iterated_rows", "MIN_ROWS"]

MIN_ROWS = 16
"""A shrunk batch is padded with other samples to at least this many rows: matrix-multiply
kernels take other paths, which round otherwise, for a handful of rows."""


@dataclass(frozen=True)
class SweepOptions:
    """How a segment is iterated: the stopping rule, divergence watch and policy, batch shape.

    `drop_converged` evaluates only the samples still iterating. `certify` (the exact mode)
    evaluates every sample while more than half of them iterate, then only those, and
    finally checks the answer of every sample with one evaluation at the full batch shape.
    """

    rule: StoppingRule
    patience: int
    policy: DivergencePolicy
    drop_converged: bool
    certify: bool = False


@dataclass
class Outcome:
    """Per-sample result of sweeping one segment (all `B` samples; others untouched)."""

    iterations: Tensor  # (B,)
    residuals: Tensor  # (K, B), nan where a sample was not iterating
    status: Tensor  # (B,)
    uncertified_from: int | None = None  # the first row a deferred certification must check


def sweep(ev: Evaluator, x: Tensor, start: int, stop: int, samples: Tensor, *, max_iters: int,
          first_exact: int, options: SweepOptions, defer_certification: bool = False) -> Outcome:
    """Jacobi on rows `[start, stop)` of `samples`, earlier rows frozen; updates `x` in place.

    Iteration `k` computes $X^{k+1} = F(X^k)$ on the rows not yet exact: after it, rows
    `< start + first_exact + k` equal the serial answer, so the sweep ends at `stop` at the
    latest (the exactness bound). While every sample is swept, exact rows are committed to a
    KV cache as they become exact.

    In the exact mode (`options.certify`) the network may round a row differently for a
    smaller batch, so the answer of a shrunk batch is a fixed point of another map. One
    evaluation of every sample at the full batch shape then certifies it: a sample none of
    whose rows moves is the fixed point of the full-shape map, which is unique (the map is
    causal) and is the serial answer. A sample that moves goes on at the full shape, from
    the rows that did not.

    Rows that stopped moving are final too: for a block that can compute some rows alone
    (`inverse_map_rows`), the exact prefix then jumps past the leading rows no sample moved,
    and the exact mode evaluates only the segment's rows after it, skipping each sample's
    final rows. That cheaper map may round otherwise, so an answer found with it is
    certified in the same way.

    Rows that no row reads (from the block's `unread_from`) depend only on the rows before
    them: the exact mode iterates the rows before them alone, then computes them once. So
    does a sweep to a tolerance, whose rule then measures the rows it iterates; its last
    iteration computes them, converged or not.

    `defer_certification`: sweep to the end of the segment without certifying, and say from
    which row [`certify_rows`][arflow_solvers._sweep.certify_rows] must (one certification
    for all the segments of a solve, instead of one each).
    """
    mode = _mode(options, ev, samples, x.shape[0])
    end = min(max(_iterated(ev, mode, options), start), stop)
    segment = _Segment(ev, x, start, stop, samples, options, deferring=defer_certification, end=end)
    active = segment.finite_samples()
    closing = mode == "drop" and end < stop  # the last iteration computes the rows nothing reads
    budget = max_iters - 1 if closing else max_iters
    active, exact, used = segment.iterate(active, start + first_exact, budget, mode)
    if end < stop and not segment.leave_unread_to_certification():
        active, exact = segment.unread_rows(active, exact, closing)
    if segment.shrunk_from is not None and defer_certification:
        return segment.outcome(active, exact, segment.shrunk_from)
    if segment.shrunk_from is not None:
        active, exact = segment.certify(active, exact)
        to_bound = max_iters >= stop - start - first_exact
        budget = stop - exact if to_bound else max_iters - used - 1
        active, exact, _ = segment.iterate(active, exact, budget, "fixed")
    return segment.outcome(active, exact)


def certify_rows(ev: Evaluator, x: Tensor, lo: int, stop: int, status: Tensor, options: SweepOptions) -> Outcome:
    """Certify rows `[lo, stop)` of every sample swept with deferred certification; finish those that move.

    One evaluation of every sample at the full shape; samples whose `status` is not
    `CONVERGED` are not checked. A sample that moves goes on at the full shape, from its
    rows that did not, to the exactness bound.
    """
    everyone = torch.arange(x.shape[0], device=x.device)
    segment = _Segment(ev, x, lo, stop, everyone, options)
    segment.status.copy_(status)
    segment._shrink(lo)
    active, exact = segment.certify(everyone, lo)
    active, exact, _ = segment.iterate(active, exact, stop - exact, "fixed")
    return segment.outcome(active, exact)


def iterated_rows(ev: Evaluator, options: SweepOptions) -> int:
    """How many leading rows the exact mode's sweep of every sample iterates (the others are computed once)."""
    return ev.unread_from if _mode(options, ev, None, ev.batch_size) == "certify" else ev.seq_len


def _iterated(ev: Evaluator, mode: str, options: SweepOptions) -> int:
    """The rows a sweep in `mode` iterates: only those some row reads, in the exact mode or to a tolerance."""
    if mode == "certify" or (mode == "drop" and options.rule.tolerates):
        return ev.unread_from
    return ev.seq_len


def _mode(options: SweepOptions, ev: Evaluator, samples: Tensor | None, batch: int) -> str:
    """`"certify"` (exact mode over the whole batch), `"drop"` or `"fixed"` (batch shape kept).

    `samples`: those swept, `None` for all.
    """
    everyone = samples is None or samples.numel() == batch
    if options.certify and everyone and not ev.cached and batch > 2 * MIN_ROWS:
        return "certify"
    return "drop" if options.drop_converged else "fixed"


class _Segment:
    """The state of one sweep: the iterate, per-sample counts, statuses and update history."""

    def __init__(self, ev: Evaluator, x: Tensor, start: int, stop: int, samples: Tensor,
                 options: SweepOptions, deferring: bool = False, end: int | None = None):
        self.ev, self.x, self.start, self.stop, self.samples, self.options = ev, x, start, stop, samples, options
        self.end = stop if end is None else end  # rows from here on are read by no row: computed once
        batch = x.shape[0]
        self.iterations = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.status = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.history: list[tuple[Tensor, Tensor]] = []
        self.watch = Watch(batch, options.patience, x)
        self.shrunk_from: int | None = None  # the first row computed on a shrunk batch (certify mode)
        self.checked_to = stop  # certification checks the rows before; it computes the others from them
        self.settled = torch.full((batch,), start, dtype=torch.long, device=x.device)  # rows before: final
        self.deferring = deferring  # certification left to the caller: sweep every row

    def finite_samples(self) -> Tensor:
        """The samples whose noise is finite; the others get NaN rows and `NONFINITE` now."""
        finite = self.ev.finite_noise(self.samples)
        if bool(finite.all()):  # non-finite noise: no solver can give a finite answer
            return self.samples
        bad = self.samples[~finite]
        self.x[bad, self.start:self.stop] = math.nan
        self.status[bad] = Status.NONFINITE
        return self.samples[finite]

    def iterate(self, active: Tensor, exact: int, budget: int, mode: str) -> tuple[Tensor, int, int]:
        """Up to `budget` iterations from exact prefix `exact`; returns `(active, exact, iterations)`."""
        ev, x, stop, options = self.ev, self.x, self.end, self.options
        used = 0
        while used < budget and exact < stop and active.numel():
            if mode == "certify" and self.shrunk_from is not None and not self.deferring and stop == self.stop and (
                    used == budget - 1 or exact == stop - 1):
                break  # the last iteration is the certifying one (after it, the sweep runs to the end)
            # Full-pass blocks also recompute the last row this sweep made exact, for free: with
            # the rows before it frozen, it must not move.
            recheck = exact > self.start and not ev.cached
            new = self._evaluate(active, exact - recheck, mode, exact)
            everyone = active.numel() == x.shape[0]
            if recheck:
                _check_still(ev, x[:, exact - 1] if everyone else x[active, exact - 1], new[:, 0], exact - 1)
                new = new[:, 1:]
            old = x[:, exact:stop] if everyone else x[active, exact:stop]  # overwritten just below
            distance = options.rule.distance(new, old, overwrite=True)  # `old` now holds the update
            converged = options.rule.met(distance, new)
            # only a block that computes rows apart, each sample's from its own, gains from knowing more of them final
            settled = self._settle(active, old, exact) if mode != "drop" and ev.reads_settled else exact + 1
            if everyone:
                x[:, exact:stop] = new
            else:
                x[active, exact:stop] = new
            del new, old
            exact = settled
            used += 1
            if everyone:
                self.iterations += 1
            else:
                self.iterations[active] += 1
            self.history.append((active, distance))
            if exact >= stop:
                break
            diverging = self.watch.diverging(active, distance)
            if bool(diverging.any()):
                _diverged(ev, x, active[diverging], exact, stop, self.iterations, self.status, options)
            if self.samples.numel() == x.shape[0]:  # rows < exact are final for every sample
                ev.commit(x, exact)
            active = active[~(converged | diverging)]
        return active, exact, used

    def _settle(self, active: Tensor, update: Tensor, exact: int) -> int:
        """Record the rows of each sample found final by an iteration; returns the exact prefix of them all.

        `update` is the `(b, rows, D)` update of rows `exact, exact + 1, ...` of the `active`
        samples. Per sample, the rows before the first that moved were a fixed point already
        (each is computed from the rows before it, which did not move either), and that row was
        computed from them: all are final, for a map that stays the same between iterations.
        """
        reached = (_first_moved(update) + exact + 1).clamp_(max=self.end)
        self.settled[active] = torch.maximum(self.settled[active], reached)
        return int(reached.min())

    def _evaluate(self, active: Tensor, start: int, mode: str, exact: int) -> Tensor:
        """New rows `[start, stop)` of the `active` samples, without copying when all are active."""
        ev, x, samples = self.ev, self.x, self.samples
        settled = None
        if mode == "certify" and ev.has_rows and (start > 0 or self.end < ev.seq_len):
            # rows [start, stop) only, each sample's final rows skipped: a cheaper map that may
            # round otherwise, so the answer is certified at the end
            self._shrink(exact)
            settled = self.settled
        if mode == "drop" and self.end < self.stop:
            settled = self.settled  # the rows before the ones nothing reads, alone
        if active.numel() == x.shape[0]:
            return ev.update(x, None, start, self.end, settled)
        if mode == "drop":
            return ev.update(x[active], active, start, self.end, settled)
        if mode == "certify" and 2 * active.numel() <= samples.numel() and exact < self.end - 1:
            self._shrink(exact)
            rows = _padded(active, samples, x.shape[0])
            return ev.update(x[rows], rows, start, self.end, settled)[: active.numel()]
        # Evaluate every sample of the segment so the network sees the same batch shape.
        if samples.numel() == x.shape[0]:
            new = ev.update(x, None, start, self.end, settled)
        else:
            new = ev.update(x[samples], samples, start, self.end, settled)
        return new[torch.searchsorted(samples, active)]

    def unread_rows(self, active: Tensor, exact: int, closing: bool = False) -> tuple[Tensor, int]:
        """Rows `[end, stop)`, which no row reads, once from the rows before them, if those are final.

        `closing`: the last iteration of a sweep to a tolerance, made even short of the bound
        and not certified. Returns the samples still iterating and the exact prefix; the sweep
        goes on (if at all) over every row to `stop`.
        """
        end, stop, x = self.end, self.stop, self.x
        self.end = stop
        short = exact < end and bool(active.numel())  # out of iterations short of the bound
        if short and not closing:
            return active, exact
        finite = self.samples[self.ev.finite_noise(self.samples)]
        rows = None if finite.numel() == x.shape[0] else finite
        skip = torch.full((x.shape[0],), end, dtype=torch.long, device=x.device)
        new = self.ev.update(x if rows is None else x[rows], rows, end, stop, skip)
        old = x[finite, end:stop]
        x[finite, end:stop] = new
        if not closing:  # the exact mode certifies them
            self._shrink(end)
        self.iterations[finite] += 1
        self.history.append((finite, self.options.rule.distance(new, old)))
        return (active, exact) if short else (active[:0], stop)

    def leave_unread_to_certification(self) -> bool:
        """Whether the certifying call computes rows `[end, stop)` from the rows it checks (not a call before it).

        Only where the block proves that its whole map does not read them (`unread_proven`),
        and the sweep certifies its answer now.
        """
        if self.shrunk_from is None or self.deferring or not self.ev.unread_proven:
            return False
        self.checked_to, self.end = self.end, self.stop
        return True

    def _shrink(self, row: int) -> None:
        """Record that rows from `row` were computed by a map that may round otherwise (the first record stays)."""
        if self.shrunk_from is None:
            self.shrunk_from = row

    def certify(self, active: Tensor, exact: int) -> tuple[Tensor, int]:
        """One evaluation of every sample at the full shape; returns those that moved and their exact prefix.

        Rows before `shrunk_from` were computed at the full shape. For each sample the rows
        before the first one that moves are the fixed point, so that row, computed from them,
        is final; a sample none of whose rows moves (but the last) is done. Rows from
        `checked_to` on are read by no row (the block proves it): they are not checked but
        computed, and a sample whose checked rows all stay is done.
        """
        x, lo, stop, checked_to = self.x, self.shrunk_from, self.stop, self.checked_to
        new = self.ev.update(x, None, lo, stop)
        checked = self.samples[(self.status[self.samples] == Status.CONVERGED) & self.ev.finite_noise(self.samples)]
        if torch.equal(new[:, : checked_to - lo], x[:, lo:checked_to]):  # the usual outcome: nothing to gather
            x[:, lo:stop] = new  # equal values, the full map's bits (a zero's sign)
            self.iterations[checked] += 1
            self.history.append((checked, new.new_zeros(checked.shape)))
            return active[:0], stop
        new, old = new[checked], x[checked, lo:stop]
        moved = (new[:, : checked_to - lo] != old[:, : checked_to - lo]).to(new.dtype)
        first = _first_moved(moved) + lo  # an infinity that stays is not a move
        x[checked, lo:stop] = new
        self.iterations[checked] += 1
        self.history.append((checked, self.options.rule.distance(new, old)))
        # the last row is computed from rows that stayed, unless later rows were computed from it
        going_on = first < (stop - 1 if checked_to == stop else checked_to)
        if not bool(going_on.any()):
            return active[:0], stop
        return checked[going_on], int(first[going_on].min()) + 1

    def outcome(self, active: Tensor, exact: int, uncertified_from: int | None = None) -> Outcome:
        """The result; samples still iterating short of the bound get `MAX_ITERS`."""
        if exact < self.stop and active.numel():
            self.status[active] = Status.MAX_ITERS
        return Outcome(self.iterations, _residuals(self.history, self.x.shape[0], self.x), self.status,
                       uncertified_from)


def _first_moved(update: Tensor) -> Tensor:
    """`(b,)`: each sample's first row (of the `(b, rows, D)` update) that is not zero, `rows` if none.

    Weighs the rows' signs by `rows, ..., 1` and takes the largest: float reductions, many
    times faster than `argmax` over a boolean tensor. A sample with a NaN (whose sign is 0)
    or an infinity moved, as far as this can tell, at its first row.
    """
    rows = update.shape[1]
    if rows == 0 or update.shape[2] == 0:
        return torch.full(update.shape[:1], rows, dtype=torch.long, device=update.device)
    moved = torch.sign(update).abs_()  # 1 where moved, else 0
    if moved.dtype not in (torch.float32, torch.float64):
        moved = moved.float()  # row weights as exact integers
    weights = torch.arange(rows, 0, -1, dtype=moved.dtype, device=update.device).view(1, rows, 1)
    first = rows - moved.mul_(weights).amax((1, 2)).long()
    return first.masked_fill_(~torch.isfinite(update.sum((1, 2))), 0)


def _padded(active: Tensor, samples: Tensor, batch: int) -> Tensor:
    """`active` followed by other `samples`, at least `MIN_ROWS` rows in all."""
    missing = MIN_ROWS - active.numel()
    if missing <= 0:
        return active
    member = torch.zeros(batch, dtype=torch.bool, device=active.device)
    member[active] = True
    return torch.cat([active, samples[~member[samples]][:missing]])


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
    if torch.equal(before, after):
        return
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


def _residuals(history: list[tuple[Tensor, Tensor]], batch: int, like: Tensor) -> Tensor:
    """`(K, B)` update sizes per iteration, `nan` where a sample was not iterating."""
    residuals = torch.full((len(history), batch), math.nan, dtype=like.dtype, device=like.device)
    for k, (members, distance) in enumerate(history):
        residuals[k, members] = distance
    return residuals
