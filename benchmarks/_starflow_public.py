"""The public STARFlow samplers, re-implemented here from their semantics on our modules (benchmark baselines).

- `public_reverse`: the public `Model.reverse` serial loop: one token per step, keys cached
  before the rotary embedding and the whole key prefix rotated again at every step, guidance
  as one batch of `2B`.
- `public_jacobi`: the public block-wise Jacobi sampler (`MetaBlock.jacobi`, `jacobi=True`):
  chunks of `block_size` tokens, at most `max_iter` iterations per chunk, a chunk stops when
  `mean((new - old)^2) / mean(new^2) < th` over the whole batch (both guidance halves), the
  cache rolled back after every iteration but the last, so the next chunk attends to keys
  computed from the iterate *before* the chunk's last update.

Both return the latents and, per block in sampling order, the network calls and the work in
full-pass equivalents (tokens x samples evaluated / (T x B)); the text prefix's encoding (one
call per text-conditioned block, as in every sampler here) is not counted.

References:
    STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
    (Gu et al., 2025), https://arxiv.org/abs/2506.06276 (code: apple/ml-starflow, e565a46)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arflow_solvers.adapters.starflow import LogitsGuidance, StarFlow, StarFlowBlock  # noqa: E402
from arflow_solvers.adapters.starflow.rope import apply_rope  # noqa: E402

__all__ = ["public_reverse", "public_jacobi"]


class _Cache:
    """The public `KVCache`: preallocated raw (not yet rotated) keys and values, a write index, rollback."""

    def __init__(self, block: StarFlowBlock, batch: int, length: int, like: Tensor):
        self.keys = [like.new_zeros(batch, layer.attention.num_kv_heads, length, layer.attention.head_dim)
                     for layer in block.attn_blocks]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.index = [0] * len(self.keys)

    def __call__(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        at, n = self.index[i], k.shape[2]
        self.keys[i][:, :, at : at + n], self.values[i][:, :, at : at + n] = k, v
        self.index[i] = at + n
        return self.keys[i][:, :, : at + n], self.values[i][:, :, : at + n]

    def back(self, n: int) -> None:
        self.index = [max(0, i - n) for i in self.index]


def _attention(attn, h: Tensor, cache: _Cache, i: int, rope, temp: float) -> Tensor:
    b, n, _ = h.shape
    q, k, v = attn.qkv(attn.norm(h)).split(attn.split_sizes, dim=-1)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2) for t in (q, k, v))
    if attn.query_norm is not None:
        q, k = attn.query_norm(q), attn.key_norm(k)
    k, v = cache(i, k, v)
    lq, lk = q.shape[2], k.shape[2]
    if rope is not None:
        cos, sin = rope
        q = apply_rope(q, cos[lk - lq : lk], sin[lk - lq : lk], attn.hf_style_rope)
        k = apply_rope(k, cos[:lk], sin[:lk], attn.hf_style_rope)
    if attn.num_kv_heads != attn.num_heads:
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
        v = v.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=h.device).tril(lk - lq) if lq < lk else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                         scale=(attn.head_dim**-0.25) ** 2 / temp)
    out = attn.proj(out.transpose(1, 2).reshape(b, n, -1))
    return out if attn.post_norm is None else attn.post_norm(out)


def _layers(block: StarFlowBlock, h: Tensor, cache: _Cache, rope, temp: float = 1.0) -> Tensor:
    for i, layer in enumerate(block.attn_blocks):
        h = h + _attention(layer.attention, h, cache, i, rope, temp)
        h = h + layer.mlp(h)
    return h if block.final_norm is None else block.final_norm(h)


def _scale_shift(block: StarFlowBlock, h: Tensor, guidance: float) -> tuple[Tensor, Tensor]:
    """`(sigma, mu)` of the head output; guided (and duplicated over both halves) when `guidance > 0`."""
    a, mu = block.head(h).chunk(2, dim=-1)
    sigma = block.scale(a)
    if guidance > 0:
        (mu_c, mu_u), (s_c, s_u) = mu.chunk(2), sigma.chunk(2)
        mu, sigma = LogitsGuidance(guidance).combine((mu_c, s_c), (mu_u, s_u), 0, 0)
        mu, sigma = torch.cat([mu, mu]), torch.cat([sigma, sigma])
    return sigma, mu


def _start(model: StarFlow, index: int, z: Tensor, y: Tensor | None, guidance: float, temp: float):
    """Permuted (and doubled) noise, an empty cache with the text encoded, and the rope table."""
    block = model.blocks[index]
    z = block.permute(torch.cat([z, z]) if guidance > 0 else z)
    text = y if block.proj_txt is not None else None
    length = 0 if text is None else text.shape[1]
    rope = model.rope_tables(index, length, z)
    cache = _Cache(block, z.shape[0], length + block.num_patches, z)
    if text is not None:
        _layers(block, block.proj_txt(text), cache, rope, temp)
    return block, z, cache, rope


def _reverse_block(model: StarFlow, index: int, z: Tensor, y, guidance: float, temp: float) -> tuple[Tensor, int]:
    block, z, cache, rope = _start(model, index, z, y, guidance, temp)
    x = z.clone()
    steps = block.num_patches if block.use_sos else block.num_patches - 1
    for t in range(steps):
        if block.use_sos:
            token = block.sos_embed.expand(x.shape[0], 1, -1) if t == 0 else x[:, t - 1 : t]
        else:
            token = x[:, t : t + 1]
        h = block.proj_in(token)
        if block.pos_embed is not None:
            h = h + block.permute(block.pos_embed, dim=0)[t : t + 1]
        sigma, mu = _scale_shift(block, _layers(block, h, cache, rope, temp), guidance)
        row = t if block.use_sos else t + 1
        x[:, row] = z[:, row] * sigma[:, 0] + mu[:, 0]
    return block.permute(x[: x.shape[0] // 2] if guidance > 0 else x), steps


def _jacobi_block(model: StarFlow, index: int, z: Tensor, y, guidance: float, th: float, block_size: int,
                  max_iter: int) -> tuple[Tensor, int, float]:
    block, z, cache, rope = _start(model, index, z, y, guidance, 1.0)
    if not block.use_sos or block.pos_embed is not None:
        raise ValueError("the public Jacobi sampler needs sos=True and rope=True")
    x_full = torch.cat([block.sos_embed.expand(z.shape[0], 1, -1), z.clone()], dim=1)
    seq_len, start, calls, tokens = z.shape[1], 0, 0, 0
    while start < seq_len:
        size = min(block_size, seq_len - start)
        for i in range(max_iter):
            sigma, mu = _scale_shift(block, _layers(block, block.proj_in(x_full[:, start : start + size]), cache,
                                                    rope), guidance)
            calls, tokens = calls + 1, tokens + size
            new = mu + sigma * z[:, start : start + size]
            old = x_full[:, start + 1 : start + 1 + size]
            diff = ((new - old) ** 2).mean() / (new**2).mean()
            x_full[:, start + 1 : start + 1 + size] = new
            if diff < th or i == max_iter - 1:
                break
            cache.back(size)
        start += size
    x = x_full[:, 1:]
    return block.permute(x[: x.shape[0] // 2] if guidance > 0 else x), calls, tokens / seq_len


def _run(model: StarFlow, z: Tensor, y: Tensor | None, guidance: float, solve_block) -> tuple[Tensor, list, list]:
    """The public `Model.reverse` around a per-block sampler: deep block first, then the shallow ones."""
    with torch.no_grad():
        x = model.patchify(z).flatten(1, 2)
        calls, work = [], []
        for index in reversed(range(len(model.blocks))):
            if not isinstance(model.blocks[index], StarFlowBlock):
                continue
            if index < len(model.blocks) - 1 and model.cond_top_only and guidance > 0:
                guidance, y = 0.0, y.chunk(2)[0]
            x, n, w = solve_block(index, x, y, guidance)
            calls.append(n)
            work.append(w)
        return model.unpatchify(x.unflatten(1, (model.grid, model.grid))), calls, work


def public_reverse(model: StarFlow, z: Tensor, y: Tensor | None = None, guidance: float = 0.0,
                   attn_temp: float = 1.0) -> tuple[Tensor, list[int], list[float]]:
    """The public serial sampler; `y` holds captions then null captions (`2B` rows) when `guidance > 0`."""
    def solve_block(index, x, y, guidance):
        out, steps = _reverse_block(model, index, x, y, guidance, attn_temp)
        return out, steps, float(steps) / x.shape[1]

    return _run(model, z, y, guidance, solve_block)


def public_jacobi(model: StarFlow, z: Tensor, y: Tensor | None = None, guidance: float = 0.0, th: float = 0.005,
                  block_size: int = 64, max_iter: int = 32) -> tuple[Tensor, list[int], list[float]]:
    """The public block-wise Jacobi sampler (`jacobi_th=th`, `jacobi_block_size`, `jacobi_max_iter`)."""
    return _run(model, z, y, guidance,
                lambda index, x, y, guidance: _jacobi_block(model, index, x, y, guidance, th, block_size, max_iter))
