"""TarFlow: a transformer autoregressive flow, state-dict compatible with the public checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arflow_solvers import Flow, Permute, Serial, solve_inverse

__all__ = [
    "TarFlow",
    "TarFlowBlock",
    "TarFlowARBlock",
    "Attention",
    "MLP",
    "AttentionBlock",
    "as_flow",
    "load_for_planning",
    "sample",
    "denoise",
    "patchify",
    "unpatchify",
]


# ----------------------------------------------------------------------------- helpers


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut images into a sequence of flattened patches, in raster order.

    Arguments:
        x: `(B, C, H, W)` images, `H` and `W` multiples of `patch_size`.
        patch_size: side of a square patch.

    Returns:
        `(B, T, C * patch_size**2)` with `T = (H // p) * (W // p)`; channel-major within a
        patch (the layout of `torch.nn.functional.unfold`).

    Example:
        >>> patchify(torch.zeros(2, 1, 8, 8), 2).shape
        torch.Size([2, 16, 4])
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[2] % patch_size or x.shape[3] % patch_size:
        raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of patch_size={patch_size}")
    return F.unfold(x, patch_size, stride=patch_size).transpose(1, 2)


def unpatchify(x: Tensor, img_size: int, patch_size: int) -> Tensor:
    """Inverse of [`patchify`][arflow_solvers.adapters.tarflow.patchify] for square images.

    Arguments:
        x: `(B, T, C * patch_size**2)` patches in raster order.
        img_size: side of the square image.
        patch_size: side of a square patch.

    Returns:
        `(B, C, img_size, img_size)`.

    Example:
        >>> x = torch.randn(2, 1, 8, 8)
        >>> bool(torch.equal(unpatchify(patchify(x, 2), 8, 2), x))
        True
    """
    if x.dim() != 3 or x.shape[1] != (img_size // patch_size) ** 2:
        raise ValueError(
            f"x must be (B, {(img_size // patch_size) ** 2}, C * {patch_size}**2); got shape {tuple(x.shape)}"
        )
    return F.fold(x.transpose(1, 2), (img_size, img_size), patch_size, stride=patch_size)


def _mean_class_where_negative(class_embed: Tensor, y: Tensor) -> Tensor:
    """Class embeddings `(B, 1, C)` of labels `y`; a negative label takes the mean embedding."""
    picked = class_embed[y.clamp(min=0)]
    return torch.where((y < 0).view(-1, 1, 1), class_embed.mean(dim=0, keepdim=True), picked)


def _check_labels(y: Tensor | None, batch: int, num_classes: int) -> Tensor | None:
    """Validate class labels `y` (`(B,)` integers in `[-1, num_classes)`, or `None`)."""
    if y is None:
        return None
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a LongTensor of class labels or None; got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != batch or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an integer tensor of shape ({batch},); got {y.dtype} {tuple(y.shape)}")
    if num_classes == 0:
        raise ValueError("y was given but the model is unconditional (num_classes=0); pass y=None")
    if bool((y >= num_classes).any()) or bool((y < -1).any()):
        raise ValueError(f"y must hold labels in [-1, {num_classes}) (-1: mean class); got {y.tolist()}")
    return y.long()


# ----------------------------------------------------------------------------- network


def _norm(norm: nn.LayerNorm, h: Tensor) -> Tensor:
    """Layer norm computed in at least float32 (as the public code does), returned in `h`'s dtype."""
    if h.dtype in (torch.float16, torch.bfloat16):
        w = None if norm.weight is None else norm.weight.float()
        b = None if norm.bias is None else norm.bias.float()
        return F.layer_norm(h.float(), norm.normalized_shape, w, b, norm.eps).type(h.dtype)
    return norm(h)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention (`norm`, `qkv`, `proj`: the public parameter names).

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

    def qkv_heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(B, n, C)` hidden states to `q, k, v`, each `(B, heads, n, head_dim)`."""
        b, n, _ = h.shape
        hn = _norm(self.norm, h)
        q, k, v = self.qkv(hn).reshape(b, n, 3 * self.num_heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Scaled dot-product attention, then the output projection: `(B, n, C)`."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        b, _, n, _ = q.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv_heads(h)
        return self.attend(q, k, v, mask)


class MLP(nn.Module):
    """Pre-norm MLP `Linear -> GELU -> Linear` (`norm`, `main.0`, `main.2`)."""

    def __init__(self, channels: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.main = nn.Sequential(
            nn.Linear(channels, channels * expansion), nn.GELU(), nn.Linear(channels * expansion, channels)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.main(_norm(self.norm, h))


class AttentionBlock(nn.Module):
    """One transformer layer: `h + attention(h)`, then `h + mlp(h)`."""

    def __init__(self, channels: int, head_dim: int, expansion: int):
        super().__init__()
        self.attention = Attention(channels, head_dim)
        self.mlp = MLP(channels, expansion)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        h = h + self.attention(h, mask)
        return h + self.mlp(h)


class TarFlowBlock(nn.Module):
    r"""One TarFlow flow block (the public `MetaBlock`): a causal transformer over patches.

    In its own order (the patches flipped when `flip`), with $x_{-1}$ read as nothing,

    $$z_t = (x_t - \mu_t(x_{<t}))\, e^{-\log\sigma_t(x_{<t})},\qquad
      (\log\sigma_t, \mu_t) = \mathrm{proj\_out}(h_{t-1}),$$

    where $h$ is the transformer output; row 0 has $\mu_0 = \log\sigma_0 = 0$. For sampling
    wrap it with [`ar_block`][arflow_solvers.adapters.tarflow.TarFlowBlock.ar_block], which satisfies
    [`CachedARBlock`][arflow_solvers.CachedARBlock] and works in the block's own order.

    References:
        Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
        https://arxiv.org/abs/2412.06329

    Arguments:
        in_channels: channels per patch `D` (image channels times `patch_size**2`).
        channels: transformer width `C`.
        num_patches: sequence length `T`.
        flip: reverse the patch order (the public `PermutationFlip`); else identity.
        num_layers: transformer layers.
        head_dim: channels per attention head.
        expansion: MLP hidden width as a multiple of `C`.
        nvp: predict a scale as well as a shift (else volume preserving, `log_sigma = 0`).
        num_classes: number of class embeddings; 0 for an unconditional block.
    """

    attn_mask: Tensor

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_patches: int,
        flip: bool = False,
        num_layers: int = 1,
        head_dim: int = 64,
        expansion: int = 4,
        nvp: bool = True,
        num_classes: int = 0,
    ):
        super().__init__()
        self.proj_in = nn.Linear(in_channels, channels)
        self.pos_embed = nn.Parameter(torch.randn(num_patches, channels) * 1e-2)
        if num_classes:
            self.class_embed = nn.Parameter(torch.randn(num_classes, 1, channels) * 1e-2)
        else:
            self.register_parameter("class_embed", None)
        self.attn_blocks = nn.ModuleList(AttentionBlock(channels, head_dim, expansion) for _ in range(num_layers))
        self.nvp = nvp
        self.proj_out = nn.Linear(channels, 2 * in_channels if nvp else in_channels)
        self.proj_out.weight.data.zero_()
        self.register_buffer("attn_mask", torch.tril(torch.ones(num_patches, num_patches)))
        self.flip = flip
        self.in_channels = in_channels
        self.num_patches = num_patches
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        order = "flip" if self.flip else "identity"
        return f"T={self.num_patches}, D={self.in_channels}, order={order}, nvp={self.nvp}, classes={self.num_classes}"

    # -- orders and conditioning

    def permute(self, x: Tensor, dim: int = 1) -> Tensor:
        """The block's order (its own inverse): flipped along `dim` when `flip`."""
        return x.flip(dims=[dim]) if self.flip else x

    def class_embedding(self, y: Tensor | None, batch: int, mean_for_negative: bool = True) -> Tensor | None:
        """`(B or 1, 1, C)` class embedding; `None` labels give the mean embedding."""
        if self.class_embed is None:
            return None
        if y is None:
            return self.class_embed.mean(dim=0, keepdim=True)
        return _mean_class_where_negative(self.class_embed, y)

    # -- the network in the block's own order

    def embed(self, x_perm: Tensor, start: int, class_embed: Tensor | None) -> Tensor:
        """Token embeddings of patches at positions `[start, start + n)` (own order)."""
        pos = self.permute(self.pos_embed, dim=0)[start : start + x_perm.shape[1]]
        h = self.proj_in(x_perm) + pos
        return h if class_embed is None else h + class_embed

    def split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """`proj_out` output to `(mu, log_sigma)` (`xb`, `xa` in the public code)."""
        if self.nvp:
            log_sigma, mu = out.chunk(2, dim=-1)
            return mu, log_sigma
        return out, torch.zeros_like(out)

    def network(self, x_perm: Tensor, class_embed: Tensor | None) -> Tensor:
        """Full causal pass: `(B, T, D)` in own order to shifted `proj_out` rows `(B, T, 2D)`."""
        h = self.embed(x_perm, 0, class_embed)
        mask = self.attn_mask.bool()
        for layer in self.attn_blocks:
            h = layer(h, mask)
        out = self.proj_out(h)
        return torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Density direction: `(B, T, D)` data-order patches to `(z, logdet)`.

        `logdet` is per sample, `-mean(log_sigma)` over positions and channels (as public).
        """
        x_perm = self.permute(x)
        mu, log_sigma = self.split(self.network(x_perm, self.class_embedding(y, x.shape[0])))
        low = log_sigma.dtype in (torch.float16, torch.bfloat16)  # public: exp in float32
        scale = (-(log_sigma.float() if low else log_sigma)).exp().type(log_sigma.dtype)
        return self.permute((x_perm - mu) * scale), -log_sigma.mean(dim=[1, 2])

    def output_projection(self) -> tuple[Tensor, Tensor]:
        """`(W_mu, W_log_sigma)`, each `(D, C)`, the rows of `proj_out` giving each output."""
        w = self.proj_out.weight
        if self.nvp:
            w_log_sigma, w_mu = w.chunk(2, dim=0)
            return w_mu, w_log_sigma
        return w, torch.zeros_like(w)

    def ar_block(
        self,
        guidance: float = 0.0,
        guide_what: str = "ab",
        attn_temp: float = 1.0,
        annealed_guidance: bool = False,
        y: Tensor | None = None,
    ) -> TarFlowARBlock:
        """This block as a [`CachedARBlock`][arflow_solvers.CachedARBlock] for the solvers."""
        return TarFlowARBlock(self, Guidance(guidance, guide_what, attn_temp, annealed_guidance), y)


# ----------------------------------------------------------------------------- sampling view


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings (public semantics).

    With `weight > 0` each row's conditional output `c` and unconditional output `u` (mean
    class embedding, attention temperature `attn_temp`) give `c + g (c - u)` for the parts
    named in `what` (`'a'`: `log_sigma`, `'b'`: `mu`); `g = weight`, or `weight * t / (T-1)`
    for row `t` when `annealed`.

    Arguments:
        weight: guidance weight; 0 turns guidance off.
        what: which outputs to guide, a subset of `'ab'`.
        attn_temp: attention temperature of the unconditional pass.
        annealed: ramp the weight linearly along the sequence.
    """

    weight: float = 0.0
    what: str = "ab"
    attn_temp: float = 1.0
    annealed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.what, str) or set(self.what) - set("ab"):
            raise ValueError(f"guide_what must be a subset of 'ab'; got {self.what!r}")
        if not self.weight >= 0:
            raise ValueError(f"guidance must be >= 0; got {self.weight}")
        if not self.attn_temp > 0:
            raise ValueError(f"attn_temp must be > 0; got {self.attn_temp}")

    @property
    def active(self) -> bool:
        """Whether an unconditional pass is needed (the public `guidance > 0 and guide_what`)."""
        return self.weight > 0 and bool(self.what)


@dataclass
class TarFlowCache:
    """KV cache of one block for one solve, preallocated in `init_cache`.

    Keys, values and outputs of token `t` of sample `r` are kept with the patch `fed[r, t]`
    they were computed from; they stay usable while `x[r, :t + 1]` equals `fed[r, :t + 1]`
    and `t < valid[r]`, so a call recomputes only from the first token that changed.

    Attributes:
        keys, values: per layer `(G * B, heads, T, head_dim)`; `G = 2` (conditional then
            unconditional) under guidance, else 1.
        outputs: `(G, B, T + 1, out)` `proj_out` rows; index `t + 1` holds token `t`'s, so
            row `r` of the flow is `outputs[:, :, r]` and index 0 stays zero.
        fed: `(B, T, D)` the patches the cached tokens were computed from.
        valid: `(B,)` tokens `[0, valid[r])` of sample `r` are cached; while every sample has
            the same count it is kept in `valid_all` instead (and `valid` is stale).
        pos_embed: `(T, C)` position embeddings in the block's order.
        stable: tokens `< stable` are committed and cached for every sample (never rechecked).
        committed: the committed prefix length.
        class_embed: `(G, B, 1, C)` class embeddings of the batch, or `None`.
        tokens_fed: token evaluations so far (samples x tokens, both guidance halves).
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
    tokens_fed: int = 0


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

    `cond` is the class labels, `(B,)` integers (`-1`: mean class embedding) or `None`
    (mean embedding, i.e. unconditional). A cached solve takes the labels once, in
    `init_cache`; when `cond` is `None` the labels bound at construction (`y`) are used.

    References:
        Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
        https://arxiv.org/abs/2412.06329;
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Arguments:
        block: the network.
        guidance: a [`Guidance`][arflow_solvers.adapters.tarflow.Guidance].
        y: default labels when `cond` is `None`.
    """

    def __init__(self, block: TarFlowBlock, guidance: Guidance | None = None, y: Tensor | None = None):
        if not isinstance(block, TarFlowBlock):
            raise TypeError(f"block must be a TarFlowBlock; got {type(block).__name__}")
        self.block = block
        self.guidance = guidance or Guidance()
        self.y = y
        self.seq_len = block.num_patches

    def __repr__(self) -> str:
        g = self.guidance
        extra = f", guidance={g.weight}, guide_what={g.what!r}, attn_temp={g.attn_temp}" if g.active else ""
        order = "flip" if self.block.flip else "identity"
        return f"TarFlowARBlock(T={self.seq_len}, D={self.block.in_channels}, order={order}{extra})"

    @property
    def groups(self) -> int:
        """2 when guidance needs an unconditional pass, else 1."""
        return 2 if self.guidance.active else 1

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
        """`(G, B or 1, 1, C)` class embeddings: conditional, then unconditional (mean)."""
        blk = self.block
        if blk.class_embed is None:
            return None
        cond_embed = blk.class_embedding(self._labels(cond, batch), batch).to(dtype)
        cond_embed = cond_embed.expand(batch, 1, -1)
        if self.groups == 1:
            return cond_embed.unsqueeze(0)
        mean = blk.class_embed.mean(dim=0, keepdim=True).to(dtype).expand(batch, 1, -1)
        return torch.stack([cond_embed, mean])

    # -- running tokens

    def _temper(self, q: Tensor, batch: int) -> Tensor:
        """Divide the unconditional half of `q` by the attention temperature."""
        temp = self.guidance.attn_temp
        if self.groups == 1 or temp == 1.0:
            return q
        q = q.clone()
        q[batch:] = q[batch:] / temp
        return q

    def _tokens(
        self,
        x_tok: Tensor,
        start: int,
        class_embed: Tensor | None,
        keys: Sequence[Tensor] | None,
        values: Sequence[Tensor] | None,
        pos_embed: Tensor | None = None,
    ) -> Tensor:
        """`proj_out` of tokens `[start, start + n)` for `G` groups: `(G, b, n, out)`.

        `x_tok` is `(b, n, D)` in own order. With `keys`/`values` (per layer
        `(G * b, heads, >= start + n, head_dim)`, tokens `< start` filled) the new keys and
        values are written in place and attention reads the buffer; without, it is a plain
        causal pass (`start` must be 0).
        """
        blk = self.block
        b, n, _ = x_tok.shape
        g = self.groups
        pos = blk.permute(blk.pos_embed, dim=0) if pos_embed is None else pos_embed
        h = blk.proj_in(x_tok) + pos[start : start + n]
        if g == 1:
            if class_embed is not None:
                h = h + class_embed[0]
        else:
            h = h.unsqueeze(0).expand(g, b, n, h.shape[-1])
            if class_embed is not None:
                h = h + class_embed
            h = h.reshape(g * b, n, -1)
        stop = start + n
        if keys is None:
            mask = blk.attn_mask[:n, :n].bool()
        else:
            mask = None if n == 1 else blk.attn_mask[start:stop, :stop].bool()
        for i, layer in enumerate(blk.attn_blocks):
            attn = layer.attention
            q, k, v = attn.qkv_heads(h)
            if keys is not None:
                keys[i][:, :, start:stop] = k
                values[i][:, :, start:stop] = v
                k, v = keys[i][:, :, :stop], values[i][:, :, :stop]
            h = h + attn.attend(self._temper(q, b), k, v, mask)
            h = h + layer.mlp(h)
        return blk.proj_out(h).reshape(g, b, n, -1)

    def _combine(self, out: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """`(G, b, n, out)` rows `[start, start + n)` to guided `(mu, log_sigma)`, `(b, n, D)`."""
        mu, log_sigma = self.block.split(out[0])
        if self.groups == 1:
            return mu, log_sigma
        mu_u, log_sigma_u = self.block.split(out[1])
        g = self.guidance
        n = out.shape[2]
        if g.annealed:
            rows = torch.arange(start, start + n, dtype=torch.float64)
            weight = (rows / max(self.seq_len - 1, 1) * g.weight).to(out.dtype).to(out.device).view(n, 1)
        else:
            weight = g.weight
        if "a" in g.what:
            log_sigma = log_sigma + weight * (log_sigma - log_sigma_u)
        if "b" in g.what:
            mu = mu + weight * (mu - mu_u)
        return mu, log_sigma

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
        out = self._tokens(x, 0, self._class_embed(cond, x.shape[0], x.dtype), None, None)
        shifted = torch.zeros_like(out)
        shifted[:, :, 1:] = out[:, :, :-1]
        return self._combine(shifted, 0)

    # -- CachedARBlock

    def init_cache(self, z: Tensor, cond: Any = None) -> TarFlowCache:
        """Preallocate keys, values and outputs for the batch of `z` (`(B, T, D)`)."""
        self._check_x(z, "z")
        blk = self.block
        batch, seq_len = z.shape[0], blk.num_patches
        g = self.groups
        shapes = [(g * batch, layer.attention.num_heads, seq_len, layer.attention.head_dim) for layer in blk.attn_blocks]
        return TarFlowCache(
            keys=[z.new_empty(s) for s in shapes],
            values=[z.new_empty(s) for s in shapes],
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

    def _is_everyone(self, cache: TarFlowCache, rows: Tensor | None) -> bool:
        if rows is None:
            return True
        return rows.numel() == cache.batch and bool(torch.equal(rows, cache.everyone))

    @staticmethod
    def _valid(cache: TarFlowCache) -> Tensor:
        """The per-sample `valid` counts, materialised from `valid_all` when uniform."""
        if cache.valid_all is not None:
            cache.valid.fill_(cache.valid_all)
            cache.valid_all = None
        return cache.valid

    def _first_stale(self, cache: TarFlowCache, x: Tensor, rows: Tensor | None, last: int) -> int:
        """First token in `[stable, last)` whose cached entries are unusable for some sample."""
        lo = min(cache.stable, last)
        if lo >= last or (cache.valid_all is not None and cache.valid_all <= lo):
            return lo  # nothing cached past the stable prefix: no comparison needed
        fed = cache.fed[:, lo:last] if rows is None else cache.fed[rows, lo:last]
        valid = self._valid(cache)
        valid = valid if rows is None else valid[rows]
        positions = torch.arange(lo, last, device=x.device)
        stale = (x[:, lo:last] != fed).any(dim=-1) | (positions >= valid.unsqueeze(1))
        stale = stale.any(dim=0)
        return lo + int(stale.int().argmax()) if bool(stale.any()) else last

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
        everyone = self._is_everyone(cache, rows)
        rows = None if everyone else rows
        first = self._first_stale(cache, x, rows, last)
        if first < last:
            g, b = cache.groups, x.shape[0]
            cache.tokens_fed += g * b * (last - first)
            if everyone:
                out = self._tokens(x[:, first:last], first, cache.class_embed, cache.keys, cache.values,
                                   cache.pos_embed)
                cache.outputs[:, :, first + 1 : last + 1] = out
                cache.fed[:, first:last] = x[:, first:last]
                cache.valid_all = last
            else:
                keys = [_gather(k, rows, g, cache.batch, last) for k in cache.keys]
                values = [_gather(v, rows, g, cache.batch, last) for v in cache.values]
                ce = None if cache.class_embed is None else cache.class_embed[:, rows]
                out = self._tokens(x[:, first:last], first, ce, keys, values, cache.pos_embed)
                for buf, new in zip(cache.keys + cache.values, keys + values):
                    _scatter(buf, new, rows, g, cache.batch, first, last)
                cache.outputs[:, rows, first + 1 : last + 1] = out
                cache.fed[rows, first:last] = x[:, first:last]
                self._valid(cache)[rows] = last
        elif everyone:  # tokens past `last` may have been fed another prefix
            if cache.valid_all is not None:
                cache.valid_all = min(cache.valid_all, last)
            else:
                cache.valid.clamp_(max=last)
        else:
            valid = self._valid(cache)
            valid[rows] = valid[rows].clamp(max=last)
        if everyone:
            cache.stable = max(cache.stable, min(cache.committed, last))
        outputs = cache.outputs[:, :, start:stop] if everyone else cache.outputs[:, rows, start:stop]
        return self._combine(outputs, start)


def _gather(buf: Tensor, rows: Tensor, groups: int, batch: int, length: int) -> Tensor:
    """Samples `rows` of a `(G * B, H, T, d)` buffer, first `length` tokens: `(G * b, H, length, d)`."""
    _, heads, _, dim = buf.shape
    return buf.view(groups, batch, heads, -1, dim)[:, rows, :, :length].reshape(groups * rows.numel(), heads, length, dim)


def _scatter(buf: Tensor, new: Tensor, rows: Tensor, groups: int, batch: int, first: int, last: int) -> None:
    """Write tokens `[first, last)` of `new` (`(G * b, H, >= last, d)`) back to samples `rows`."""
    _, heads, _, dim = buf.shape
    view = buf.view(groups, batch, heads, -1, dim)
    view[:, rows, :, first:last] = new.view(groups, rows.numel(), heads, -1, dim)[:, :, :, first:last]


# ----------------------------------------------------------------------------- flow steps


class _ScaleByStd:
    """Multiply patch noise by the prior's standard deviation `var.sqrt()` (`(T, D)`)."""

    __name__ = "ScaleByStd"

    def __init__(self, std: Tensor):
        self.std = std

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return x * self.std.to(x.dtype)


class _Unpatchify:
    """Patches `(B, T, D)` to images `(B, C, H, W)`."""

    __name__ = "Unpatchify"

    def __init__(self, img_size: int, patch_size: int):
        self.img_size, self.patch_size = img_size, patch_size

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return unpatchify(x, self.img_size, self.patch_size)


# ----------------------------------------------------------------------------- model


class TarFlow(nn.Module):
    r"""TarFlow (Transformer AutoRegressive Flow), state-dict compatible with the public `Model`.

    `num_blocks` [`TarFlowBlock`][arflow_solvers.adapters.tarflow.TarFlowBlock]s over patches, alternating
    identity and flipped order; a prior of variance `var` (`(T, D)`, learnt only when
    `nvp=False`). Keys: `blocks.{i}.{proj_in, pos_embed, class_embed, attn_blocks.{j}.*,
    proj_out, attn_mask}` and `var`, as in the public checkpoints.

    References:
        Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
        https://arxiv.org/abs/2412.06329;
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Arguments:
        in_channels: image channels.
        img_size: image side (square images).
        patch_size: patch side; `T = (img_size // patch_size)**2`.
        channels: transformer width.
        num_blocks: flow blocks.
        layers_per_block: transformer layers per block.
        nvp: non-volume-preserving (affine) blocks; else shift only.
        num_classes: class embeddings; 0 for unconditional.
        head_dim: channels per attention head (public default 64).
        expansion: MLP expansion (public default 4).

    Example:
        >>> model = TarFlow(1, 8, 2, channels=64, num_blocks=2, layers_per_block=1)
        >>> z, outputs, logdets = model(torch.randn(3, 1, 8, 8))
        >>> z.shape, len(outputs), logdets.shape
        (torch.Size([3, 16, 4]), 2, torch.Size([3]))
        >>> model.reverse(z).shape
        torch.Size([3, 1, 8, 8])
    """

    VAR_LR: float = 0.1
    var: Tensor

    def __init__(
        self,
        in_channels: int,
        img_size: int,
        patch_size: int,
        channels: int,
        num_blocks: int,
        layers_per_block: int,
        nvp: bool = True,
        num_classes: int = 0,
        head_dim: int = 64,
        expansion: int = 4,
    ):
        super().__init__()
        for name, value in dict(
            in_channels=in_channels, img_size=img_size, patch_size=patch_size, channels=channels,
            num_blocks=num_blocks, layers_per_block=layers_per_block, head_dim=head_dim, expansion=expansion,
        ).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0; got {num_classes!r}")
        self.in_channels = in_channels
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.num_classes = num_classes
        dim = in_channels * patch_size**2
        self.blocks = nn.ModuleList(
            TarFlowBlock(dim, channels, self.num_patches, i % 2 == 1, layers_per_block, head_dim, expansion, nvp, num_classes)
            for i in range(num_blocks)
        )
        self.register_buffer("var", torch.ones(self.num_patches, dim))

    def patchify(self, x: Tensor) -> Tensor:
        """`(B, C, H, W)` images to `(B, T, D)` patches."""
        return patchify(x, self.patch_size)

    def unpatchify(self, x: Tensor) -> Tensor:
        """`(B, T, D)` patches to `(B, C, H, W)` images."""
        return unpatchify(x, self.img_size, self.patch_size)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, list[Tensor], Tensor]:
        """Density direction: images to `(z, per-block outputs, logdets)`.

        Arguments:
            x: `(B, C, H, W)` images.
            y: `(B,)` class labels (`-1`: mean class embedding) or `None` (mean embedding).

        Returns:
            `z` `(B, T, D)`, the output of every block (list of `(B, T, D)`), and the summed
            per-sample `logdets` `(B,)` (each block's `-mean(log_sigma)`).
        """
        x = self.patchify(x)
        y = _check_labels(y, x.shape[0], self.num_classes) if self.num_classes else None
        outputs = []
        logdets = torch.zeros((), device=x.device)
        for block in self.blocks:
            x, logdet = block(x, y)
            logdets = logdets + logdet
            outputs.append(x)
        return x, outputs, logdets

    def update_prior(self, z: Tensor) -> None:
        """Move `var` towards the batch's second moment (volume-preserving mode)."""
        self.var.lerp_((z**2).mean(dim=0).detach(), weight=self.VAR_LR)

    @staticmethod
    def get_loss(z: Tensor, logdets: Tensor) -> Tensor:
        """The public training loss `0.5 mean(z^2) - mean(logdets)` (per-dimension NLL)."""
        return 0.5 * z.pow(2).mean() - logdets.mean()

    def reverse(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: float = 0,
        guide_what: str = "ab",
        attn_temp: float = 1.0,
        annealed_guidance: bool = False,
        plan: Any = None,
    ) -> Tensor:
        """Sample images from patch noise `z` (`(B, T, D)`), serially unless a `plan` is given.

        Same semantics as the public `Model.reverse` (except that a label `-1` takes the mean
        class embedding here as in `forward`; the public sampler indexes the last class).

        Arguments:
            z: `(B, T, D)` standard normal patch noise.
            y: `(B,)` class labels or `None`.
            guidance: classifier-free guidance weight (0: off).
            guide_what: `'a'` (scale), `'b'` (shift) or `'ab'`.
            attn_temp: attention temperature of the unconditional pass.
            annealed_guidance: ramp the guidance weight along each block's sequence.
            plan: a [`Plan`][arflow_solvers.Plan], solver or plan string; `None` is `Serial()`.

        Returns:
            `(B, C, H, W)` images.
        """
        flow = as_flow(self, guidance=guidance, guide_what=guide_what, attn_temp=attn_temp,
                       annealed_guidance=annealed_guidance)
        return solve_inverse(flow, z, Serial() if plan is None else plan, cond=y)


def as_flow(
    model: TarFlow,
    y: Tensor | None = None,
    guidance: float = 0.0,
    guide_what: str = "ab",
    attn_temp: float = 1.0,
    annealed_guidance: bool = False,
) -> Flow:
    """A TarFlow in sampling order, as a [`Flow`][arflow_solvers.Flow] for the solvers.

    Steps: scale by `var.sqrt()`, then per block of `reversed(model.blocks)` its
    [`TarFlowARBlock`][arflow_solvers.adapters.tarflow.TarFlowARBlock] (between two flips for flipped
    blocks), then un-patchify. Flow block 0 is `model.blocks[-1]`. The flow maps `(B, T, D)`
    patch noise to `(B, C, H, W)` images; `cond` given to the solve (class labels) overrides
    `y`.

    Arguments:
        model: the TarFlow.
        y: default class labels `(B,)` when the solve gets `cond=None`.
        guidance: classifier-free guidance weight (0: off), as in `TarFlow.reverse`.
        guide_what: `'a'` (scale), `'b'` (shift) or `'ab'`, as in `TarFlow.reverse`.
        attn_temp: attention temperature of the unconditional pass.
        annealed_guidance: ramp the guidance weight along each block's sequence.

    Example:
        >>> model = TarFlow(1, 8, 2, channels=64, num_blocks=2, layers_per_block=1)
        >>> as_flow(model).num_blocks
        2
    """
    if not isinstance(model, TarFlow):
        raise TypeError(f"model must be a TarFlow; got {type(model).__name__}")
    settings = Guidance(float(guidance), guide_what, float(attn_temp), bool(annealed_guidance))
    flip = Permute(list(range(model.num_patches))[::-1])
    steps: list[Any] = [_ScaleByStd(model.var.sqrt())]
    for block in reversed(model.blocks):
        ar = TarFlowARBlock(block, settings, y)
        steps += [flip, ar, flip] if block.flip else [ar]
    steps.append(_Unpatchify(model.img_size, model.patch_size))
    return Flow(steps)


def load_for_planning(path: str, batch: int, seed: int, device: str) -> tuple[Flow, Tensor, Any]:
    """Load a checkpoint for `arflow-solvers plan CKPT --model tarflow`.

    Reads the format `examples/train_tarflow.py` saves (a dict with `config`, the `TarFlow`
    keyword arguments, and `state_dict`; `weights_only=True`). Returns the flow of
    [`as_flow`][arflow_solvers.adapters.tarflow.as_flow] (no guidance), standard normal patch noise
    `(batch, T, D)` drawn from a generator seeded with `seed`, and the conditioning: random
    labels in `[0, num_classes)` from the same generator for a class-conditional model,
    else `None`.

    Arguments:
        path: checkpoint file.
        batch: calibration batch size (>= 1).
        seed: seed of the noise and labels.
        device: where the model and tensors go (`'cpu'`, `'cuda'`, ...).
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not a checkpoint of examples/train_tarflow.py (a dict with 'config' and "
            f"'state_dict'); got {type(ckpt).__name__} with keys {sorted(ckpt)[:8] if isinstance(ckpt, dict) else '-'}"
        )
    model = TarFlow(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    dim = model.blocks[0].in_channels
    z = torch.randn(batch, model.num_patches, dim, generator=generator).to(device)
    cond = None
    if model.num_classes:
        cond = torch.randint(0, model.num_classes, (batch,), generator=generator).to(device)
    return as_flow(model), z, cond


def denoise(model: TarFlow, x: Tensor, y: Tensor | None = None, noise_std: float = 0.05) -> Tensor:
    r"""One score step $x + \sigma^2 \nabla_x \log p(x)$ removing the training noise.

    TarFlow is trained on images plus Gaussian noise of std $\sigma$; by Tweedie's formula
    this step estimates the clean image (the public sampling notebook's denoising step).

    Arguments:
        model: the TarFlow.
        x: `(B, C, H, W)` samples.
        y: class labels used for sampling, or `None`.
        noise_std: $\sigma$, the std of the training noise augmentation.

    Returns:
        `(B, C, H, W)` denoised images.
    """
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std}")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        z, _, logdets = model(x, y)
        per_sample = z[0].numel()
        log_p = -0.5 * z.pow(2).flatten(1).sum(1) + per_sample * logdets
        (grad,) = torch.autograd.grad(log_p.sum(), [x])
    return (x + noise_std**2 * grad).detach()


def sample(
    model: TarFlow,
    z: Tensor,
    plan: Any = None,
    y: Tensor | None = None,
    guidance: float = 0.0,
    attn_temp: float = 1.0,
    denoise: bool = True,
    noise_std: float = 0.05,
    guide_what: str = "ab",
    annealed_guidance: bool = False,
) -> Tensor:
    """Sample images with a plan, then (by default) take the denoising score step.

    Arguments:
        model: the TarFlow.
        z: `(B, T, D)` standard normal patch noise.
        plan: a [`Plan`][arflow_solvers.Plan], a solver or a plan string; `None`: `Serial()`.
        y: `(B,)` class labels or `None`.
        guidance: classifier-free guidance weight (0: off), as in `TarFlow.reverse`.
        attn_temp: attention temperature of the unconditional pass.
        denoise: apply [`denoise`][arflow_solvers.adapters.tarflow.denoise] to the result.
        noise_std: the training noise std used by the denoising step.
        guide_what: `'a'` (scale), `'b'` (shift) or `'ab'`, as in `TarFlow.reverse`.
        annealed_guidance: ramp the guidance weight along each block's sequence.

    Returns:
        `(B, C, H, W)` images.
    """
    flow = as_flow(model, guidance=guidance, guide_what=guide_what, attn_temp=attn_temp,
                   annealed_guidance=annealed_guidance)
    x = solve_inverse(flow, z, Serial() if plan is None else plan, cond=y)
    return _denoise(model, x, y, noise_std) if denoise else x


_denoise = denoise
