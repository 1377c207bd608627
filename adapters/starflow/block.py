"""A STARFlow block as the solvers see it: a cached autoregressive block behind an encoded text prefix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..tarflow.block import TarFlowARBlock, _check_autocast
from ..tarflow.layers import KV
from .network import Positions, StarFlowBlock
from .cache import StarFlowCache
from .guidance import LogitsGuidance
from .layers import Context
from .rope import VisionRope

__all__ = ["StarFlowARBlock"]

Text = tuple[Tensor, Tensor | None]


class StarFlowARBlock(TarFlowARBlock):
    r"""A [`StarFlowBlock`][arflow_solvers.adapters.starflow.StarFlowBlock] as a cached autoregressive block.

    Works in the block's own order; the flow puts the flips around it. Satisfies
    [`CachedARBlock`][arflow_solvers.CachedARBlock] and
    [`HasOutputProjection`][arflow_solvers.HasOutputProjection], with TarFlow's cached
    evaluation ([`TarFlowARBlock`][arflow_solvers.adapters.tarflow.TarFlowARBlock]: a
    preallocated cache, one token per serial step, a Jacobi iteration recomputing only from the
    first token that changed) behind a prefix:

    - `init_cache(z, cond)` preallocates keys and values for the text prefix, the
      start-of-sequence token and the image tokens, and encodes the prefix once: every
      iteration of the solve attends to those same keys and values.
    - Guidance runs the caption and the null caption as one batch of `2B` (the same image
      tokens behind two prefixes) and combines them by the public `logits_guided` rule
      ([`LogitsGuidance`][arflow_solvers.adapters.starflow.LogitsGuidance]).
    - `log_sigma` is `log(sigma)` of the public scale (`softplus(a + log(e - 1))`, or `a`
      itself with `exp`); row 0 is the identity without a start-of-sequence token.

    `cond` is the text: `(B, L, txt_dim)` caption embeddings, or a pair `(y, y_null)` with the
    null captions' embeddings for guidance (`(B, L, txt_dim)`, or `(1, L, txt_dim)` for all). When
    `cond` is `None` the `y`, `y_null` bound at construction are used; a block without text
    ignores it.

    **Mixed precision** (`autocast=torch.bfloat16` or `torch.float16`), as TarFlow's
    ([`TarFlowARBlock`][arflow_solvers.adapters.tarflow.TarFlowARBlock]): the model and the
    iterate stay float32; every transformer pass (the prefix's encoding, the cached ranges and
    the full pass) runs under `torch.autocast(device, autocast)`, so the linear layers and
    attention run in that dtype (the rest as autocast decides, as for the public network under
    the same context); the keys and values, prefix included, are cached in that dtype; and the
    `head` outputs are cast back to the iterate's float32, so the scale, the guidance
    combination, the log and the affine update run in float32. A solve run inside an
    `autocast` context of the caller's own is treated the same way (the cache takes that
    context's dtype).

    References:
        STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
        (Gu et al., 2025), https://arxiv.org/abs/2506.06276;
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Arguments:
        block: the network.
        rope: the model's rotary embedding for this block, or `None`.
        guidance: a [`LogitsGuidance`][arflow_solvers.adapters.starflow.LogitsGuidance];
            `None` for none (attention temperature 1).
        y: default caption embeddings.
        y_null: default null-caption embeddings (guidance).
        autocast: `torch.bfloat16` or `torch.float16` to run the transformer under
            `torch.autocast` in that dtype (the model must be float32); `None`: the model's dtype.
    """

    def __init__(self, block: StarFlowBlock, rope: VisionRope | None = None,
                 guidance: LogitsGuidance | None = None, y: Tensor | None = None, y_null: Tensor | None = None,
                 autocast: torch.dtype | None = None):
        if not isinstance(block, StarFlowBlock):
            raise TypeError(f"block must be a StarFlowBlock; got {type(block).__name__}")
        if guidance is not None and not isinstance(guidance, LogitsGuidance):
            raise TypeError(f"guidance must be a LogitsGuidance; got {type(guidance).__name__}")
        if guidance is not None and guidance.active and block.proj_txt is None:
            raise ValueError("guidance needs a text-conditioned block; this block reads no text")
        _check_autocast(autocast)
        self.block, self.rope = block, rope
        self.guidance = guidance or LogitsGuidance()
        self.y, self.y_null = y, y_null
        self.autocast = autocast
        self.seq_len = block.num_patches

    def __repr__(self) -> str:
        g = self.guidance
        extra = f", guidance={g.weight}" if g.active else ""
        extra += f", attn_temp={g.attn_temp}" if g.attn_temp != 1.0 else ""
        extra += f", autocast={self.autocast}" if self.autocast is not None else ""
        order = "flip" if self.block.flip else "identity"
        text = self.block.proj_txt is not None
        return f"StarFlowARBlock(T={self.seq_len}, D={self.block.in_channels}, order={order}, text={text}{extra})"

    # -- conditioning

    def _text(self, cond: Any, batch: int, like: Tensor) -> Tensor | None:
        """`(G * B, L, txt_dim)` text of the `G` groups (captions, then null captions), or `None`."""
        if self.block.proj_txt is None:
            return None
        y, y_null = cond if isinstance(cond, (tuple, list)) else (cond, None)
        y = self.y if y is None else y
        y_null = self.y_null if y_null is None else y_null
        if not isinstance(y, Tensor) or y.dim() != 3 or y.shape[0] != batch or y.shape[2] != self.block.txt_dim:
            raise ValueError(f"cond must hold text embeddings y (B={batch}, L, txt_dim={self.block.txt_dim}) for a "
                             f"text-conditioned block; got {tuple(y.shape) if isinstance(y, Tensor) else y!r}")
        if y.dtype != like.dtype:
            raise TypeError(f"y has dtype {y.dtype} but the model is {like.dtype}; cast one")
        if self.groups == 1:
            return y
        if not isinstance(y_null, Tensor) or y_null.dim() != 3 or y_null.shape[0] not in (1, batch) \
                or y_null.shape[1:] != y.shape[1:]:
            raise ValueError(f"guidance needs y_null, the null captions' embeddings ({(batch, *y.shape[1:])} or "
                             f"{(1, *y.shape[1:])}); got {tuple(y_null.shape) if isinstance(y_null, Tensor) else y_null!r}")
        return torch.cat([y, y_null.to(y.dtype).expand_as(y)])

    def _positions(self, text: Tensor | None, like: Tensor) -> Positions:
        length = 0 if text is None else text.shape[1]
        grid = self.block.grid
        rope = None if self.rope is None else self.rope.tables(grid, grid, length, like.dtype, like.device)
        return self.block.positions(length, rope)

    # -- running tokens

    def _tokens(self, x_tok: Tensor, start: int, class_embed: Any, kv: list[KV] | None = None,
                pos_embed: Positions | None = None) -> Tensor:
        """`head` output of image tokens `[start, start + n)` for the `G` groups: `(G, b, n, 2D)`.

        `pos_embed` is the solve's `Positions` (the cache's); `class_embed` is unused (STARFlow
        has no classes: the text is in the cached prefix). Under autocast the pass runs in the
        autocast dtype and its output is cast back to `x_tok`'s.
        """
        blk, g = self.block, self.groups
        with self._autocast(x_tok.device):
            h = blk.embed(x_tok, start, pos_embed)
            h = h if g == 1 else torch.cat([h] * g)
            h = blk.transformer(h, Context(pos_embed.prefix + start, pos_embed.rope, self.guidance.attn_temp), kv)
            out = blk.head(h)
        return out.unflatten(0, (g, x_tok.shape[0])).to(x_tok.dtype)

    def _combine(self, out: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """`(G, b, n, 2D)` head rows `[start, start + n)` to guided `(mu, log_sigma)`, `(b, n, D)`."""
        blk = self.block
        a, mu = out.chunk(2, dim=-1)
        if self.groups == 1 and not blk.use_softplus:
            mu, log_sigma = mu[0], a[0]
        else:
            sigma = blk.scale(a)
            mu, sigma = (mu[0], sigma[0]) if self.groups == 1 else self.guidance.combine(
                (mu[0], sigma[0]), (mu[1], sigma[1]), start, self.seq_len)
            log_sigma = sigma.log()
        if start == 0 and not blk.use_sos:  # row 0 is copied from the noise
            mu, log_sigma = mu.clone(), log_sigma.clone()
            mu[:, 0], log_sigma[:, 0] = 0, 0
        return mu, log_sigma

    # -- AffineARBlock

    def affine(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """Guided `(mu, log_sigma)` of all rows, each `(B, T, D)`, from one causal pass (prefix included)."""
        self._check_x(x)
        text = self._text(cond, x.shape[0], x)
        xs = x if self.groups == 1 else torch.cat([x] * self.groups)
        with self._autocast(x.device):
            out, _ = self.block.rows(xs, text, self._positions(text, x), self.guidance.attn_temp)
        out = out.to(x.dtype)
        return self._combine(out.unflatten(0, (self.groups, x.shape[0])), 0)

    # -- CachedARBlock

    def init_cache(self, z: Tensor, cond: Any = None) -> StarFlowCache:
        """Preallocate keys, values and outputs for the batch of `z` (`(B, T, D)`) and encode the prefix.

        Returns:
            A [`StarFlowCache`][arflow_solvers.adapters.starflow.cache.StarFlowCache] of the batch.
        """
        self._check_x(z, "z")
        blk, batch, g = self.block, z.shape[0], self.groups
        text = self._text(cond, batch, z)
        pos = self._positions(text, z)
        length = pos.prefix + self.seq_len - 1
        shapes = [(g * batch, layer.attention.num_kv_heads, length, layer.attention.head_dim)
                  for layer in blk.attn_blocks]
        kv_dtype = self._cache_dtype(z)  # the autocast dtype (own or the caller's), else the model's
        cache = StarFlowCache(
            keys=[z.new_empty(s, dtype=kv_dtype) for s in shapes],
            values=[z.new_empty(s, dtype=kv_dtype) for s in shapes],
            outputs=z.new_zeros(g, batch, self.seq_len + 1, blk.proj_out.out_features), fed=z.new_empty(z.shape),
            valid=torch.zeros(batch, dtype=torch.long, device=z.device), class_embed=None, groups=g, batch=batch,
            everyone=torch.arange(batch, device=z.device), pos_embed=pos, prefix=pos.prefix)
        self._encode_prefix(cache, text)
        return cache

    def _encode_prefix(self, cache: StarFlowCache, text: Tensor | None) -> None:
        """Write the prefix's keys and values into the cache, and the start token's output as row 0."""
        blk, pos = self.block, cache.pos_embed
        with self._autocast(cache.outputs.device):
            h = blk.prefix(text, cache.groups * cache.batch, pos)
            if h is None:
                return
            h = blk.transformer(h, Context(0, pos.rope, self.guidance.attn_temp), cache.kv(None, 0))
            out = blk.head(h[:, -1]) if blk.use_sos else None
        if out is not None:
            cache.outputs[:, :, 0] = out.unflatten(0, (cache.groups, cache.batch)).to(cache.outputs.dtype)
