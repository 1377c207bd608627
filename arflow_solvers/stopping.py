"""The stopping rule of the Jacobi-type solvers: per sample, relative and absolute tolerance in a norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["StoppingRule", "Norm", "check_tolerance"]

Norm = Literal["max", "rms"]


def _max_abs(values: Tensor) -> Tensor:
    """Per-sample `max |values|` over positions and channels, without materialising `|values|`."""
    return torch.maximum(values.amax(dim=(1, 2)), values.amin(dim=(1, 2)).neg())


def _rms(values: Tensor) -> Tensor:
    """Per-sample root mean square over positions and channels."""
    return values.square().mean(dim=(1, 2)).sqrt()


_NORMS = {"max": _max_abs, "rms": _rms}


def check_tolerance(name: str, value: object) -> None:
    """Raise `ValueError` naming `name` unless `value` is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


@dataclass(frozen=True)
class StoppingRule:
    r"""A sample has converged when its update is small: $\|x^{k+1} - x^k\| \le atol + rtol \|x^{k+1}\|$.

    Norms are taken per sample over the rows being solved. The rule is scale free (unlike
    the paper's $\|\Delta X\| / (BTC)$, which never fires in low precision). With
    `rtol = atol = 0` it is met only when the iterate stops changing.

    Arguments:
        rtol: relative tolerance.
        atol: absolute tolerance.
        norm: `"max"` (max-abs, the default) or `"rms"` (root mean square).

    Examples:
        >>> import torch
        >>> rule = StoppingRule(rtol=0.1)
        >>> new, old = torch.ones(2, 3, 1), torch.ones(2, 3, 1)
        >>> old[1] += 0.5
        >>> delta = rule.distance(new, old)
        >>> delta.tolist(), rule.met(delta, new).tolist()
        ([0.0, 0.5], [True, False])
    """

    rtol: float = 1e-5
    atol: float = 0.0
    norm: Norm = "max"

    def __post_init__(self) -> None:
        check_tolerance("rtol", self.rtol)
        check_tolerance("atol", self.atol)
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}; got {self.norm!r}")

    @property
    def tolerates(self) -> bool:
        """Whether the rule stops before the iterate stops changing."""
        return self.rtol > 0 or self.atol > 0

    def distance(self, new: Tensor, old: Tensor, overwrite: bool = False) -> Tensor:
        """`(B,)` norm of each sample's update `new - old` (each `(B, rows, D)`).

        `overwrite=True` computes the update in `old`'s memory (which the caller then
        discards or overwrites), without a new tensor.
        """
        update = old.sub_(new) if overwrite else new - old  # the sign does not matter to a norm
        if self.norm == "max":  # the update is ours: take |.| in place
            return update.abs_().amax(dim=(1, 2))
        return _rms(update)

    def size(self, values: Tensor) -> Tensor:
        """`(B,)` norm of each sample's `values` (`(B, rows, D)`), e.g. of an update already formed."""
        return _NORMS[self.norm](values)

    def met(self, distance: Tensor, new: Tensor) -> Tensor:
        """`(B,)` bool: whether each sample's update `distance` meets the rule at iterate `new`."""
        if self.rtol == 0:  # exact mode: no need to measure the iterate
            return distance <= self.atol
        return distance <= self.atol + self.rtol * self.size(new)
