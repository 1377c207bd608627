"""STARFlow's transformer layers: one computation for the full causal pass and the KV-cached range."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tarflow.layers import KV
from .rope import apply_rope

__all__ = ["RMSNorm", "Attention", "MLP", "AttentionBlock", "Context"]

NORM_TYPES = ("layer_norm", "rms_norm", "none")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a unit offset, `x / rms(x) * (1 + weight)` (`weight` starts at 0).

    Computed in at least float32, returned in the input's dtype, as the public `RMSNorm`.

    Arguments:
        dim: normalised width.
        eps: added to the mean square.

    Examples:
        >>> RMSNorm(4)(torch.tensor([2.0, -2.0, 2.0, -2.0])).detach()
        tensor([ 1.0000, -1.0000,  1.0000, -1.0000])
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1 + self.weight.to(wide.dtype))).type_as(x)


def make_norm(norm_type: str, dim: int) -> nn.Module:
    """The pre-norm of a layer: `nn.LayerNorm`, `RMSNorm` or `nn.Identity` (`norm_type` `'none'`)."""
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {norm_type!r}")
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim)
    return RMSNorm(dim) if norm_type == "rms_norm" else nn.Identity()


@dataclass(frozen=True)
class Context:
    """What a pass of tokens `[start, start + n)` needs besides the tokens (see `Attention.forward`).

    Attributes:
        start: sequence position of the first token (text prefix included); with a cache,
            the buffers' positions `< start` are filled.
        rope: `(cos, sin)` of every sequence position, or `None` without rotary embedding.
        temp: attention temperature (divides the attention logits).
    """

    start: int = 0
    rope: tuple[Tensor, Tensor] | None = None
    temp: float = 1.0

    def mask(self, n: int, device: torch.device) -> Tensor | None:
        """Boolean `(n, start + n)` causal mask (`True`: attend) of `n` tokens after `start` others.

        `None` where no explicit mask is needed: one token (it attends to everything before it)
        or a square pass from position 0 (attention then applies its own causal mask, as the
        public code does).
        """
        if n == 1 or self.start == 0:
            return None
        return torch.ones(n, self.start + n, dtype=torch.bool, device=device).tril(diagonal=self.start)


class Attention(nn.Module):
    """Pre-norm causal self-attention with grouped-query heads (the public parameter names).

    `norm`, `qkv` (queries, then keys, then values), `proj`; with `use_qk_norm` the
    `query_norm` and `key_norm` RMS norms per head, with `use_post_norm` an RMS `post_norm` of
    the output. Rotary embedding is applied after the query and key norms. With a cache the
    new keys and values (rotated) are written into the buffers in place and the queries attend
    to every position before theirs, so the cached range and the full pass run the same
    arithmetic.

    Arguments:
        channels: model width `C`.
        head_dim: channels per head.
        norm_type: `'layer_norm'`, `'rms_norm'` or `'none'`.
        num_heads: query heads (default `C // head_dim`).
        num_kv_heads: key and value heads (default `num_heads`); must divide `num_heads`.
        use_qk_norm: RMS-normalise queries and keys per head.
        use_post_norm: RMS-normalise the output.
        use_bias: biases on `qkv` and `proj`.
        hf_style_rope: rotary pairs `(i, i + head_dim / 2)` instead of adjacent channels.
    """

    def __init__(self, channels: int, head_dim: int, norm_type: str = "layer_norm", num_heads: int | None = None,
                 num_kv_heads: int | None = None, use_qk_norm: bool = False, use_post_norm: bool = False,
                 use_bias: bool = True, hf_style_rope: bool = False):
        super().__init__()
        self.num_heads = num_heads or channels // head_dim
        self.num_kv_heads = num_kv_heads or self.num_heads
        if self.num_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (>= 1)")
        self.head_dim = head_dim
        self.norm = make_norm(norm_type, channels)
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.qkv = nn.Linear(channels, q_size + 2 * kv_size, bias=use_bias)
        self.proj = nn.Linear(q_size, channels, bias=use_bias)
        self.query_norm = RMSNorm(head_dim) if use_qk_norm else None
        self.key_norm = RMSNorm(head_dim) if use_qk_norm else None
        self.post_norm = RMSNorm(channels) if use_post_norm else None
        self.hf_style_rope = hf_style_rope
        self.split_sizes = [q_size, kv_size, kv_size]

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def forward(self, h: Tensor, ctx: Context, kv: KV | None = None) -> Tensor:
        """`(B, n, C)` hidden states of positions `[ctx.start, ctx.start + n)` to the projected output.

        `kv` is the layer's preallocated `(keys, values)` buffers, or `None` for an uncached
        pass (which starts at position 0).
        """
        b, n, _ = h.shape
        q, k, v = self.qkv(self.norm(h)).split(self.split_sizes, dim=-1)
        q, k, v = self._heads(q, self.num_heads), self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        stop = ctx.start + n
        if ctx.rope is not None:
            cos, sin = (t[ctx.start : stop] for t in ctx.rope)
            q = apply_rope(q, cos, sin, self.hf_style_rope).to(h.dtype)
            k = apply_rope(k, cos, sin, self.hf_style_rope).to(h.dtype)
        if kv is not None:
            keys, values = kv
            keys[:, :, ctx.start : stop] = k
            values[:, :, ctx.start : stop] = v
            k, v = keys[:, :, :stop], values[:, :, :stop]
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        scale = (self.head_dim**-0.25) ** 2 / ctx.temp  # the public code's rounding
        mask = ctx.mask(n, h.device)
        causal = mask is None and n > 1  # a square pass from position 0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        out = self.proj(out.transpose(1, 2).reshape(b, n, -1))
        return out if self.post_norm is None else self.post_norm(out)


class MLP(nn.Module):
    """Pre-norm MLP: `main` (`Linear -> GELU -> Linear`) or SwiGLU-style `gate_proj`, `up_proj`, `down_proj`.

    The gated form is `down_proj(gelu_tanh(gate_proj(h)) * up_proj(h))`, as the public code.

    Arguments:
        channels: model width `C`.
        expansion: hidden width as a multiple of `C`.
        use_swiglu: the gated form.
        norm_type: `'layer_norm'`, `'rms_norm'` or `'none'`.
        use_post_norm: RMS-normalise the output.
        use_bias: biases on the linear layers.
    """

    def __init__(self, channels: int, expansion: float = 4, use_swiglu: bool = False, norm_type: str = "layer_norm",
                 use_post_norm: bool = False, use_bias: bool = True):
        super().__init__()
        self.norm = make_norm(norm_type, channels)
        self.post_norm = RMSNorm(channels) if use_post_norm else None
        hidden = int(channels * expansion)
        self.use_swiglu = use_swiglu
        if use_swiglu:
            self.gate_proj = nn.Linear(channels, hidden, bias=use_bias)
            self.up_proj = nn.Linear(channels, hidden, bias=use_bias)
            self.down_proj = nn.Linear(hidden, channels, bias=use_bias)
        else:
            self.main = nn.Sequential(nn.Linear(channels, hidden, bias=use_bias), nn.GELU(),
                                      nn.Linear(hidden, channels, bias=use_bias))

    def forward(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        if self.use_swiglu:
            h = self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        else:
            h = self.main(h)
        return h if self.post_norm is None else self.post_norm(h)


class AttentionBlock(nn.Module):
    """One transformer layer: `h + attention(h)`, then `h + mlp(h)`.

    Arguments:
        channels: model width `C`.
        head_dim: channels per attention head.
        expansion: MLP hidden width as a multiple of `C`.
        use_swiglu: gated MLP.
        norm_type: `'layer_norm'`, `'rms_norm'` or `'none'`.
        num_heads: query heads.
        num_kv_heads: key and value heads.
        use_qk_norm: RMS-normalise queries and keys.
        use_post_norm: RMS-normalise the attention and MLP outputs.
        use_bias: biases on the linear layers.
        hf_style_rope: Hugging Face rotary channel layout.
    """

    def __init__(self, channels: int, head_dim: int, expansion: float = 4, use_swiglu: bool = False,
                 norm_type: str = "layer_norm", num_heads: int | None = None, num_kv_heads: int | None = None,
                 use_qk_norm: bool = False, use_post_norm: bool = False, use_bias: bool = True,
                 hf_style_rope: bool = False):
        super().__init__()
        self.attention = Attention(channels, head_dim, norm_type, num_heads, num_kv_heads, use_qk_norm,
                                   use_post_norm, use_bias, hf_style_rope)
        self.mlp = MLP(channels, expansion, use_swiglu, norm_type, use_post_norm, use_bias)

    def forward(self, h: Tensor, ctx: Context, kv: KV | None = None) -> Tensor:
        h = h + self.attention(h, ctx, kv)
        return h + self.mlp(h)
