"""The STARFlow model: latent patches, a deep text-conditioned block and shallow blocks, state-dict compatible."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .network import IdentityBlock, StarFlowBlock
from .rope import VisionRope

__all__ = ["StarFlow", "patchify", "unpatchify"]

_VIDEO_OPTIONS = ("temporal_causal", "shallow_block_local", "local_attn_window", "denoiser_window")


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut `(B, C, H, W)` latents into a `(B, H/p, W/p, p*p*C)` grid of patches (the public layout).

    Within a patch the channels vary fastest, then the column, then the row (`(p1 p2 c)`).

    Examples:
        >>> patchify(torch.zeros(2, 4, 8, 8), 2).shape
        torch.Size([2, 4, 4, 16])
    """
    if x.dim() == 5:
        raise ValueError("video (5-D) inputs are not supported by this STARFlow adapter; pass (B, C, H, W)")
    if x.dim() != 4 or x.shape[2] % patch_size or x.shape[3] % patch_size:
        raise ValueError(f"x must be (B, C, H, W) with H, W multiples of patch_size={patch_size}; "
                         f"got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    grid = x.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(b, h // patch_size, w // patch_size, -1)


def unpatchify(x: Tensor, patch_size: int) -> Tensor:
    """Inverse of [`patchify`][arflow_solvers.adapters.starflow.patchify]: `(B, h, w, p*p*C)` to `(B, C, h*p, w*p)`.

    Examples:
        >>> x = torch.randn(2, 4, 8, 8)
        >>> bool(torch.equal(unpatchify(patchify(x, 2), 2), x))
        True
    """
    if x.dim() != 4 or x.shape[3] % patch_size**2:
        raise ValueError(f"x must be (B, h, w, p*p*C) with p={patch_size}; got shape {tuple(x.shape)}")
    b, h, w, d = x.shape
    c = d // patch_size**2
    grid = x.reshape(b, h, w, patch_size, patch_size, c)
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * patch_size, w * patch_size)


def _refuse(video: dict[str, Any], learnable_self_denoiser: bool, conditional_denoiser: bool,
            use_pretrained_lm: str | None, use_mm_attn: bool) -> None:
    """Raise naming the first public option this adapter does not implement."""
    for name, value in video.items():
        if value:
            raise NotImplementedError(f"{name}={value!r} is a video option (STARFlow-V); this adapter samples "
                                      "images only: leave it at its default")
    if learnable_self_denoiser or conditional_denoiser:
        raise NotImplementedError("learnable_self_denoiser (and conditional_denoiser) are not supported yet: "
                                  "load the flow without the denoiser")
    if use_pretrained_lm is not None or use_mm_attn:
        raise NotImplementedError("use_pretrained_lm / use_mm_attn (a pretrained language model as the deep "
                                  "block) are not supported")


def _check_config(layers: list[int], num_blocks: int, seq_order: str, txt_size: int, txt_dim: int,
                  cond_top_only: bool) -> None:
    if seq_order not in ("R2L", "L2R"):
        raise ValueError(f"seq_order must be 'R2L' or 'L2R'; got {seq_order!r}")
    if not isinstance(num_blocks, int) or num_blocks < 1 or len(layers) != num_blocks:
        raise ValueError(f"layers_per_block must have one entry or num_blocks={num_blocks}; got {layers}")
    if any(not isinstance(n, int) or n < 0 for n in layers) or layers[-1] < 1:
        raise ValueError(f"layers_per_block entries must be ints >= 0, the last (deep block) >= 1; got {layers}")
    if cond_top_only and txt_size <= 0:
        raise ValueError("cond_top_only requires txt_size > 0")
    if (txt_dim > 0) != (txt_size > 0):
        raise ValueError(f"txt_size and txt_dim must both be > 0 (text-conditioned) or both 0; "
                         f"got txt_size={txt_size}, txt_dim={txt_dim}")


def _flipped(index: int, seq_order: str) -> bool:
    """Whether block `index` reverses the token order: odd blocks for `'R2L'`, even ones for `'L2R'`."""
    return index % 2 == (1 if seq_order == "R2L" else 0)


class StarFlow(nn.Module):
    r"""STARFlow (Scalable Transformer AutoRegressive Flow), state-dict compatible with the public `Model`.

    `num_blocks` flow blocks over the latent patches, alternating token order; the last
    block (the first to sample) is the deep one: `layers_per_block[-1]` layers, width
    `top_block_channels`, reading the text prefix. With `cond_top_only` only it reads the
    text; a `layers_per_block` entry 0 makes an identity block. Keys: `var`,
    `blocks.{i}.{sos_embed, pos_embed, attn_mask, proj_in, proj_out, proj_txt, attn_blocks.{j}.*,
    final_norm}` and, with rope, `feat_rope.{freqs_cos, freqs_sin}` (unused placeholders), as in
    the public checkpoints (commit e565a46). Video (STARFlow-V) options, the learnable
    self-denoiser and pretrained language-model blocks are refused by name.

    References:
        STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
        (Gu et al., 2025), https://arxiv.org/abs/2506.06276

    Arguments:
        in_channels: latent channels.
        img_size: latent side (square latents).
        patch_size: patch side; `T = (img_size // patch_size)**2` tokens of `in_channels * patch_size**2`.
        channels: transformer width of the shallow blocks.
        num_blocks: flow blocks.
        layers_per_block: layers per block (one entry: every block); the last is the deep block.
        head_dim: channels per attention head.
        num_heads: query heads (default `channels // head_dim`).
        num_kv_heads: key and value heads (grouped-query attention when fewer).
        rope: 2-D rotary embedding (with a text axis when `txt_size > 0`), else learnt positions.
        pt_seq_len: grid side the rotary positions are scaled to (default `img_size // patch_size`).
        sos: a learnt start-of-sequence token predicts the first token.
        txt_size: text prefix length (0: unconditional).
        txt_dim: text embedding width (0: unconditional).
        cond_top_only: only the deep block reads the text (and is guided).
        use_softplus: `softplus` scales (else `exp`).
        use_swiglu: gated MLPs.
        use_bias: biases on the layers' linear maps.
        use_qk_norm: RMS-normalise queries and keys.
        use_post_norm: RMS-normalise attention and MLP outputs.
        use_final_norm: an RMS norm after each block's last layer.
        hf_style_rope: Hugging Face rotary channel layout.
        norm_type: `'layer_norm'`, `'rms_norm'` or `'none'`.
        use_checkpoint: training-time activation checkpointing; ignored here.
        use_checkpoint_mlp: idem.
        use_pretrained_lm: must be `None` (refused otherwise).
        use_mm_attn: must be `False`.
        soft_clip: if > 0, `proj_out` outputs pass through `soft_clip * tanh(. / soft_clip)`.
        seq_order: `'R2L'` (block 0 in identity order) or `'L2R'` (block 0 flipped).
        learnable_self_denoiser: must be `False`.
        conditional_denoiser: must be `False`.
        temporal_causal: must be 0 (video).
        top_block_channels: width of the deep block (default `channels`).
        shallow_block_local: must be `False` (video).
        denoiser_window: must be `None` (video).
        local_attn_window: must be `None` (video).

    Examples:
        >>> model = StarFlow(4, 8, 1, channels=32, num_blocks=2, layers_per_block=[1, 1], head_dim=16,
        ...                  rope=True, sos=True, txt_size=3, txt_dim=8, cond_top_only=True)
        >>> z, _, outputs, logdets = model(torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8))
        >>> z.shape, len(outputs), logdets[0].shape
        (torch.Size([2, 4, 8, 8]), 3, torch.Size([2, 64, 4]))
    """

    var: Tensor

    def __init__(self, in_channels: int, img_size: int, patch_size: int, channels: int, num_blocks: int,
                 layers_per_block: list[int] | int, head_dim: int = 64, num_heads: int | None = None,
                 num_kv_heads: int | None = None, rope: bool = False, pt_seq_len: int | None = None,
                 sos: bool = False, txt_size: int = 0, txt_dim: int = 0, cond_top_only: bool = False,
                 use_softplus: bool = False, use_swiglu: bool = False, use_bias: bool = True,
                 use_qk_norm: bool = False, use_post_norm: bool = False, use_final_norm: bool = False,
                 hf_style_rope: bool = False, norm_type: str = "layer_norm", use_checkpoint: int = 0,
                 use_checkpoint_mlp: int | None = None, use_pretrained_lm: str | None = None,
                 use_mm_attn: bool = False, soft_clip: float = 0, seq_order: str = "R2L",
                 learnable_self_denoiser: bool = False, conditional_denoiser: bool = False,
                 temporal_causal: int = 0, top_block_channels: int | None = None, shallow_block_local: bool = False,
                 denoiser_window: int | None = None, local_attn_window: int | None = None):
        super().__init__()
        video = dict(temporal_causal=temporal_causal, shallow_block_local=shallow_block_local,
                     local_attn_window=local_attn_window, denoiser_window=denoiser_window)
        _refuse(video, learnable_self_denoiser, conditional_denoiser, use_pretrained_lm, use_mm_attn)
        layers = [layers_per_block] * num_blocks if isinstance(layers_per_block, int) else list(layers_per_block)
        layers = layers * num_blocks if len(layers) == 1 else layers
        _check_config(layers, num_blocks, seq_order, txt_size, txt_dim, cond_top_only)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        self.in_channels, self.img_size, self.patch_size = in_channels, img_size, patch_size
        self.grid = img_size // patch_size
        self.pt_seq_len = pt_seq_len or self.grid
        self.num_patches = self.grid**2
        self.cond_top_only, self.txt_size, self.txt_dim, self.seq_order = cond_top_only, txt_size, txt_dim, seq_order
        dim = in_channels * patch_size**2
        self.register_buffer("var", torch.ones(self.pt_seq_len**2, dim))
        shared = dict(in_channels=dim, img_size=self.grid, pt_seq_len=self.pt_seq_len, txt_size=txt_size,
                      head_dim=head_dim, num_kv_heads=num_kv_heads, use_rope=rope, use_sos=sos,
                      use_softplus=use_softplus, use_swiglu=use_swiglu, use_qk_norm=use_qk_norm,
                      use_post_norm=use_post_norm, use_final_norm=use_final_norm, use_bias=use_bias,
                      hf_style_rope=hf_style_rope, norm_type=norm_type, soft_clip=soft_clip)
        blocks: list[nn.Module] = []
        for i, n in enumerate(layers[:-1]):
            blocks.append(IdentityBlock() if n == 0 else StarFlowBlock(
                channels=channels, flip=_flipped(i, seq_order), num_layers=n, num_heads=num_heads,
                txt_dim=0 if cond_top_only else txt_dim, **shared))
        top = top_block_channels or channels
        top_heads = num_heads if num_heads is not None or top == channels else top // head_dim
        blocks.append(StarFlowBlock(channels=top, flip=_flipped(num_blocks - 1, seq_order),
                                    num_layers=layers[-1], num_heads=top_heads, txt_dim=txt_dim, **shared))
        self.blocks = nn.ModuleList(blocks)
        self.feat_rope = VisionRope(head_dim, self.pt_seq_len, txt_size) if rope else None
        self.feat_rope_gen = VisionRope(head_dim, self.pt_seq_len, txt_size, placeholders=False) if rope else None

    def rope_tables(self, index: int, text: int, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """`(cos, sin)` of block `index` for a text prefix of `text` tokens (dtype and device of `like`)."""
        rope = self.feat_rope_gen if index == len(self.blocks) - 1 else self.feat_rope
        if rope is None:
            return None
        return rope.tables(self.grid, self.grid, text, like.dtype, like.device)

    def patchify(self, x: Tensor) -> Tensor:
        """`(B, C, H, W)` latents to `(B, h, w, D)` patches."""
        return patchify(x, self.patch_size)

    def unpatchify(self, x: Tensor) -> Tensor:
        """`(B, h, w, D)` patches to `(B, C, H, W)` latents."""
        return unpatchify(x, self.patch_size)

    def check_text(self, y: Tensor | None, batch: int, name: str = "y") -> Tensor | None:
        """Validate text embeddings: `(batch, L, txt_dim)` for a text-conditioned model, else `None`."""
        if self.txt_dim == 0:
            if y is not None:
                raise ValueError(f"{name} given, but this STARFlow is unconditional (txt_dim=0)")
            return None
        if not isinstance(y, Tensor) or y.dim() != 3 or y.shape[0] != batch or y.shape[2] != self.txt_dim:
            raise ValueError(f"{name} must be text embeddings (B={batch}, L, txt_dim={self.txt_dim}); "
                             f"got {tuple(getattr(y, 'shape', ())) if y is not None else None}")
        if y.shape[1] < 1:
            raise ValueError(f"{name} must hold at least one text token; got shape {tuple(y.shape)}")
        return y

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None, list[Tensor], list[Tensor]]:
        """Density direction, as the public `model(x, y)`: latents to `(z, y, outputs, logdets)`.

        Arguments:
            x: `(B, C, H, W)` latents.
            y: `(B, L, txt_dim)` text embeddings (text-conditioned models), else `None`.

        Returns:
            `z` `(B, C, H, W)`; the deep block's final text hidden states (or `None`);
            `outputs`, the patch grid `(B, h, w, D)` before the first block and after each;
            `logdets`, one per block: `-log(sigma)` `(B, T, D)` in the block's order (an
            identity block gives zeros `(B,)`).
        """
        grid = self.patchify(x)
        y = self.check_text(y, x.shape[0])
        shape = grid.shape
        h = grid.flatten(1, 2)
        outputs, logdets, text = [grid], [], None
        for i, block in enumerate(self.blocks):
            block_text = y if getattr(block, "txt_dim", 0) else None
            rope = self.rope_tables(i, 0 if block_text is None else block_text.shape[1], h)
            h, hidden, logdet = block(h, block_text, rope)
            text = hidden if i == len(self.blocks) - 1 else text
            outputs.append(h.reshape(shape))
            logdets.append(logdet)
        return self.unpatchify(h.reshape(shape)), text, outputs, logdets

    @staticmethod
    def get_loss(z: Tensor, logdets: list[Tensor]) -> Tensor:
        """The public training loss: `0.5 mean(z^2) - sum of mean(logdet)` per sample, averaged."""
        loss_z = 0.5 * z.pow(2).flatten(1).mean(1)
        return (loss_z - sum(ld.reshape(ld.shape[0], -1).mean(1) for ld in logdets)).mean()

    def reverse(self, z: Tensor, y: Tensor | None = None, guidance: float = 0, attn_temp: float = 1.0,
                annealed_guidance: bool = False, plan: Any = None, return_sequence: bool = False, *,
                throw: bool = True, autocast: torch.dtype | None = None) -> Tensor | list[Tensor]:
        """Sample latents from noise `z` with the public semantics, serially unless a `plan` is given.

        The deep block first (guided when `guidance > 0`), then the shallow blocks (guided too
        unless `cond_top_only`).

        Arguments:
            z: `(B, C, H, W)` standard normal noise.
            y: `(B, L, txt_dim)` text embeddings; with guidance `(2B, L, txt_dim)`: the
                captions, then the null captions (as the public code).
            guidance: guidance weight (0: off), the public `logits_guided` rule.
            attn_temp: attention temperature of every pass.
            annealed_guidance: accepted for the public signature; no effect (see
                [`LogitsGuidance`][arflow_solvers.adapters.starflow.LogitsGuidance]).
            plan: a [`Plan`][arflow_solvers.Plan], solver or plan string; `None` is `Serial()`.
            return_sequence: return `[z, after the deep block, after each shallow block]`.
            throw: raise [`SolveError`][arflow_solvers.SolveError] if some samples are not finite.
            autocast: `torch.bfloat16` (or `torch.float16`) to sample a float32 model under
                mixed precision (see [`as_flow`][arflow_solvers.adapters.starflow.as_flow]).

        Returns:
            `(B, C, H, W)` latents, or the list of `return_sequence`.
        """
        from .sampling import sample  # the sampling view is built on this module

        y_null = None
        if guidance > 0 and isinstance(y, Tensor) and y.shape[0] == 2 * z.shape[0]:
            y, y_null = y.chunk(2, dim=0)
        return sample(self, z, plan, y, y_null, guidance=guidance, attn_temp=attn_temp,
                      annealed_guidance=annealed_guidance, return_sequence=return_sequence, throw=throw,
                      autocast=autocast)
