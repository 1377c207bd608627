"""A TarFlow block as the solvers see it: a cached autoregressive block with batched guidance."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .cache import TarFlowCache
from .guidance import Guidance
from .layers import KV
from .model import TarFlowBlock, _check_labels

__all__ = ["TarFlowARBlock"]

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _check_autocast(autocast: Any) -> None:
    """Raise unless `autocast` is `None`, `torch.bfloat16` or `torch.float16`."""
    if autocast is not None and autocast not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16; got {autocast!r}")


class TarFlowARBlock:
    r"""A [`TarFlowBlock`][arflow_solvers.adapters.tarflow.TarFlowBlock] as a cached autoregressive block.

    Works in the block's own (permuted) order; the flow puts the permutation around it.
    Satisfies [`CachedARBlock`][arflow_solvers.CachedARBlock] and
    [`HasOutputProjection`][arflow_solvers.HasOutputProjection]:

    - `affine(x, cond)`: one causal pass over all `T` patches.
    - `init_cache(z, cond)`: preallocates keys and values for every layer, so a serial step
      feeds one token and nothing is concatenated.
    - `affine_range(cache, x, start, stop, cond, rows)`: row `t` comes from token `t - 1`, so
      it feeds tokens `[first, stop - 1)` against the cache, `first` being the first token
      whose patch differs from the one its cached keys were computed from: one token per
      serial step, and a Jacobi iteration skips the prefix that has stopped changing.
    - `commit` costs nothing: committed tokens are written by the next call that needs them,
      and never compared again once written.
    - Guidance runs the conditional and unconditional passes as one batch of `2B` and
      combines them inside, with the annealing weight of each row, so any range is right.

    Both `affine` and `affine_range` run the block's one transformer pass,
    [`TarFlowBlock.transformer`][arflow_solvers.adapters.tarflow.TarFlowBlock.transformer].

    `cond` is the class labels, `(B,)` integers (`-1`: mean class embedding) or `None`
    (mean embedding, i.e. unconditional). A cached solve takes the labels once, in
    `init_cache`; when `cond` is `None` the labels bound at construction (`y`) are used.

    **Mixed precision** (`autocast=torch.bfloat16`), as the public sampler runs under
    `torch.autocast("cuda", torch.bfloat16)`: the model and the iterate stay float32; every
    transformer pass runs under `torch.autocast(device, autocast)`, so the linear layers and
    attention run in bfloat16 while the residual stream, the layer norms and the softmax
    accumulation stay float32; the keys and values are cached in bfloat16 (no float32 copy of
    the cache is cast per step); and the block returns `(mu, log_sigma)` in the iterate's
    float32, so the guidance combination, `exp` and the affine update run in float32. A solve
    run inside an `autocast` context of the caller's own is treated the same way (the cache
    takes that context's dtype).

    References:
        Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
        https://arxiv.org/abs/2412.06329;
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Arguments:
        block: the network.
        guidance: a [`Guidance`][arflow_solvers.adapters.tarflow.guidance.Guidance]; `None` for none.
        y: default labels when `cond` is `None`.
        autocast: `torch.bfloat16` or `torch.float16` to run the transformer under
            `torch.autocast` in that dtype (the model must be float32); `None`: the model's dtype.
    """

    def __init__(self, block: TarFlowBlock, guidance: Guidance | None = None, y: Tensor | None = None,
                 autocast: torch.dtype | None = None):
        if not isinstance(block, TarFlowBlock):
            raise TypeError(f"block must be a TarFlowBlock; got {type(block).__name__}")
        _check_autocast(autocast)
        self.block = block
        self.guidance = guidance or Guidance()
        self.y = y
        self.autocast = autocast
        self.seq_len = block.num_patches

    def __repr__(self) -> str:
        g = self.guidance
        extra = f", guidance={g.weight}, guide_what={g.what!r}, attn_temp={g.attn_temp}" if g.active else ""
        extra += f", autocast={self.autocast}" if self.autocast is not None else ""
        order = "flip" if self.block.flip else "identity"
        return f"TarFlowARBlock(T={self.seq_len}, D={self.block.in_channels}, order={order}{extra})"

    @property
    def groups(self) -> int:
        """2 when guidance needs an unconditional pass, else 1."""
        return 2 if self.guidance.active else 1

    def parameters(self) -> Iterator[nn.Parameter]:
        """The TarFlow block's parameters, so that solves differentiate with respect to them."""
        return self.block.parameters()

    def output_projection(self) -> tuple[Tensor, Tensor]:
        """`(W_mu, W_log_sigma)` from `proj_out` (for the CRM metric)."""
        return self.block.output_projection()

    # -- conditioning

    def _labels(self, cond: Any, batch: int) -> Tensor | None:
        y = self.y if cond is None else cond
        if y is not None and not isinstance(y, Tensor):
            raise TypeError(f"cond must be a LongTensor of class labels or None; got {type(y).__name__}")
        if y is not None and self.block.class_embed is None:
            return None  # unconditional block: labels are ignored, as in the public code
        return _check_labels(y, batch, self.block.num_classes)

    def _class_embed(self, cond: Any, batch: int, dtype: torch.dtype) -> Tensor | None:
        """`(G, B, 1, C)` class embeddings: conditional, then unconditional (mean)."""
        blk = self.block
        if blk.class_embed is None:
            return None
        cond_embed = blk.class_embedding(self._labels(cond, batch)).to(dtype).expand(batch, 1, -1)
        if self.groups == 1:
            return cond_embed.unsqueeze(0)
        mean = blk.class_embedding(None).to(dtype).expand(batch, 1, -1)
        return torch.stack([cond_embed, mean])

    # -- mixed precision

    def _autocast(self, device: torch.device) -> Any:
        """The `torch.autocast` context of the transformer passes (a no-op without `autocast`)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def _cache_dtype(self, z: Tensor) -> torch.dtype:
        """dtype of the cached keys and values: the autocast dtype (own or the caller's), else `z`'s."""
        if self.autocast is not None:
            if z.dtype != torch.float32:
                raise TypeError(f"autocast={self.autocast} needs a float32 model and noise; got {z.dtype} "
                                "(autocast leaves float64 untouched; cast the model with .float())")
            return self.autocast
        if torch.is_autocast_enabled(z.device.type) and z.dtype == torch.float32:
            return torch.get_autocast_dtype(z.device.type)
        return z.dtype

    # -- running tokens

    def _tokens(self, x_tok: Tensor, start: int, class_embed: Tensor | None, kv: list[KV] | None = None,
                pos_embed: Tensor | None = None) -> Tensor:
        """`proj_out` of tokens `[start, start + n)` for the `G` groups: `(G, b, n, out)`.

        `x_tok` is `(b, n, D)` in own order; `kv`, `pos_embed` as in
        [`TarFlowBlock.transformer`][arflow_solvers.adapters.tarflow.TarFlowBlock.transformer]
        and [`embed`][arflow_solvers.adapters.tarflow.TarFlowBlock.embed]. Under guidance the
        groups run as one batch of `2b`, the second half tempered by `attn_temp`. Under
        autocast the pass runs in the autocast dtype and its output is cast back to `x_tok`'s.
        """
        blk = self.block
        b, n, _ = x_tok.shape
        with self._autocast(x_tok.device):
            h = blk.embed(x_tok, start, None, pos_embed)
            if self.groups == 1:
                h = h if class_embed is None else h + class_embed[0]
                return blk.transformer(h, start, kv).unsqueeze(0).to(x_tok.dtype)
            h = h.unsqueeze(0).expand(2, b, n, h.shape[-1])
            if class_embed is not None:
                h = h + class_embed
            out = blk.transformer(h.reshape(2 * b, n, -1), start, kv, self.guidance.attn_temp, temp_from=b)
        return out.reshape(2, b, n, -1).to(x_tok.dtype)

    def _combine(self, out: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """`(G, b, n, out)` rows `[start, start + n)` to guided `(mu, log_sigma)`, `(b, n, D)`."""
        cond = self.block.split(out[0])
        if self.groups == 1:
            return cond
        return self.guidance.combine(cond, self.block.split(out[1]), start, self.seq_len)

    # -- AffineARBlock

    def _check_x(self, x: Tensor, name: str = "x") -> None:
        blk = self.block
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1:] != (blk.num_patches, blk.in_channels):
            raise ValueError(
                f"{name} must be (B, {blk.num_patches}, {blk.in_channels}); got {tuple(getattr(x, 'shape', ()))}"
            )
        if x.dtype != blk.proj_in.weight.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the model is {blk.proj_in.weight.dtype}; cast one")

    def affine(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """Guided `(mu, log_sigma)` of all rows, each `(B, T, D)`, from one causal pass."""
        self._check_x(x)
        out = self._tokens(x, 0, self._class_embed(cond, x.shape[0], x.dtype))
        shifted = torch.zeros_like(out)
        shifted[:, :, 1:] = out[:, :, :-1]
        return self._combine(shifted, 0)

    # -- CachedARBlock

    def init_cache(self, z: Tensor, cond: Any = None) -> TarFlowCache:
        """Preallocate keys, values and outputs for the batch of `z` (`(B, T, D)`).

        Returns:
            A [`TarFlowCache`][arflow_solvers.adapters.tarflow.cache.TarFlowCache] of the batch.
        """
        self._check_x(z, "z")
        blk = self.block
        batch, seq_len, g = z.shape[0], blk.num_patches, self.groups
        heads = [(layer.attention.num_heads, layer.attention.head_dim) for layer in blk.attn_blocks]
        shapes = [(g * batch, h, seq_len, d) for h, d in heads]
        kv_dtype = self._cache_dtype(z)
        return TarFlowCache(
            keys=[z.new_empty(s, dtype=kv_dtype) for s in shapes],
            values=[z.new_empty(s, dtype=kv_dtype) for s in shapes],
            outputs=z.new_zeros(g, batch, seq_len + 1, blk.proj_out.out_features),
            fed=z.new_empty(z.shape),
            valid=torch.zeros(batch, dtype=torch.long, device=z.device),
            class_embed=self._class_embed(cond, batch, z.dtype),
            pos_embed=blk.permute(blk.pos_embed, dim=0),
            groups=g,
            batch=batch,
            everyone=torch.arange(batch, device=z.device),
        )

    def commit(self, cache: TarFlowCache, x: Tensor, upto: int, cond: Any = None) -> None:
        """Declare `x[:, :upto]` final. Costs nothing: the next call reuses or writes its tokens."""
        cache.committed = max(cache.committed, upto)

    def affine_range(
        self,
        cache: TarFlowCache,
        x: Tensor,
        start: int,
        stop: int,
        cond: Any = None,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Guided `(mu, log_sigma)` of rows `[start, stop)`, each `(b, stop - start, D)`.

        Row `t` needs token `t - 1`, so tokens `[first, stop - 1)` are fed, where `first` is
        the first token whose cached keys and values are stale for any of the samples (one
        token per serial step; a Jacobi iteration skips the prefix that stopped changing).
        `x` is `(b, T, D)`, the samples `rows` of the cache. The labels come from the cache.
        """
        if not 0 <= start < stop <= self.seq_len or start < cache.committed:
            raise ValueError(
                f"need committed={cache.committed} <= start < stop <= {self.seq_len}; got start={start}, stop={stop}"
            )
        last = stop - 1
        rows = cache.subset(rows)
        first = cache.first_stale(x, rows, last)
        if first < last:
            x_tok = x[:, first:last]
            kv = cache.kv(rows, last)
            out = self._tokens(x_tok, first, cache.class_embeddings(rows), kv, cache.pos_embed)
            cache.store(out, x_tok, kv, rows, first, last)
        else:
            cache.forget_after(rows, last)  # tokens past `last` may have been fed another prefix
        if rows is None:
            cache.stable = max(cache.stable, min(cache.committed, last))
        return self._combine(cache.rows_out(rows, start, stop), start)
