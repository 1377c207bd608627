"""The KV cache of one STARFlow block for one solve: TarFlow's, behind an encoded text prefix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..tarflow.cache import TarFlowCache
from ..tarflow.layers import KV

__all__ = ["StarFlowCache"]


@dataclass
class StarFlowCache(TarFlowCache):
    """A [`TarFlowCache`][arflow_solvers.adapters.tarflow.cache.TarFlowCache] whose buffers start with a prefix.

    The keys and values of the text prefix (and of the start-of-sequence token) fill the
    buffers' first `prefix` positions once, in `init_cache`; image token `t` sits at position
    `prefix + t`. Everything TarFlow's cache tracks (`fed`, `valid`, `stable`, the per-sample
    gathers and scatters) is in image-token positions, offset here where the buffers are read
    or written. `outputs[:, :, 0]` holds the start-of-sequence token's output (row 0), or
    zeros without one.

    Attributes:
        prefix: buffer positions before image token 0.
        pos_embed: the solve's
            [`Positions`][arflow_solvers.adapters.starflow.network.Positions] (rotary tables,
            learnt position table, text length), handed to every pass.
    """

    pos_embed: Any = None
    prefix: int = 0

    def kv(self, rows: Tensor | None, length: int) -> list[KV]:
        """Per layer `(keys, values)` of samples `rows` up to image token `length` (the prefix included)."""
        return super().kv(rows, self.prefix + length)

    def _scatter(self, buf: Tensor, new: Tensor, rows: Tensor, first: int, last: int) -> None:
        super()._scatter(buf, new, rows, self.prefix + first, self.prefix + last)
