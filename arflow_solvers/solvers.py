"""Serial, Jacobi and GS-Jacobi inversion of one autoregressive block."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from . import init as inits
from ._evaluate import Evaluator, finite_rows
from ._sweep import Outcome, SweepOptions, certify_rows, iterated_rows, sweep
from .divergence import PolicyLike, as_policy
from .solution import BlockStats, Status
from .stopping import Norm, StoppingRule, check_tolerance

__all__ = ["Solver", "Serial", "Jacobi", "GSJacobi", "segment_bounds"]


def segment_bounds(seq_len: int, segments: int | Sequence[int]) -> tuple[tuple[int, int], ...]:
    """`(start, stop)` of each segment; a count `M` gives the first `T mod M` one more position.

    Examples:
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


@dataclass(frozen=True, repr=False)
class Solver:
    """Base of the solvers: an immutable description of how to invert one block.

    Every option is a dataclass field, declared once: `repr`, the plan notation and
    `Plan.save` / `Plan.load` read them from the fields (see
    [`options`][arflow_solvers.Solver.options]).
    """

    def solve(self, block: Any, z: Tensor, cond: Any = None, index: int = 0) -> tuple[Tensor, BlockStats]:
        """Invert `block` for noise `z` (`(B, T, D)`): returns `x` and its statistics.

        Runs under `torch.no_grad()`; most users call [`solve`][arflow_solvers.solve] instead.
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options that differ from their defaults, by field name."""
        positional_first = sorted(dataclasses.fields(self), key=lambda f: f.kw_only)
        return {f.name: getattr(self, f.name) for f in positional_first
                if not _is_default(f, getattr(self, f.name))}

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={_show(value)}" for name, value in self.options().items())
        return f"{type(self).__name__}({shown})"


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    default = _default(f)
    if callable(default) or callable(value):  # initial guesses compare by identity
        return value is default
    return type(value) is type(default) and value == default


def _show(value: Any) -> str:
    return getattr(value, "__name__", None) or repr(value) if callable(value) else repr(value)


@dataclass(frozen=True, repr=False)
class Serial(Solver):
    r"""Invert one position at a time: $T$ steps, the reference every other solver matches.

    With a KV-cached block ([`CachedARBlock`][arflow_solvers.CachedARBlock]) each step
    evaluates one position; otherwise each step is a full network pass.

    Arguments:
        update_dtype: compute `exp(log_sigma) * z + mu` in this dtype (e.g. `torch.float32`
            for a bfloat16 model); `None` keeps the iterate's dtype.

    Examples:
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

    def __post_init__(self) -> None:
        _check_update_dtype(self.update_dtype)

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


def _block_stats(solver: Solver, index: int, ev: Evaluator, x: Tensor, began: float, *,
                 bounds: tuple, iterations: Tensor, residuals: tuple, status: Tensor) -> BlockStats:
    """Statistics of a finished block solve; a sample with a non-finite result is `NONFINITE`."""
    _sync(x)
    finite = finite_rows(x)
    status = torch.where(finite, status, status.clamp(min=Status.NONFINITE))
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


@dataclass(frozen=True, kw_only=True, repr=False)
class _Iterating(Solver):
    """Options of every iterative solver (all keyword-only): its stopping rule, cap, guess and patience."""

    tol: float = 1e-5
    atol: float = 0.0
    norm: Norm = "max"
    max_iters: int | None = None
    init: inits.Init = field(default=inits.noise)
    patience: int = 8

    def __post_init__(self) -> None:
        check_tolerance("tol", self.tol)
        check_tolerance("atol", self.atol)
        self.stopping_rule()  # checks the norm
        check_optional_count("max_iters", self.max_iters)
        if not callable(self.init):
            raise TypeError(f"init must be callable init(block, z, cond) -> x0; got {self.init!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an int >= 1; got {self.patience!r}")

    def stopping_rule(self) -> StoppingRule:
        return StoppingRule(self.tol, self.atol, self.norm)


def check_optional_count(name: str, value: object) -> None:
    """Raise `ValueError` naming `name` unless `value` is `None` or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1; got {value!r}")


@dataclass(frozen=True, kw_only=True, repr=False)
class _Iterative(_Iterating):
    """Options shared by the Jacobi-type solvers (all keyword-only)."""

    update_dtype: torch.dtype | None = None
    drop_converged: bool | None = None
    on_divergence: PolicyLike = "fall_back"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.drop_converged is not None and not isinstance(self.drop_converged, bool):
            raise TypeError(f"drop_converged must be None or a bool; got {self.drop_converged!r}")
        _check_update_dtype(self.update_dtype)
        as_policy(self.on_divergence)

    def _segments(self) -> int | tuple[int, ...]:
        return 1

    def _bounds(self, seq_len: int, iterated: int) -> tuple[tuple[int, int], ...]:
        """The segments; a count splits the rows that are iterated, and the last also takes the rest."""
        segments = self._segments()
        if iterated >= seq_len or not isinstance(segments, int):
            return segment_bounds(seq_len, segments)
        bounds = segment_bounds(max(iterated, 1), segments)
        return bounds[:-1] + ((bounds[-1][0], seq_len),)

    def _sweep_options(self) -> SweepOptions:
        rule = self.stopping_rule()
        drop = rule.tolerates if self.drop_converged is None else self.drop_converged
        return SweepOptions(rule, self.patience, as_policy(self.on_divergence), drop,
                            certify=self.drop_converged is None and not rule.tolerates)

    @torch.no_grad()
    def solve(self, block: Any, z: Tensor, cond: Any = None, index: int = 0) -> tuple[Tensor, BlockStats]:
        _sync(z)
        began = time.perf_counter()
        batch, seq_len = z.shape[:2]
        ev = Evaluator(block, z, cond, self.update_dtype)
        options = self._sweep_options()
        bounds = self._bounds(seq_len, iterated_rows(ev, options))
        x = initial_guess(self.init, ev, z, cond)
        everyone = torch.arange(batch, device=z.device)
        first_exact = inits.exact_prefix(self.init)
        # several segments to the bound: one certification at the end, not one per segment
        defer = options.certify and len(bounds) > 1 and self.max_iters is None
        outcomes = []
        for m, (start, stop) in enumerate(bounds):
            cap = stop - start if self.max_iters is None else self.max_iters
            outcomes.append(sweep(ev, x, start, stop, everyone, max_iters=cap,
                                  first_exact=first_exact if m == 0 else 0, options=options,
                                  defer_certification=defer))
            ev.commit(x, stop)
        uncertified = [o.uncertified_from for o in outcomes if o.uncertified_from is not None]
        if uncertified:
            status = torch.stack([o.status for o in outcomes]).amax(0)
            outcomes[-1] = _merged(outcomes[-1], certify_rows(ev, x, min(uncertified), seq_len, status, options))
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

    **Stopping.** Per sample, by a [`StoppingRule`][arflow_solvers.StoppingRule]: stop when
    `||x^{k+1} - x^k|| <= atol + tol * ||x^{k+1}||` (`norm="max"`: max-abs, or `"rms"`).
    Scale free, unlike the paper's `||dX|| / (B T C)`. `tol=0` iterates until the iterate
    stops changing (or the bound).

    **Work saved.** Exact positions are not updated again; converged samples leave the
    batch; a KV-cached block evaluates only the positions not yet exact. In the exact mode,
    rows that stopped moving are final too (each was computed from rows that did not move),
    and a block with `inverse_map_rows` (zuko's masked transforms) evaluates only the rows
    after them, its answer certified like a shrunk batch's. Rows that no row reads (a MADE
    narrower than its features) are computed once, from the rows before them, in the exact
    mode and to a tolerance (the rule then measures the rows iterated).

    **Divergence.** A sample whose update is non-finite or grows `patience` iterations in a
    row is handed to the `on_divergence` policy. `"fall_back"` re-solves it from its exact
    prefix with halved segments, down to serial: the serial answer, status `FELL_BACK`, at
    up to one pass per remaining position at batch one. `"give_up"` stops it at once: its
    rows beyond the exact prefix become NaN and its status `GAVE_UP`; much cheaper, but it
    may give up on a sample that serial would finish. The docs' MAF page measures both.

    Arguments:
        tol: relative tolerance of the stopping rule.
        atol: absolute tolerance of the stopping rule.
        norm: norm of the stopping rule, `"max"` or `"rms"`.
        max_iters: iterations at most; `None` means the exactness bound.
        init: initial guess, `init(block, z, cond) -> x0` (see `arflow_solvers.init`); its
            calls of the block are counted in the solve's `passes`.
        patience: consecutive growing updates that count as divergence.
        update_dtype: dtype in which `exp(log_sigma) * z + mu` is computed (`None`: the
            iterate's); e.g. `torch.float32` for a bfloat16 model.
        drop_converged: evaluate only the samples still iterating. `False` keeps every
            network call at the full batch shape: matrix-multiply kernels may round
            differently for different batch sizes, so with `tol=0` a shrinking batch can keep
            an iterate jittering in its last bit until the bound, while a fixed shape reaches
            the exact fixed point, bit-identical to a reference sampler that iterates the
            same update (e.g. nflows). `None` (default): drop when a tolerance is set; when
            `tol == atol == 0`, certify: keep the shape while more than half of the samples
            iterate, then evaluate only those (at least 16 rows), and end with one call at the
            full shape that checks every sample's answer (a sample that moves there goes on at
            the full shape), so the result is still the full-shape fixed point, bit for bit.
        on_divergence: `"fall_back"` (default), `"give_up"`, or any
            [`DivergencePolicy`][arflow_solvers.divergence.DivergencePolicy].

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Examples:
        >>> Jacobi(max_iters=10)
        Jacobi(max_iters=10)
    """


@dataclass(frozen=True, repr=False)
class GSJacobi(_Iterative):
    r"""Gauss-Seidel over segments, Jacobi within each: the paper's GS-Jacobi iteration.

    The `T` positions are split into segments; segment `m` is solved by Jacobi,
    $X^{k+1}_m = \Sigma_m(X^k) Z_m + M_m(X^k)$, with segments `< m` frozen. One segment is
    [`Jacobi`][arflow_solvers.Jacobi]; `T` segments is [`Serial`][arflow_solvers.Serial].
    The exactness bound is per segment (its length), so `max_iters=None` again gives the
    serial answer; stopping, work saving and divergence handling are as in `Jacobi`, per
    segment. A KV-cached block commits each finished segment to its cache once. In the exact
    mode (`tol == atol == 0`, `max_iters=None`) a block that computes a segment's rows alone
    (`inverse_map_rows`: zuko's masked transforms) evaluates only them, and one call at the
    full map certifies every segment at the end.

    Arguments:
        segments: a count (split as evenly as possible, as in the paper) or the segment
            lengths, which must sum to `T`.
        tol: relative tolerance of the stopping rule.
        atol: absolute tolerance of the stopping rule.
        norm: norm of the stopping rule, `"max"` or `"rms"`.
        max_iters: Jacobi iterations per segment at most; `None` means the segment length.
        init: initial guess, `init(block, z, cond) -> x0`.
        patience: consecutive growing updates that count as divergence.
        update_dtype: dtype in which the affine update is computed.
        drop_converged: evaluate only the samples still iterating (see `Jacobi`).
        on_divergence: what to do with a diverging sample (see `Jacobi`).

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Examples:
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


def _merged(last: Outcome, certified: Outcome) -> Outcome:
    """The last segment's outcome with a deferred certification's iterations, residuals and statuses added."""
    return Outcome(last.iterations + certified.iterations, torch.cat([last.residuals, certified.residuals]),
                   torch.maximum(last.status, certified.status))


_FRESH_INITS = (inits.noise, inits.zeros, inits.zeros_first_exact)


def initial_guess(init: inits.Init, ev: Evaluator, z: Tensor, cond: Any) -> Tensor:
    """`init`'s guess for `z`, checked, and ours to overwrite; its network calls are counted by `ev`."""
    x = init(ev.view, z, cond)
    if not isinstance(x, Tensor) or x.shape != z.shape or x.dtype != z.dtype:
        raise ValueError(
            f"init must return a tensor shaped and typed like z {tuple(z.shape)} {z.dtype}; "
            f"got {getattr(x, 'shape', type(x).__name__)}"
        )
    return x if init in _FRESH_INITS else x.clone()  # the built-in guesses return a new tensor


def _check_update_dtype(dtype: Any) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"update_dtype must be None or a floating torch.dtype; got {dtype!r}")
