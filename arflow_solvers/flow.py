"""A flow in sampling order: autoregressive blocks to solve, and plain steps between them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from .protocol import AffineARBlock, CausalMapBlock

__all__ = ["Flow", "Permute", "is_ar_block", "is_reversal", "take_columns"]

Step = Callable[[Tensor, Any], Tensor]


def is_ar_block(obj: object) -> bool:
    """Whether `obj` is a block the solvers invert (affine or with its own inverse map).

    The members `isinstance(obj, (AffineARBlock, CausalMapBlock))` looks for, read directly:
    a runtime protocol check walks every member of the protocol on each call, and this one
    runs several times per solve.
    """
    return hasattr(obj, "seq_len") and (hasattr(obj, "affine") or hasattr(obj, "inverse_map"))


class Flow:
    """An ordered sequence of steps, applied to the noise in **sampling order**.

    Each step is either an autoregressive block (anything satisfying
    [`AffineARBlock`][arflow_solvers.AffineARBlock] or
    [`CausalMapBlock`][arflow_solvers.CausalMapBlock]), which the plan's solver inverts, or
    any callable `step(x, cond) -> x` (a permutation, an un-patchify, a batch-norm inverse),
    which is simply applied.

    Blocks are numbered `0, 1, ...` in the order the solver visits them, i.e. sampling order:
    block 0 is the first block applied to the noise, which is the *last* block of the
    density (training) direction. Plans use this numbering.

    Arguments:
        steps: the steps in sampling order.

    Examples:
        >>> import torch
        >>> from arflow_solvers import Flow, Permute
        >>> class Shift:
        ...     seq_len = 3
        ...     def affine(self, x, cond=None):
        ...         mu = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        ...         return mu, torch.zeros_like(x)
        >>> flow = Flow([Shift(), Permute([2, 1, 0]), Shift()])
        >>> flow.num_blocks
        2
    """

    def __init__(self, steps: Sequence[Union[AffineARBlock, CausalMapBlock, Step]]):
        steps = list(steps)
        for i, step in enumerate(steps):
            _check_step(step, i)
        self.steps: tuple = tuple(steps)

    @property
    def blocks(self) -> tuple:
        """The autoregressive blocks, in sampling order."""
        return tuple(step for step in self.steps if is_ar_block(step))

    @property
    def num_blocks(self) -> int:
        """How many autoregressive blocks the flow has."""
        return len(self.blocks)

    def __iter__(self) -> Iterator:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        lines = []
        index = 0
        for step in self.steps:
            if is_ar_block(step):
                lines.append(f"  [{index}] {type(step).__name__}(seq_len={step.seq_len})")
                index += 1
            else:
                lines.append(f"      {getattr(step, '__name__', type(step).__name__)}")
        return "Flow(\n" + "\n".join(lines) + "\n)"


def _check_step(step: Any, index: int) -> None:
    """Raise `TypeError` unless `step` is a block or a plain sampling-direction callable."""
    name = type(step).__name__
    if is_ar_block(step):
        return
    if hasattr(step, "seq_len"):
        raise TypeError(f"steps[{index}] ({name}) has seq_len but neither affine(x, cond) nor "
                        "inverse_map(x, z, cond), so it is not a block the solvers can invert")
    if isinstance(step, torch.nn.Module):
        raise TypeError(
            f"steps[{index}] is a torch module ({name}) that is not a block: calling it would run "
            "its forward, usually the density direction. Pass the sampling-direction function "
            "instead, e.g. `lambda x, cond: module.inverse(x)`"
        )
    if not callable(step):
        raise TypeError(f"steps[{index}] must be an AffineARBlock, a CausalMapBlock or a callable "
                        f"step(x, cond) -> x; got {name}")


def is_reversal(index: Tensor) -> bool:
    """Whether `index` is `T-1, ..., 1, 0`."""
    count = index.shape[0]
    return count > 0 and int(index[0]) == count - 1 and bool(
        torch.equal(index, torch.arange(count - 1, -1, -1, device=index.device)))


def take_columns(values: Tensor, index: Tensor, reversal: bool | None = None) -> Tensor:
    """`values[:, index]` (along dim 1): a copy, by a flip when `index` reverses the positions.

    A flip reads and writes rows contiguously, several times faster than a gather, and the
    values are the same (a copy). MAF stacks alternate reversed orders, so every other block
    takes this path on every pass. `reversal`: whether `index` is one, if known.
    """
    if is_reversal(index) if reversal is None else reversal:
        return values.flip(1)
    return values.index_select(1, index)


class Permute:
    """Reorder the positions of a `(B, T, D)` tensor: `x[:, order]`.

    Arguments:
        order: a permutation of `range(T)`.
    """

    def __init__(self, order: Sequence[int] | Tensor):
        order = torch.as_tensor(order, dtype=torch.long)
        if order.dim() != 1 or not torch.equal(order.sort().values, torch.arange(len(order))):
            raise ValueError(f"order must be a permutation of range(T); got {order.tolist()}")
        self.order = order
        self._reversal = is_reversal(order)

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        if x.dim() < 2 or x.shape[1] != len(self.order):
            raise ValueError(f"Permute of {len(self.order)} positions got an input of shape "
                             f"{tuple(x.shape)}; expected (B, {len(self.order)}, ...)")
        return take_columns(x, self.order.to(x.device), self._reversal)

    def with_log_det(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """The permuted `x` and its log |det|, zero: a permutation preserves volume."""
        return self(x, cond), x.new_zeros(x.shape[0])

    def __repr__(self) -> str:
        shown = self.order.tolist()
        text = ", ".join(map(str, shown[:6])) + (", ..." if len(shown) > 6 else "")
        return f"Permute([{text}])"
