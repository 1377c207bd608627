"""One STARFlow flow block (the public `MetaBlock`): a causal transformer over latent tokens after a text prefix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tarflow.layers import KV
from .layers import AttentionBlock, Context, RMSNorm

__all__ = ["StarFlowBlock", "IdentityBlock", "Positions"]

INV_SOFTPLUS_1 = 0.541324854612918
"""`log(e - 1)`: `softplus(INV_SOFTPLUS_1) = 1`, so a zero output means unit scale."""


@dataclass(frozen=True)
class Positions:
    """Where a block's image tokens sit in its sequence, for one text length.

    Attributes:
        text: text prefix length `L` (0 for a block without text).
        prefix: sequence position of image token 0: `L + 1` with a start-of-sequence token,
            else `L`; token `t` sits at `prefix + t`.
        rope: `(cos, sin)` of every sequence position `(L + T, head_dim)`, or `None`.
        table: learnt position embeddings `(T, C)` in the block's order, or `None` (rope).
    """

    text: int
    prefix: int
    rope: tuple[Tensor, Tensor] | None
    table: Tensor | None


class StarFlowBlock(nn.Module):
    r"""One STARFlow flow block: an affine autoregressive transform over `T` latent tokens.

    In its own order (tokens flipped when `flip`), with an optional text prefix $y$,

    $$z_t = (x_t - \mu_t) / \sigma_t,\qquad (a_t, \mu_t) = \mathrm{proj\_out}(h_t),\qquad
      \sigma_t = \mathrm{softplus}(a_t + \log(e - 1))\ \text{or}\ e^{a_t},$$

    where $h_t$ is the transformer output at the token that precedes $x_t$: the learnt
    start-of-sequence token for $t = 0$ (`use_sos`), else $x_{t-1}$ (and then row 0 is the
    identity). The transformer reads the projected text first, causally.
    [`StarFlowARBlock`][arflow_solvers.adapters.starflow.StarFlowARBlock] wraps it for the solvers.

    Parameter names follow the public `MetaBlock`: `proj_in`, `proj_out`, `sos_embed`,
    `pos_embed` (without rope), `proj_txt` (with text), `attn_blocks`, `final_norm`, and the
    unused `attn_mask` buffer.

    References:
        STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
        (Gu et al., 2025), https://arxiv.org/abs/2506.06276

    Arguments:
        in_channels: channels per token `D`.
        channels: transformer width `C`.
        img_size: side of the token grid (`T = img_size**2`).
        flip: reverse the token order; else identity.
        pt_seq_len: grid side of the `attn_mask` buffer (default `img_size`).
        num_layers: transformer layers.
        head_dim: channels per head.
        num_heads: query heads (default `C // head_dim`).
        num_kv_heads: key and value heads (grouped-query attention).
        txt_size: the model's text length (sizes the `attn_mask` buffer).
        txt_dim: text embedding width; 0 for a block without text.
        expansion: MLP width as a multiple of `C`.
        use_rope: rotary position embedding (else a learnt `pos_embed`).
        use_sos: a learnt start-of-sequence token predicts row 0.
        use_softplus: `softplus` scale (else `exp`).
        use_swiglu: gated MLP (see [`AttentionBlock`][arflow_solvers.adapters.starflow.AttentionBlock]).
        use_qk_norm: RMS-normalise queries and keys per head.
        use_post_norm: RMS-normalise the attention and MLP outputs.
        use_bias: biases on the layers' linear maps.
        hf_style_rope: Hugging Face rotary channel layout.
        norm_type: `'layer_norm'`, `'rms_norm'` or `'none'` (the layers' pre-norms).
        use_final_norm: an RMS norm after the last layer.
        soft_clip: if > 0, `proj_out` outputs pass through `soft_clip * tanh(. / soft_clip)`.
    """

    attn_mask: Tensor

    def __init__(self, in_channels: int, channels: int, img_size: int, flip: bool = False,
                 pt_seq_len: int | None = None, num_layers: int = 1, head_dim: int = 64, num_heads: int | None = None,
                 num_kv_heads: int | None = None, txt_size: int = 0, txt_dim: int = 0, expansion: float = 4,
                 use_rope: bool = False, use_sos: bool = False, use_softplus: bool = False, use_swiglu: bool = False,
                 use_qk_norm: bool = False, use_post_norm: bool = False, use_final_norm: bool = False,
                 use_bias: bool = True, hf_style_rope: bool = False, norm_type: str = "layer_norm",
                 soft_clip: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(in_channels, channels)
        self.proj_out = nn.Linear(channels, 2 * in_channels)
        self.proj_out.weight.data.zero_()
        self.sos_embed = nn.Parameter(torch.randn(1, 1, in_channels)) if use_sos else None
        self.pos_embed = None if use_rope else nn.Parameter(torch.randn(img_size**2, channels) * 1e-2)
        self.proj_txt = nn.Linear(txt_dim, channels) if txt_dim > 0 else None
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(channels, head_dim, expansion, use_swiglu, norm_type, num_heads, num_kv_heads, use_qk_norm,
                           use_post_norm, use_bias, hf_style_rope)
            for _ in range(num_layers))
        self.final_norm = RMSNorm(channels) if use_final_norm else None
        side = (pt_seq_len or img_size) ** 2 + txt_size
        self.register_buffer("attn_mask", torch.tril(torch.ones(side, side)))
        self.flip, self.use_softplus, self.soft_clip = flip, use_softplus, soft_clip
        self.in_channels, self.grid, self.num_patches, self.txt_dim = in_channels, img_size, img_size**2, txt_dim

    def extra_repr(self) -> str:
        order = "flip" if self.flip else "identity"
        return (f"T={self.num_patches}, D={self.in_channels}, order={order}, sos={self.sos_embed is not None}, "
                f"txt_dim={self.txt_dim}, softplus={self.use_softplus}, soft_clip={self.soft_clip}")

    @property
    def use_sos(self) -> bool:
        """Whether a start-of-sequence token predicts row 0."""
        return self.sos_embed is not None

    def permute(self, x: Tensor, dim: int = 1) -> Tensor:
        """The block's order (its own inverse): flipped along `dim` when `flip`."""
        return x.flip(dims=[dim]) if self.flip else x

    def positions(self, text: int, rope: tuple[Tensor, Tensor] | None) -> Positions:
        """The [`Positions`][arflow_solvers.adapters.starflow.network.Positions] of a text length and rope tables."""
        table = None if self.pos_embed is None else self.permute(self.pos_embed, dim=0)
        return Positions(text, text + int(self.use_sos), rope, table)

    # -- the network

    def embed(self, x_perm: Tensor, start: int, pos: Positions) -> Tensor:
        """Embeddings `(B, n, C)` of image tokens `[start, start + n)` (own order)."""
        h = self.proj_in(x_perm)
        if pos.table is None:
            return h
        at = start + int(self.use_sos)
        return h + pos.table[at : at + x_perm.shape[1]]

    def prefix(self, text: Tensor | None, batch: int, pos: Positions) -> Tensor | None:
        """`(batch, prefix, C)` embeddings of the projected text and the start-of-sequence token, or `None`."""
        parts = [] if self.proj_txt is None or text is None else [self.proj_txt(text)]
        if self.sos_embed is not None:
            sos = self.proj_in(self.sos_embed.expand(batch, 1, -1))
            parts.append(sos if pos.table is None else sos + pos.table[:1])
        return torch.cat(parts, dim=1) if parts else None

    def transformer(self, h: Tensor, ctx: Context, kv: list[KV] | None = None) -> Tensor:
        """The causal layers and the final norm on positions `[ctx.start, ctx.start + n)`.

        The only transformer pass: the full pass (`ctx.start = 0`, no `kv`) and the cached
        range (`kv` holds each layer's preallocated `(keys, values)`, positions `< ctx.start`
        filled; the new ones are written in place) both run it.
        """
        if kv is None and ctx.start:
            raise ValueError(f"an uncached pass starts at position 0; got start={ctx.start}")
        for i, layer in enumerate(self.attn_blocks):
            h = layer(h, ctx, None if kv is None else kv[i])
        return h if self.final_norm is None else self.final_norm(h)

    def head(self, h: Tensor) -> Tensor:
        """`proj_out`, soft-clipped: `(..., 2D)` holding the scale logits `a`, then `mu`."""
        out = self.proj_out(h)
        return self.soft_clip * torch.tanh(out / self.soft_clip) if self.soft_clip > 0 else out

    def scale(self, a: Tensor) -> Tensor:
        """`sigma` from the scale logits `a`: `softplus(a + log(e - 1))` or `exp(a)`."""
        return F.softplus(a + INV_SOFTPLUS_1) if self.use_softplus else a.exp()

    def rows(self, x_perm: Tensor, text: Tensor | None, pos: Positions, temp: float = 1.0) -> tuple[Tensor, Tensor]:
        """Full causal pass: `(B, T, D)` own-order tokens to `(out, text_hidden)`.

        `out` `(B, T, 2D)` holds the `head` output of each row (row 0 zero without a
        start-of-sequence token); `text_hidden` `(B, L, C)` the text's final hidden states.
        """
        batch, seq_len = x_perm.shape[:2]
        h = self.embed(x_perm[:, : seq_len - 1], 0, pos)
        prefix = self.prefix(text, batch, pos)
        h = h if prefix is None else torch.cat([prefix, h], dim=1)
        h = self.transformer(h, Context(0, pos.rope, temp))
        out = self.head(h[:, pos.text :])
        if not self.use_sos:
            out = torch.cat([torch.zeros_like(out[:, :1]), out], dim=1)
        return out, h[:, : pos.text]

    def forward(self, x: Tensor, text: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """Density direction: `(B, T, D)` data-order tokens to `(z, text_hidden, logdet)`.

        `logdet` is `-log(sigma)` of every row and channel, `(B, T, D)` in the block's order
        (as the public code returns it); `text_hidden` is `None` for a block without text.
        """
        if self.proj_txt is not None and text is None:
            raise ValueError("this block is text-conditioned: pass the text embeddings y")
        text = text if self.proj_txt is not None else None
        x_perm = self.permute(x)
        pos = self.positions(0 if text is None else text.shape[1], rope)
        out, hidden = self.rows(x_perm, text, pos)
        a, mu = out.chunk(2, dim=-1)
        sigma = self.scale(a)
        return self.permute((x_perm - mu) / sigma), (hidden if text is not None else None), -sigma.log()

    def output_projection(self) -> tuple[Tensor, Tensor]:
        """`(W_mu, W_a)`, each `(D, C)`: the rows of `proj_out` giving `mu` and the scale logits."""
        w_a, w_mu = self.proj_out.weight.chunk(2, dim=0)
        return w_mu, w_a


class IdentityBlock(nn.Module):
    """A block with no layers (`layers_per_block` entry 0): the identity, with no parameters.

    Examples:
        >>> x = torch.randn(2, 4, 3)
        >>> z, _, logdet = IdentityBlock()(x)
        >>> bool(torch.equal(z, x)), logdet.shape
        (True, torch.Size([2]))
    """

    def forward(self, x: Tensor, text: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, None, Tensor]:
        """`(x, None, zeros(B))`: the public `IdentityBlock` returns a per-sample zero log-determinant."""
        return x, None, x.new_zeros(x.shape[0])
