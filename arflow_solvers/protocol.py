"""What a block must offer to be inverted: the causal affine recurrence, and optional extras."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = [
    "AffineARBlock",
    "CausalMapBlock",
    "CachedARBlock",
    "HasOutputProjection",
]


@runtime_checkable
class AffineARBlock(Protocol):
    r"""An affine autoregressive block, the one thing the solvers need.

    The block maps noise $z$ to data $x$ over `seq_len` positions of `D` channels by

    $$x_t = \exp(\log\sigma_t(x_{<t}))\, z_t + \mu_t(x_{<t}).$$

    Any object with these two members qualifies; no base class is needed. Any block may
    also define `snapshot() -> block`: every solve calls it once, at its start, and then
    calls only the object it returned. Use it to read weights once per solve (derived
    products, packed copies) without caching them across solves, where they could go stale.

    Attributes:
        seq_len: `T`, the number of positions (tokens for TarFlow, dimensions for MAF).

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849
    """

    seq_len: int

    def affine(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """Shift and log-scale of every position.

        Arguments:
            x: `(B, T, D)` the current iterate.
            cond: whatever conditioning the block takes (class labels, context), or `None`.

        Returns:
            `(mu, log_sigma)`, each `(B, T, D)` in the dtype of `x`; row `t` must depend only
            on `x[:, :t]` (row 0 on nothing but `cond`).
        """
        ...


@runtime_checkable
class CausalMapBlock(Protocol):
    r"""A block that supplies its own inverse update $x^{new} = F(x, z)$.

    Use it when the update is not affine (rational-quadratic splines) or when it must be
    computed exactly as a reference library does (nflows' `(z - shift) / scale`), so that the
    fixed point is bit-identical to that library's sampler. Row `t` of the result may depend
    on `x[:, :t]` and `z[:, t]` only. When a block has both `affine` and `inverse_map`, the
    solvers use `inverse_map`.

    For `solve(..., log_prob=True)` such a block also defines `log_det(x, z, cond)`: the
    `(B,)` log |det dx/dz| of its sampling map at the solution `x` for noise `z` (an affine
    block needs none: the solver sums its `log_sigma`). A block may also define
    `inverse_map_and_log_det(x, z, cond) -> (x_new, log_det)`, both from one evaluation: a
    differentiable solve with `log_prob` then evaluates it once at the solution, not twice.

    A block that can compute some rows alone may define
    `inverse_map_rows(x, z, cond, start, settled, stop) -> (B, stop - start, D)`: rows
    `[start, stop)` of `inverse_map`, where rows before `settled[i]` (`(B,)`) of sample `i`
    are final and may be returned as they are in `x`. The exact mode then evaluates only the
    rows of the segment being solved that not every sample has settled, and certifies its
    answer with `inverse_map`, so these rows need only agree with `inverse_map`'s to rounding.
    Such a block may also say `unread_from: int`: no row reads the positions from there on,
    so the exact mode and tolerance plans iterate only the rows before it and compute the
    others once (the exact mode certifies the answer; a tolerance plan relies on both
    promises, rows equal to `inverse_map`'s to rounding and `unread_from`); `unread_proven =
    True` if `inverse_map` itself provably never reads them (masked products add exact
    zeros), so the exact mode computes them in its certifying call instead of one before; and
    `reads_settled = False` if it never reads `settled`: the sweep then does not find each
    sample's first moved row (a reduction over every update) only to pass it on.
    """

    seq_len: int

    def inverse_map(self, x: Tensor, z: Tensor, cond: Any = None) -> Tensor:
        """`(B, T, D)` iterate and noise to the `(B, T, D)` updated iterate."""
        ...


@runtime_checkable
class CachedARBlock(AffineARBlock, Protocol):
    """An affine block that evaluates a range of rows against a committed prefix (a KV cache).

    The solvers use it when present: `Serial` then costs one position per step and
    `GSJacobi` recomputes only the segment being solved. The contract:

    - `init_cache(z, cond)` returns a fresh cache for the batch of `z` (`(B, T, D)`), with an
      empty committed prefix.
    - `affine_range(cache, x, start, stop, cond, rows)` returns `(mu, log_sigma)` of rows
      `[start, stop)`, each `(b, stop - start, D)`. `x` is `(b, T, D)`; `rows` (a `LongTensor`
      of `b` batch indices into the cache, or `None` for all `B`) says which samples `x`
      and `cond` hold. `x[:, :committed]` equals what was committed for those rows, and
      `start >= committed`.
    - `commit(cache, x, upto, cond)` declares `x[:, :upto]` (full batch, `(B, T, D)`) final,
      so later calls may read it from the cache. `upto` never decreases.
    """

    def init_cache(self, z: Tensor, cond: Any = None) -> Any: ...

    def affine_range(
        self,
        cache: Any,
        x: Tensor,
        start: int,
        stop: int,
        cond: Any = None,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    def commit(self, cache: Any, x: Tensor, upto: int, cond: Any = None) -> None: ...


@runtime_checkable
class HasOutputProjection(Protocol):
    """A block whose `(mu, log_sigma)` come from a final linear layer, for the CRM metric.

    `output_projection()` returns `(W_mu, W_log_sigma)`: the weight matrices whose outputs are
    `mu` and `log_sigma` respectively.
    """

    def output_projection(self) -> tuple[Tensor, Tensor]: ...
