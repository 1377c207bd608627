"""Masked linear layers with their masked zeros skipped: degree-sorted, block-triangular, feature-major.

A MADE layer's mask lets output unit `j` read input unit `i` only when their degrees allow
it (`d_out[j] >= d_in[i]`, or `>` for the output layer). Sorting both sides by degree turns
every row's support into a prefix of the sorted inputs, so a group of consecutive rows only
needs the inputs up to the largest prefix in the group: one matrix product per group over
that prefix, instead of one product over all inputs. With nflows' default degrees the
hidden units never read the inputs of degree above the hidden width, and about half of
every other layer is masked away.

The products run on feature-major activations (`(features, batch)`), so each group of
rows and each prefix of inputs is a contiguous slice. The sums are taken in another order
than a dense product of `weight * mask`, so results agree with it to float rounding, not
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PackedLinear", "degree_order"]


def degree_order(degrees: Tensor) -> Tensor:
    """The stable permutation sorting units by degree."""
    return torch.sort(degrees, stable=True).indices


@dataclass(frozen=True)
class _Group:
    rows: slice
    width: int  # how many leading (sorted) inputs the rows read
    weight: Tensor  # (rows, width), masked


@dataclass(frozen=True)
class PackedLinear:
    """`weight * mask @ h + bias` on feature-major `h`, reading only the unmasked prefix per row group.

    Build it with [`pack`][arflow_solvers.adapters._masked.packed.PackedLinear.pack]; inputs and outputs are in
    the degree-sorted orders given there.
    """

    groups: tuple[_Group, ...]
    bias: Tensor  # (out, 1)

    @classmethod
    def pack(cls, weight: Tensor, mask: Tensor, bias: Tensor | None, rows: Tensor, cols: Tensor,
             group_rows: int = 192) -> PackedLinear:
        """Pack `weight * mask` with outputs ordered by `rows` and inputs by `cols`.

        Raises `ValueError` if, in that order, some row's support is not a prefix (the mask
        does not come from degrees sorted the same way).
        """
        masked = (weight * mask)[rows][:, cols]
        support = mask[rows][:, cols] != 0
        widths = support.sum(1)
        prefix = torch.arange(support.shape[1], device=support.device) < widths[:, None]
        if not bool(torch.equal(support, prefix)):
            raise ValueError("the mask is not triangular in degree order; it cannot be packed")
        out_features = masked.shape[0]
        count = max(1, round(out_features / group_rows))
        edges = [round(k * out_features / count) for k in range(count + 1)]
        groups = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            width = int(widths[lo:hi].max())
            groups.append(_Group(slice(lo, hi), width, masked[lo:hi, :width].contiguous()))
        full_bias = torch.zeros(out_features, dtype=weight.dtype, device=weight.device) if bias is None else bias[rows]
        return cls(tuple(groups), full_bias.reshape(-1, 1).contiguous())

    def __call__(self, h: Tensor) -> Tensor:
        """`(in, batch)` to `(out, batch)`."""
        out = h.new_empty(self.bias.shape[0], h.shape[1])
        for group in self.groups:
            if group.width == 0:
                out[group.rows] = self.bias[group.rows]
            else:
                torch.addmm(self.bias[group.rows], group.weight, h[: group.width], out=out[group.rows])
        return out
