"""The TarFlow network: patches, flow blocks and the model, state-dict compatible with the public checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import KV, AttentionBlock

__all__ = ["TarFlow", "TarFlowBlock", "patchify", "unpatchify"]


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut images into a sequence of flattened patches, in raster order.

    Arguments:
        x: `(B, C, H, W)` images, `H` and `W` multiples of `patch_size`.
        patch_size: side of a square patch.

    Returns:
        `(B, T, C * patch_size**2)` with `T = (H // p) * (W // p)`; channel-major within a
        patch (the layout of `torch.nn.functional.unfold`).

    Examples:
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

    Examples:
        >>> x = torch.randn(2, 1, 8, 8)
        >>> bool(torch.equal(unpatchify(patchify(x, 2), 8, 2), x))
        True
    """
    if x.dim() != 3 or x.shape[1] != (img_size // patch_size) ** 2:
        raise ValueError(
            f"x must be (B, {(img_size // patch_size) ** 2}, C * {patch_size}**2); got shape {tuple(x.shape)}"
        )
    return F.fold(x.transpose(1, 2), (img_size, img_size), patch_size, stride=patch_size)


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


class TarFlowBlock(nn.Module):
    r"""One TarFlow flow block (the public `MetaBlock`): a causal transformer over patches.

    In its own order (the patches flipped when `flip`), with $x_{-1}$ read as nothing,

    $$z_t = (x_t - \mu_t(x_{<t}))\, e^{-\log\sigma_t(x_{<t})},\qquad
      (\log\sigma_t, \mu_t) = \mathrm{proj\_out}(h_{t-1}),$$

    where $h$ is the transformer output; row 0 has $\mu_0 = \log\sigma_0 = 0$. For sampling,
    [`TarFlowARBlock`][arflow_solvers.adapters.tarflow.TarFlowARBlock] wraps it as a
    [`CachedARBlock`][arflow_solvers.CachedARBlock] working in the block's own order
    ([`as_flow`][arflow_solvers.adapters.tarflow.as_flow] puts the flips around it).

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

    def permute(self, x: Tensor, dim: int = 1) -> Tensor:
        """The block's order (its own inverse): flipped along `dim` when `flip`."""
        return x.flip(dims=[dim]) if self.flip else x

    def class_embedding(self, y: Tensor | None) -> Tensor | None:
        """`(B or 1, 1, C)` class embeddings of labels `y`; `None` or a label `-1` gives the mean."""
        if self.class_embed is None:
            return None
        mean = self.class_embed.mean(dim=0, keepdim=True)
        if y is None:
            return mean
        return torch.where((y < 0).view(-1, 1, 1), mean, self.class_embed[y.clamp(min=0)])

    def embed(self, x_perm: Tensor, start: int = 0, class_embed: Tensor | None = None,
              pos_embed: Tensor | None = None) -> Tensor:
        """Token embeddings `(B, n, C)` of patches at positions `[start, start + n)` (own order).

        `pos_embed` is the position table already in the block's order, if precomputed.
        """
        pos = self.permute(self.pos_embed, dim=0) if pos_embed is None else pos_embed
        h = self.proj_in(x_perm) + pos[start : start + x_perm.shape[1]]
        return h if class_embed is None else h + class_embed

    def transformer(self, h: Tensor, start: int = 0, kv: Sequence[KV] | None = None, temp: float = 1.0,
                    temp_from: int = 0) -> Tensor:
        """The causal transformer and `proj_out` on tokens `[start, start + n)`: `(B, n, out)`.

        This is the only transformer pass: the full pass (`start = 0`, no `kv`) and the cached
        range (`kv` holds each layer's preallocated `(keys, values)` buffers, tokens `< start`
        filled; the new ones are written in place) both run it. Row
        `i` of the output belongs to token `start + i` (not yet shifted to the next row).
        `temp` and `temp_from` temper the attention of samples `temp_from:`.
        """
        n = h.shape[1]
        if kv is None and start:
            raise ValueError(f"an uncached pass starts at token 0; got start={start}")
        stop = start + n
        mask = None if n == 1 else self.attn_mask[start:stop, :stop].bool()
        for i, layer in enumerate(self.attn_blocks):
            h = layer(h, mask, None if kv is None else kv[i], start, temp, temp_from)
        return self.proj_out(h)

    def split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """`proj_out` output to `(mu, log_sigma)` (`xb`, `xa` in the public code)."""
        if self.nvp:
            log_sigma, mu = out.chunk(2, dim=-1)
            return mu, log_sigma
        return out, torch.zeros_like(out)

    def network(self, x_perm: Tensor, class_embed: Tensor | None) -> Tensor:
        """Full causal pass: `(B, T, D)` in own order to shifted `proj_out` rows `(B, T, out)`."""
        out = self.transformer(self.embed(x_perm, 0, class_embed))
        return torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Density direction: `(B, T, D)` data-order patches to `(z, logdet)`.

        `logdet` is per sample, `-mean(log_sigma)` over positions and channels (as public).
        """
        x_perm = self.permute(x)
        mu, log_sigma = self.split(self.network(x_perm, self.class_embedding(y)))
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

    Examples:
        >>> model = TarFlow(1, 8, 2, channels=64, num_blocks=2, layers_per_block=1)
        >>> z, outputs, logdets = model(torch.randn(3, 1, 8, 8))
        >>> z.shape, len(outputs), logdets.shape
        (torch.Size([3, 16, 4]), 2, torch.Size([3]))
        >>> model.reverse(z).shape
        torch.Size([3, 1, 8, 8])
    """

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
            TarFlowBlock(dim, channels, self.num_patches, i % 2 == 1, layers_per_block, head_dim, expansion, nvp,
                         num_classes)
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
        *,
        throw: bool = True,
        autocast: torch.dtype | None = None,
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
            throw: raise [`SolveError`][arflow_solvers.SolveError] if some samples are not
                finite (it carries the Solution); `False` returns them as NaN.
            autocast: `torch.bfloat16` to sample under mixed precision as the public sampler
                does under `torch.autocast("cuda", torch.bfloat16)` (see
                [`as_flow`][arflow_solvers.adapters.tarflow.as_flow]); `None`: the model's dtype.

        Returns:
            `(B, C, H, W)` images.
        """
        from .sampling import sample  # the sampling view is built on this module

        return sample(self, z, plan, y, guidance, attn_temp, denoise=False, guide_what=guide_what,
                      annealed_guidance=annealed_guidance, throw=throw, autocast=autocast)
