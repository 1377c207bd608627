"""What every conformance check shares: the error it raises, input checks, tolerances, reporting."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..protocol import AffineARBlock, CausalMapBlock

__all__ = ["ConformanceError"]

MAX_POSITIONS = 16
"""`check_causal` perturbs every position of blocks with at most this many, else a spread."""


class ConformanceError(AssertionError):
    """A block broke its protocol's contract.

    Attributes:
        block: a short name of the block.
        check: the check that failed (`"check_causal"`, ...).
        positions: the offending positions (sequence indices).
        violation: the largest deviation found (absolute).
    """

    def __init__(self, block: str, check: str, positions: Sequence[int], violation: float, detail: str):
        self.block, self.check = block, check
        self.positions, self.violation = list(positions), float(violation)
        self.detail = detail
        super().__init__(f"{block} failed {check}: {detail}")

    __module__ = "arflow_solvers.testing"

    def __reduce__(self) -> tuple:  # picklable (e.g. across pytest-xdist workers)
        return type(self), (self.block, self.check, self.positions, self.violation, self.detail)



def block_name(block: Any) -> str:
    """`repr(block)` when it is short and says something, else the type's name."""
    text = repr(block)
    if "\n" in text or len(text) > 100 or " object at 0x" in text:
        return type(block).__name__
    return text


def as_solved(block: Any, check: str) -> list[tuple[str, Any]]:
    """The block, and what a solve evaluates instead when the block defines `snapshot()`."""
    targets = [(block_name(block), block)]
    snapshot = getattr(block, "snapshot", None)
    if callable(snapshot):
        solving = snapshot()  # under no_grad, as in a solve
        if not isinstance(solving, (AffineARBlock, CausalMapBlock)) or solving.seq_len != block.seq_len:
            raise ConformanceError(
                block_name(block), check, [], float("inf"),
                f"snapshot() returned {type(solving).__name__}, not a block with seq_len={block.seq_len}",
            )
        if solving is not block:
            targets.append((f"{block_name(block)}.snapshot()", solving))
    return targets


def validate(block: Any, z: Tensor, check: str) -> None:
    if not isinstance(block, (AffineARBlock, CausalMapBlock)):
        raise TypeError(
            f"{check}: block must have `seq_len` and `affine(x, cond)` (AffineARBlock) or "
            f"`inverse_map(x, z, cond)` (CausalMapBlock); got {type(block).__name__}"
        )
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise TypeError(f"{check}: z must be a floating-point tensor; got {getattr(z, 'dtype', type(z).__name__)}")
    if z.dim() != 3 or z.shape[1] != block.seq_len or z.shape[0] < 1:
        raise ValueError(
            f"{check}: z must have shape (B >= 1, T={block.seq_len}, D); got {tuple(z.shape)}"
        )


def default_atol(dtype: torch.dtype, scale: float, power: float) -> float:
    """`eps(dtype) ** power`, times the size of what is compared when that exceeds 1."""
    return float(torch.finfo(dtype).eps) ** power * max(1.0, scale)


def magnitude(*tensors: Tensor) -> float:
    finite = [t[torch.isfinite(t)] for t in tensors]
    return max((float(t.abs().max()) for t in finite if t.numel()), default=0.0)


def random_like(z: Tensor, seed: int) -> Tensor:
    """Standard normal values shaped like `z`, reproducible, on `z`'s device and dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(z.shape, generator=g, dtype=torch.float64).to(device=z.device, dtype=z.dtype)


def update_rows(block: Any) -> Callable[[Tensor, Tensor, Any], list[tuple[str, Tensor]]]:
    """The block's per-row outputs: `inverse_map` (what the solvers iterate) and/or `affine`."""

    def evaluate(x: Tensor, z: Tensor, cond: Any) -> list[tuple[str, Tensor]]:
        outputs = []
        if callable(getattr(block, "inverse_map", None)):
            outputs.append(("inverse_map", block.inverse_map(x, z, cond)))
        if callable(getattr(block, "affine", None)):
            mu, log_sigma = block.affine(x, cond)
            outputs += [("mu", mu), ("log_sigma", log_sigma)]
        return outputs

    return evaluate


def row_errors(new: Tensor, old: Tensor) -> Tensor:
    """`(T,)` max-abs difference of each row over batch and channels (NaN-aware: NaN vs NaN is 0)."""
    same = (new == old) | (torch.isnan(new) & torch.isnan(old))
    diff = torch.where(same, torch.zeros_like(new), (new - old).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return diff.amax(dim=(0, 2)).double().cpu()


def positions_to_check(positions: Iterable[int] | None, seq_len: int, check: str) -> list[int]:
    if positions is None:
        if seq_len <= MAX_POSITIONS:
            return list(range(seq_len))
        spread = torch.linspace(0, seq_len - 1, MAX_POSITIONS - 2).round().long().tolist()
        return sorted({0, 1, seq_len - 2, seq_len - 1, *spread})
    chosen = sorted({int(s) for s in positions})
    if not chosen or chosen[0] < 0 or chosen[-1] >= seq_len:
        raise ValueError(f"{check}: positions must be a non-empty set of ints in [0, {seq_len}); got {chosen}")
    return chosen


def shown(values: Sequence[int], limit: int = 8) -> str:
    values = list(values)
    return "[" + ", ".join(map(str, values[:limit])) + (", ..." if len(values) > limit else "") + "]"
