"""The preallocated KV cache of one TarFlow block: what is cached, what is stale, and subsets of samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layers import KV

__all__ = ["TarFlowCache"]


@dataclass
class TarFlowCache:
    """KV cache of one block for one solve, preallocated in `init_cache`.

    Keys, values and outputs of token `t` of sample `r` are kept with the patch `fed[r, t]`
    they were computed from; they stay usable while `x[r, :t + 1]` equals `fed[r, :t + 1]`
    and `t < valid[r]`, so a call recomputes only from the first token that changed.

    Methods taking `rows` read or write the samples `rows` of the cache; `rows=None` means
    all of them.

    Attributes:
        keys, values: per layer `(G * B, heads, T, head_dim)`; `G = 2` (conditional then
            unconditional) under guidance, else 1.
        outputs: `(G, B, T + 1, out)` `proj_out` rows; index `t + 1` holds token `t`'s, so
            row `r` of the flow is `outputs[:, :, r]` and index 0 stays zero.
        fed: `(B, T, D)` the patches the cached tokens were computed from.
        valid: `(B,)` tokens `[0, valid[r])` of sample `r` are cached; while every sample has
            the same count it is kept in `valid_all` instead (and `valid` is stale).
        class_embed: `(G, B, 1, C)` class embeddings of the batch, or `None`.
        groups: `G`.
        batch: `B`.
        everyone: `arange(B)`, to recognise a `rows` that is the whole batch.
        pos_embed: `(T, C)` position embeddings in the block's order.
        stable: tokens `< stable` are committed and cached for every sample (never rechecked).
        committed: the committed prefix length.
    """

    keys: list[Tensor]
    values: list[Tensor]
    outputs: Tensor
    fed: Tensor
    valid: Tensor
    class_embed: Tensor | None
    groups: int
    batch: int
    everyone: Tensor
    pos_embed: Tensor | None = None
    valid_all: int | None = 0
    stable: int = 0
    committed: int = 0

    def subset(self, rows: Tensor | None) -> Tensor | None:
        """`rows`, or `None` when it names every sample in order."""
        if rows is None or (rows.numel() == self.batch and bool(torch.equal(rows, self.everyone))):
            return None
        return rows

    def valid_counts(self) -> Tensor:
        """The per-sample `valid` counts, materialised from `valid_all` when uniform."""
        if self.valid_all is not None:
            self.valid.fill_(self.valid_all)
            self.valid_all = None
        return self.valid

    def first_stale(self, x: Tensor, rows: Tensor | None, last: int) -> int:
        """First token in `[stable, last)` whose cached entries are unusable for some sample of `x`."""
        lo = min(self.stable, last)
        if lo >= last or (self.valid_all is not None and self.valid_all <= lo):
            return lo  # nothing cached past the stable prefix: no comparison needed
        fed = self.fed[:, lo:last] if rows is None else self.fed[rows, lo:last]
        valid = self.valid_counts() if rows is None else self.valid_counts()[rows]
        positions = torch.arange(lo, last, device=x.device)
        stale = (x[:, lo:last] != fed).any(dim=-1) | (positions >= valid.unsqueeze(1))
        stale = stale.any(dim=0)
        return lo + int(stale.int().argmax()) if bool(stale.any()) else last

    def kv(self, rows: Tensor | None, length: int) -> list[KV]:
        """Per layer `(keys, values)` of samples `rows`: the buffers themselves, or copies of tokens `< length`."""
        if rows is None:
            return list(zip(self.keys, self.values))
        return [(self._gather(k, rows, length), self._gather(v, rows, length)) for k, v in zip(self.keys, self.values)]

    def class_embeddings(self, rows: Tensor | None) -> Tensor | None:
        """`(G, b, 1, C)` class embeddings of samples `rows`, or `None`."""
        if self.class_embed is None or rows is None:
            return self.class_embed
        return self.class_embed[:, rows]

    def store(self, out: Tensor, x_tok: Tensor, kv: list[KV], rows: Tensor | None, first: int, last: int) -> None:
        """Record tokens `[first, last)` of samples `rows`: outputs `out`, patches `x_tok`, keys and values `kv`."""
        if rows is None:  # the keys and values were written into the buffers in place
            self.outputs[:, :, first + 1 : last + 1] = out
            self.fed[:, first:last] = x_tok
            self.valid_all = last
            return
        for (keys, values), (new_keys, new_values) in zip(zip(self.keys, self.values), kv):
            self._scatter(keys, new_keys, rows, first, last)
            self._scatter(values, new_values, rows, first, last)
        self.outputs[:, rows, first + 1 : last + 1] = out
        self.fed[rows, first:last] = x_tok
        self.valid_counts()[rows] = last

    def forget_after(self, rows: Tensor | None, last: int) -> None:
        """Mark tokens `>= last` of samples `rows` stale (they may have been fed another prefix)."""
        if rows is not None:
            valid = self.valid_counts()
            valid[rows] = valid[rows].clamp(max=last)
        elif self.valid_all is not None:
            self.valid_all = min(self.valid_all, last)
        else:
            self.valid.clamp_(max=last)

    def rows_out(self, rows: Tensor | None, start: int, stop: int) -> Tensor:
        """`(G, b, stop - start, out)` cached outputs of flow rows `[start, stop)` of samples `rows`."""
        return self.outputs[:, :, start:stop] if rows is None else self.outputs[:, rows, start:stop]

    def _gather(self, buf: Tensor, rows: Tensor, length: int) -> Tensor:
        """Samples `rows` of a `(G * B, H, T, d)` buffer, first `length` tokens: `(G * b, H, length, d)`."""
        _, heads, _, dim = buf.shape
        view = buf.view(self.groups, self.batch, heads, -1, dim)[:, rows, :, :length]
        return view.reshape(self.groups * rows.numel(), heads, length, dim)

    def _scatter(self, buf: Tensor, new: Tensor, rows: Tensor, first: int, last: int) -> None:
        """Write tokens `[first, last)` of `new` (`(G * b, H, >= last, d)`) back to samples `rows`."""
        _, heads, _, dim = buf.shape
        view = buf.view(self.groups, self.batch, heads, -1, dim)
        view[:, rows, :, first:last] = new.view(self.groups, rows.numel(), heads, -1, dim)[:, :, :, first:last]
