"""Serial, Jacobi and GS-Jacobi inversion of one autoregressive block."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor

from . import init as inits
from ._evaluate import Evaluator
from .solution import BlockStats, Status

__all__ = ["Solver", "Serial", "Jacobi", "GSJacobi", "segment_bounds"]


def segment_bounds(seq_len: int, segments: int | Sequence[int]) -> tuple[tuple[int, int], ...]:
    """`(start, stop)` of each segment; a count `M` gives the first `T mod M` one more position.

    Example:
        >>> segment_bounds(10, 3)
        ((0, 4), (4, 7), (7, 10))
        >>> segment_bounds(10, [2, 8])
        ((0, 2), (2, 10))
    """
    if isinstance(segments, int):
        if not 1 <= segments:
            raise ValueError(f"segments must be >= 1; got {segments}")
        count = min(segments, seq_len)
        base, extra = divmod(seq_len, count)
        lengths = [base + (i < extra) for i in range(count)]
    else:
        lengths = [int(n) for n in segments]
        if any(n < 1 for n in lengths) or sum(lengths) != seq_len:
            raise ValueError(
                f"segment lengths must be positive and sum to seq_len={seq_len}; got {lengths}"
            )
    edges = [0]
    for n in lengths:
        edges.append(edges[-1] + n)
    return tuple(zip(edges[:-1], edges[1:]))


def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


@dataclass
class _Segment:
    """Per-sample outcome of solving one segment."""

    iterations: Tensor
    residuals: Tensor
    status: Tensor


def _jacobi_segment(
    ev: Evaluator,
    x: Tensor,
    start: int,
    stop: int,
    rows: Tensor,
    *,
    max_iters: int,
    tol: float,
    atol: float,
    patience: int,
    first_exact: int,
    drop_converged: bool = True,
    give_up: bool = False,
) -> _Segment:
    """Jacobi on rows `[start, stop)` of samples `rows`, earlier rows frozen; updates `x`.

    After `k` iterations rows `< start + first_exact + k` are exact, so they are not updated
    again (and are committed to a KV cache while no sample has diverged), and the loop ends
    at `stop` at the latest (the exactness bound). A sample leaves
    the active set when its max-abs update is `<= atol + tol * max|x_segment|`, or when its
    update is non-finite or has grown `patience` times in a row (then it is re-solved with
    halved segments from its exact prefix, down to serial). With `give_up`, such a sample
    stops at once as `NONFINITE` instead: its rows from the exact prefix on become NaN.
    """
    batch = x.shape[0]
    iterations = torch.zeros(batch, dtype=torch.long, device=x.device)
    status = torch.zeros(batch, dtype=torch.long, device=x.device)
    history: list[tuple[Tensor, Tensor]] = []
    previous = torch.full((batch,), math.inf, dtype=x.dtype, device=x.device)
    growth = torch.zeros(batch, dtype=torch.long, device=x.device)
    bad_rows: list[tuple[Tensor, int]] = []
    exact = start + first_exact
    finite = ev.finite[rows]
    if not bool(finite.all()):  # non-finite noise: no solver can give a finite answer
        x[rows[~finite], start:stop] = math.nan
        status[rows[~finite]] = Status.NONFINITE
    active = rows[finite]
    for _ in range(max_iters):
        if exact >= stop or active.numel() == 0:
            break
        new = _evaluate(ev, x, rows, active, exact, stop, drop_converged)
        everyone = active.numel() == batch
        old = x[:, exact:stop] if everyone else x[active, exact:stop]
        delta = (new - old).abs_().amax(dim=(1, 2))
        threshold = atol + tol * _max_abs(new) if tol > 0 else atol
        if everyone:
            x[:, exact:stop] = new
        else:
            x[active, exact:stop] = new
        del new, old
        exact += 1
        iterations[active] += 1
        history.append((active, delta))
        if exact >= stop:
            break
        grew = delta > previous[active]
        growth[active] = torch.where(grew, growth[active] + 1, torch.zeros_like(growth[active]))
        previous[active] = delta
        bad = ~torch.isfinite(delta) | (growth[active] >= patience)
        done = bad | (delta <= threshold)
        if bool(bad.any()):
            suspects = active[bad]
            # A non-finite exact prefix is the serial answer itself overflowing: falling
            # back cannot help, so those samples stop here.
            hopeless = ~torch.isfinite(x[suspects, :exact].flatten(1)).all(1)
            if give_up:  # the caller prefers NaN to a costly re-solve; the exact prefix stays
                x[suspects[~hopeless], exact:stop] = math.nan
                hopeless = torch.ones_like(hopeless)
            status[suspects[hopeless]] = Status.NONFINITE
            if not bool(hopeless.all()):
                bad_rows.append((suspects[~hopeless], exact))
        if not bad_rows and rows.numel() == batch:
            # Rows < exact are final for every sample: a KV cache stops recomputing them.
            # (Not inside a fall-back re-solve of some samples: other samples that diverged
            # may still have to be re-solved from an earlier row.)
            ev.commit(x, exact)
        active = active[~done]
    if exact < stop and active.numel():
        status[active] = Status.MAX_ITERS
    residuals = torch.full((len(history), batch), math.nan, dtype=x.dtype, device=x.device)
    for k, (members, delta) in enumerate(history):
        residuals[k, members] = delta
    for members, exact_upto in bad_rows:
        iterations += _fall_back(ev, x, exact_upto, stop, members, tol=tol, atol=atol,
                                 patience=patience, drop_converged=drop_converged,
                                 give_up=give_up)
        status[members] = Status.FELL_BACK
    return _Segment(iterations, residuals, status)


def _max_abs(new: Tensor) -> Tensor:
    """Per-sample `max |new|`, without materialising `|new|`."""
    return torch.maximum(new.amax(dim=(1, 2)), new.amin(dim=(1, 2)).neg())


def _evaluate(ev: Evaluator, x: Tensor, rows: Tensor, active: Tensor, start: int, stop: int,
              drop_converged: bool) -> Tensor:
    """New rows `[start, stop)` of the `active` samples, without copying when all are active."""
    batch = x.shape[0]
    if active.numel() == batch:
        return ev.update(x, None, start, stop)
    if drop_converged:
        return ev.update(x[active], active, start, stop)
    # Evaluate every sample of the segment so the network always sees the same batch shape.
    new = ev.update(x, None, start, stop) if rows.numel() == batch else ev.update(x[rows], rows, start, stop)
    return new[torch.searchsorted(rows, active)]


def _fall_back(
    ev: Evaluator,
    x: Tensor,
    exact: int,
    stop: int,
    rows: Tensor,
    **options: Any,
) -> Tensor:
    """Re-solve rows `[exact, stop)` of samples `rows` by GS-Jacobi on two halves.

    Rows `< exact` are exact; the rest restart from the noise. Each half falls back again if
    it diverges, so the recursion ends at serial (length-1 halves are exact after one
    iteration). Returns the `(B,)` iterations spent.
    """
    x[rows, exact:stop] = ev.z[rows, exact:stop]
    middle = (exact + stop + 1) // 2
    spent = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for lo, hi in ((exact, middle), (middle, stop)):
        if lo < hi:
            spent += _jacobi_segment(ev, x, lo, hi, rows, max_iters=hi - lo, first_exact=0,
                                     **options).iterations
    return spent


@dataclass(frozen=True)
class Solver:
    """Base of the solvers: an immutable description of how to invert one block."""

    def solve(self, block: Any, z: Tensor, cond: Any = None, index: int = 0) -> tuple[Tensor, BlockStats]:
        """Invert `block` for noise `z` (`(B, T, D)`): returns `x` and its statistics.

        Runs under `torch.no_grad()`; most users call [`solve`][arflow_solvers.solve] instead.
        """
        raise NotImplementedError


@dataclass(frozen=True, repr=False)
class Serial(Solver):
    r"""Invert one position at a time: $T$ steps, the reference every other solver matches.

    With a KV-cached block ([`CachedARBlock`][arflow_solvers.CachedARBlock]) each step
    evaluates one position; otherwise each step is a full network pass.

    Arguments:
        update_dtype: compute `exp(log_sigma) * z + mu` in this dtype (e.g. `torch.float32`
            for a bfloat16 model); `None` keeps the iterate's dtype.

    Example:
        >>> import torch
        >>> from arflow_solvers import Serial, solve_inverse
        >>> class Doubler:  # x_t = z_t + 2 x_{t-1}
        ...     seq_len = 4
        ...     def affine(self, x, cond=None):
        ...         mu = 2 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        ...         return mu, torch.zeros_like(x)
        >>> solve_inverse(Doubler(), torch.ones(1, 4, 1), Serial()).flatten().tolist()
        [1.0, 3.0, 7.0, 15.0]
    """

    update_dtype: torch.dtype | None = None

    @torch.no_grad()
    def solve(self, block: Any, z: Tensor, cond: Any = None, index: int = 0) -> tuple[Tensor, BlockStats]:
        _sync(z)
        began = time.perf_counter()
        ev = Evaluator(block, z, cond, self.update_dtype)
        batch, seq_len = z.shape[:2]
        x = torch.zeros_like(z)
        for t in range(seq_len):
            x[:, t : t + 1] = ev.update(x, None, t, t + 1)
            ev.commit(x, t + 1)
        stats = _block_stats(
            self, index, ev, x, began,
            bounds=tuple((t, t + 1) for t in range(seq_len)),
            iterations=torch.ones(batch, seq_len, dtype=torch.long),
            residuals=(),
            status=torch.zeros(batch, dtype=torch.long, device=z.device),
        )
        return x, stats

    def __repr__(self) -> str:
        return _repr(self, ("update_dtype",))


def _block_stats(solver: Solver, index: int, ev: Evaluator, x: Tensor, began: float, *,
                 bounds: tuple, iterations: Tensor, residuals: tuple, status: Tensor) -> BlockStats:
    """Statistics of a finished block solve; a sample with a non-finite result is `NONFINITE`."""
    _sync(x)
    finite = torch.isfinite(x.flatten(1)).all(1)
    status = torch.where(finite, status, torch.full_like(status, Status.NONFINITE))
    return BlockStats(
        index=index,
        solver=repr(solver),
        bounds=bounds,
        iterations=iterations.cpu(),
        residuals=tuple(r.cpu() for r in residuals),
        status=status.cpu(),
        passes=ev.passes,
        work=ev.work,
        wall_time=time.perf_counter() - began,
    )


@dataclass(frozen=True, kw_only=True)
class _Iterative(Solver):
    """Options shared by the Jacobi-type solvers (all keyword-only)."""

    tol: float = 1e-5
    atol: float = 0.0
    max_iters: int | None = None
    init: inits.Init = field(default=inits.noise)
    patience: int = 8
    update_dtype: torch.dtype | None = None
    drop_converged: bool | None = None
    on_divergence: Literal["fall_back", "give_up"] = "fall_back"

    def __post_init__(self) -> None:
        if not (self.tol >= 0 and self.atol >= 0):
            raise ValueError(f"tol and atol must be >= 0; got tol={self.tol}, atol={self.atol}")
        if self.max_iters is not None and (
            not isinstance(self.max_iters, int) or self.max_iters < 1
        ):
            raise ValueError(f"max_iters must be None or an int >= 1; got {self.max_iters!r}")
        if not callable(self.init):
            raise TypeError(f"init must be callable init(block, z, cond) -> x0; got {self.init!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an int >= 1; got {self.patience!r}")
        if self.on_divergence not in _ON_DIVERGENCE:
            raise ValueError(f"on_divergence must be one of {_ON_DIVERGENCE}; got {self.on_divergence!r}")

    def _segments(self) -> int | tuple[int, ...]:
        return 1

    def _drops_converged(self) -> bool:
        if self.drop_converged is None:
            return self.tol > 0 or self.atol > 0
        return self.drop_converged

    @torch.no_grad()
    def solve(self, block: Any, z: Tensor, cond: Any = None, index: int = 0) -> tuple[Tensor, BlockStats]:
        _sync(z)
        began = time.perf_counter()
        batch, seq_len = z.shape[:2]
        bounds = segment_bounds(seq_len, self._segments())
        x = self.init(block, z, cond)
        if not isinstance(x, Tensor) or x.shape != z.shape or x.dtype != z.dtype:
            raise ValueError(
                f"init must return a tensor shaped and typed like z {tuple(z.shape)} {z.dtype}; "
                f"got {getattr(x, 'shape', type(x).__name__)}"
            )
        x = x.clone()
        ev = Evaluator(block, z, cond, self.update_dtype)
        everyone = torch.arange(batch, device=z.device)
        first_exact = inits.exact_prefix(self.init)
        outcomes = []
        for m, (start, stop) in enumerate(bounds):
            cap = stop - start if self.max_iters is None else self.max_iters
            outcomes.append(
                _jacobi_segment(
                    ev, x, start, stop, everyone, max_iters=cap, tol=self.tol, atol=self.atol,
                    patience=self.patience, first_exact=first_exact if m == 0 else 0,
                    drop_converged=self._drops_converged(), give_up=self.on_divergence == "give_up",
                )
            )
            ev.commit(x, stop)
        stats = _block_stats(
            self, index, ev, x, began,
            bounds=bounds,
            iterations=torch.stack([o.iterations for o in outcomes], 1),
            residuals=tuple(o.residuals for o in outcomes),
            status=torch.stack([o.status for o in outcomes]).amax(0),
        )
        return x, stats


@dataclass(frozen=True, repr=False)
class Jacobi(_Iterative):
    r"""Update all positions in parallel: $X^{k+1} = \Sigma(X^k) Z + M(X^k)$.

    **Exactness.** After `k` iterations the first `k` positions equal the serial answer
    (`k + 1` from an initial guess whose first position is exact), so with `max_iters=None`
    (the bound, `T`) the result equals serial inversion in exact arithmetic and never costs
    more network passes than serial. In floating point it agrees to rounding, and
    bit-identically for blocks evaluated by full passes (masked entries add exact zeros).

    **Stopping.** Per sample: stop when `max|x^{k+1} - x^k| <= atol + tol * max|x^{k+1}|`.
    Scale free, unlike the paper's `||dX|| / (B T C)`. `tol=0` iterates until the iterate
    stops changing (or the bound).

    **Work saved.** Exact positions are not updated again; converged samples leave the
    batch; a KV-cached block evaluates only the positions not yet exact.

    **Divergence.** A sample whose update is non-finite or grows `patience` iterations in a
    row is re-solved from its exact prefix with halved segments, down to serial; its status
    is then `FELL_BACK`. That costs up to one pass per remaining position at batch one (on
    the MNIST MAFs of the docs, one exploding sample in a hundred costs a third to a half of
    the time, and ends `NONFINITE` anyway: its serial answer overflows in a later block).
    `on_divergence="give_up"` instead stops a diverging sample at once: its rows beyond the
    exact prefix become NaN and its status `NONFINITE`. Much cheaper, but it may give up on
    a sample that serial would finish; the status says which.

    Arguments:
        tol: relative tolerance of the stopping rule.
        atol: absolute tolerance of the stopping rule.
        max_iters: iterations at most; `None` means the exactness bound.
        init: initial guess, `init(block, z, cond) -> x0` (see `arflow_solvers.init`).
        patience: consecutive growing updates that count as divergence.
        update_dtype: dtype in which `exp(log_sigma) * z + mu` is computed (`None`: the
            iterate's); e.g. `torch.float32` for a bfloat16 model.
        drop_converged: evaluate only the samples still iterating. `False` keeps every
            network call at the full batch shape: matrix-multiply kernels may round
            differently for different batch sizes, so with `tol=0` a shrinking batch can keep
            an iterate jittering in its last bit until the bound, while a fixed shape reaches
            the exact fixed point, bit-identical to a reference sampler that iterates the
            same update (e.g. nflows). `None` (default): drop when a tolerance is set, keep
            the shape when `tol == atol == 0`.
        on_divergence: `"fall_back"` (default: re-solve; the serial answer, or `NONFINITE` if
            serial overflows too) or `"give_up"` (NaN and `NONFINITE` at once).

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Example:
        >>> Jacobi(max_iters=10)
        Jacobi(max_iters=10)
    """

    def __repr__(self) -> str:
        return _repr(self, ("tol", "atol", "max_iters", "init", "patience", "update_dtype",
                            "drop_converged", "on_divergence"))


@dataclass(frozen=True, repr=False)
class GSJacobi(_Iterative):
    r"""Gauss-Seidel over segments, Jacobi within each: the paper's GS-Jacobi iteration.

    The `T` positions are split into segments; segment `m` is solved by Jacobi,
    $X^{k+1}_m = \Sigma_m(X^k) Z_m + M_m(X^k)$, with segments `< m` frozen. One segment is
    [`Jacobi`][arflow_solvers.Jacobi]; `T` segments is [`Serial`][arflow_solvers.Serial].
    The exactness bound is per segment (its length), so `max_iters=None` again gives the
    serial answer; stopping, work saving and divergence handling are as in `Jacobi`, per
    segment. A KV-cached block commits each finished segment to its cache once.

    Arguments:
        segments: a count (split as evenly as possible, as in the paper) or the segment
            lengths, which must sum to `T`.
        tol: relative tolerance of the stopping rule.
        atol: absolute tolerance of the stopping rule.
        max_iters: Jacobi iterations per segment at most; `None` means the segment length.
        init: initial guess, `init(block, z, cond) -> x0`.
        patience: consecutive growing updates that count as divergence.
        update_dtype: dtype in which the affine update is computed.
        drop_converged: evaluate only the samples still iterating (see `Jacobi`).
        on_divergence: `"fall_back"` or `"give_up"` for a diverging sample (see `Jacobi`).

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Example:
        >>> import torch
        >>> from arflow_solvers import GSJacobi, Serial, solve_inverse
        >>> class Doubler:  # x_t = z_t + 2 x_{t-1}
        ...     seq_len = 6
        ...     def affine(self, x, cond=None):
        ...         mu = 2 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        ...         return mu, torch.zeros_like(x)
        >>> z = torch.randn(2, 6, 1, dtype=torch.float64)
        >>> x = solve_inverse(Doubler(), z, GSJacobi(3, tol=0.0))
        >>> bool(torch.equal(x, solve_inverse(Doubler(), z, Serial())))
        True
    """

    segments: Union[int, tuple[int, ...]] = 1

    def __post_init__(self) -> None:
        if isinstance(self.segments, (list, tuple)):
            lengths = tuple(int(n) for n in self.segments)
            if not lengths or min(lengths) < 1:
                raise ValueError(f"segments must be positive lengths; got {list(self.segments)}")
            object.__setattr__(self, "segments", lengths)
        elif isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(
                f"segments must be an int >= 1 or a list of lengths; got {self.segments!r}"
            )
        super().__post_init__()

    def _segments(self) -> int | tuple[int, ...]:
        return self.segments

    def __repr__(self) -> str:
        return _repr(self, ("segments", "tol", "atol", "max_iters", "init", "patience", "update_dtype",
                            "drop_converged", "on_divergence"))


_ON_DIVERGENCE = ("fall_back", "give_up")
_DEFAULTS = {"segments": 1, "tol": 1e-5, "atol": 0.0, "max_iters": None, "init": inits.noise,
             "patience": 8, "update_dtype": None, "drop_converged": None, "on_divergence": "fall_back"}


def _repr(solver: Solver, names: Sequence[str]) -> str:
    shown = []
    for name in names:
        value = getattr(solver, name)
        if value is _DEFAULTS[name] or value == _DEFAULTS[name] and name != "init":
            continue
        text = getattr(value, "__name__", None) if name == "init" else None
        shown.append(f"{name}={text or repr(value)}")
    return f"{type(solver).__name__}({', '.join(shown)})"
