"""TarFlow's transformer layers: one computation for the full causal pass and the KV-cached range."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "MLP", "AttentionBlock"]

KV = tuple[Tensor, Tensor]
"""Preallocated key and value buffers of one layer, each `(B, heads, T, head_dim)`."""


def _norm(norm: nn.LayerNorm, h: Tensor) -> Tensor:
    """Layer norm computed in at least float32 (as the public code does), returned in `h`'s dtype."""
    if h.dtype in (torch.float16, torch.bfloat16):
        w = None if norm.weight is None else norm.weight.float()
        b = None if norm.bias is None else norm.bias.float()
        return F.layer_norm(h.float(), norm.normalized_shape, w, b, norm.eps).type(h.dtype)
    return norm(h)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention (`norm`, `qkv`, `proj`: the public parameter names).

    Without `kv` the `n` tokens attend to each other (under `mask`). With `kv`, a layer's
    preallocated key and value buffers whose tokens `< start` are filled, the new tokens are
    tokens `[start, start + n)`: their keys and values are written into the buffers in place
    and their queries attend to the buffers' first `start + n` tokens, so the cached range and
    the full pass run the same arithmetic.

    Arguments:
        channels: model width `C`.
        head_dim: channels per head; `C` must be a multiple of it.
    """

    def __init__(self, channels: int, head_dim: int):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels={channels} must be a multiple of head_dim={head_dim}")
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.num_heads = channels // head_dim
        self.head_dim = head_dim
        # the public code scales by (head_dim ** -0.25) ** 2; same float, same rounding
        self.scale = (head_dim**-0.25) ** 2

    def forward(
        self,
        h: Tensor,
        mask: Tensor | None = None,
        kv: KV | None = None,
        start: int = 0,
        temp: float = 1.0,
        temp_from: int = 0,
    ) -> Tensor:
        """`(B, n, C)` hidden states to the projected attention output `(B, n, C)`.

        Arguments:
            h: hidden states of tokens `[start, start + n)`.
            mask: boolean `(n, start + n)` mask (`True`: attend), or `None` for all.
            kv: the layer's key and value buffers, or `None` for an uncached pass.
            start: position of the first token of `h`.
            temp: attention temperature of the samples `temp_from:` of the batch.
            temp_from: first sample tempered (the unconditional half under guidance).
        """
        b, n, _ = h.shape
        qkv = self.qkv(_norm(self.norm, h)).reshape(b, n, 3 * self.num_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=1)
        if temp != 1.0:
            q = torch.cat([q[:temp_from], q[temp_from:] / temp])
        if kv is not None:
            keys, values = kv
            stop = start + n
            keys[:, :, start:stop] = k
            values[:, :, start:stop] = v
            k, v = keys[:, :, :stop], values[:, :, :stop]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """Pre-norm MLP `Linear -> GELU -> Linear` (`norm`, `main.0`, `main.2`).

    Arguments:
        channels: model width `C`.
        expansion: hidden width as a multiple of `C`.
    """

    def __init__(self, channels: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.main = nn.Sequential(
            nn.Linear(channels, channels * expansion), nn.GELU(), nn.Linear(channels * expansion, channels)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.main(_norm(self.norm, h))


class AttentionBlock(nn.Module):
    """One transformer layer: `h + attention(h)`, then `h + mlp(h)`.

    The keyword arguments are those of [`Attention`][arflow_solvers.adapters.tarflow.Attention]:
    without `kv` a plain causal pass, with `kv` the tokens `[start, start + n)` against the cache.

    Arguments:
        channels: model width `C`.
        head_dim: channels per attention head.
        expansion: MLP hidden width as a multiple of `C`.
    """

    def __init__(self, channels: int, head_dim: int, expansion: int):
        super().__init__()
        self.attention = Attention(channels, head_dim)
        self.mlp = MLP(channels, expansion)

    def forward(
        self,
        h: Tensor,
        mask: Tensor | None = None,
        kv: KV | None = None,
        start: int = 0,
        temp: float = 1.0,
        temp_from: int = 0,
    ) -> Tensor:
        h = h + self.attention(h, mask, kv, start, temp, temp_from)
        return h + self.mlp(h)
