"""STARFlow's rotary position embedding: 2-D image positions with an optional text prefix."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["VisionRope", "apply_rope"]

THETA = 10000
TEXT_FREQS = 8
"""Rotary frequencies given to the text axis when the model has a text prefix (`txt_size > 0`)."""


def _rotate_pairs(x: Tensor) -> Tensor:
    """Rotate each adjacent channel pair `(a, b)` to `(-b, a)`."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, hf_style: bool = False) -> Tensor:
    """Rotate the channel pairs of `x` (`(..., n, head_dim)`) by the angles of `cos`, `sin` (`(n, head_dim)`).

    Pairs are adjacent channels `(2i, 2i + 1)`; with `hf_style` they are `(i, i + head_dim / 2)`
    (the layout of Hugging Face checkpoints), rotated by the same angles.

    Examples:
        >>> x = torch.tensor([[1.0, 0.0]])
        >>> apply_rope(x, torch.zeros(1, 2), torch.ones(1, 2))
        tensor([[0., 1.]])
    """
    if hf_style:
        halves = x.unflatten(-1, (2, -1))
        x = halves.transpose(-1, -2).flatten(-2)
    out = x * cos + _rotate_pairs(x) * sin
    if hf_style:
        out = out.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    return out


def _inverse_powers(count: int, width: int, step: int) -> Tensor:
    """`1 / THETA ** (k / width)` for `k = 0, step, 2 step, ...`, `count` of them, in float32."""
    return 1.0 / (THETA ** (torch.arange(0, step * count, step)[:count].float() / width))


class VisionRope(nn.Module):
    r"""Rotary embedding over image rows, columns and (with a text prefix) the text axis.

    The public `VisionRotaryEmbeddingFast` (2-D or 3-D, not its 1-D variant). Of the
    `head_dim / 2` rotation frequencies, `TEXT_FREQS = 8` go to the text axis when the model
    has a text prefix (`latent_len > 0`) and the rest are shared by the row and the column axis.
    Image token $(i, j)$ of an $h \times w$ grid sits at row $i \cdot s / \sqrt{hw}$ and column
    $j \cdot s / \sqrt{hw}$ ($s$ = `pt_seq_len`), text axis 0; text token $k$ of $L$ at row and
    column 0, text axis $k s / L$. Positions follow the sequence, not the data: a flipped
    block's token $n$ takes position $n$.

    Arguments:
        head_dim: channels per attention head (a multiple of 4; at least 16 with a text prefix).
        pt_seq_len: the grid side the positions are scaled to.
        latent_len: the model's text length `txt_size` (0: no text axis).
        placeholders: register the public module's all-zero `freqs_cos` / `freqs_sin` buffers,
            so the model's state dict has its keys (only its shallow blocks' rope does).

    Examples:
        >>> rope = VisionRope(16, pt_seq_len=4, latent_len=2)
        >>> cos, sin = rope.tables(4, 4, text=2, dtype=torch.float32)
        >>> cos.shape
        torch.Size([18, 16])
    """

    def __init__(self, head_dim: int, pt_seq_len: int, latent_len: int = 0, placeholders: bool = True):
        super().__init__()
        half = head_dim // 2
        if head_dim % 4 or (latent_len and half < TEXT_FREQS):
            raise ValueError(f"rope needs head_dim a multiple of 4 (and >= {2 * TEXT_FREQS} with a text prefix); "
                             f"got head_dim={head_dim}")
        image = half - TEXT_FREQS if latent_len else half
        self.image_freqs = _inverse_powers(image // 2, image, 2)
        self.text_freqs = _inverse_powers(TEXT_FREQS, TEXT_FREQS, 1) if latent_len else None
        self.pt_seq_len = pt_seq_len
        self.latent_len = latent_len
        self.head_dim = head_dim
        if placeholders:
            deprecated = torch.zeros(latent_len + pt_seq_len**2, head_dim)
            self.register_buffer("freqs_cos", deprecated)
            self.register_buffer("freqs_sin", deprecated)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, pt_seq_len={self.pt_seq_len}, latent_len={self.latent_len}"

    def positions(self, h: int, w: int, text: int) -> Tensor:
        """`(text + h * w, 2 or 3)` positions: the text prefix first, then the image in raster order."""
        side = math.sqrt(h * w)
        rows = torch.arange(h) / side * self.pt_seq_len
        cols = torch.arange(w) / side * self.pt_seq_len
        rows, cols = (p.reshape(-1) for p in torch.meshgrid(rows, cols, indexing="ij"))
        if not self.latent_len:
            if text:
                raise ValueError("a text prefix needs a rope built with latent_len > 0 (txt_size > 0)")
            return torch.stack([rows, cols], dim=-1)
        axes = [rows, cols, torch.zeros_like(rows)]
        if text:
            along = torch.arange(text) / text * self.pt_seq_len
            axes = [torch.cat([torch.zeros_like(along), axes[0]]), torch.cat([torch.zeros_like(along), axes[1]]),
                    torch.cat([along, axes[2]])]
        return torch.stack(axes, dim=-1)

    def tables(self, h: int, w: int, text: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """`(cos, sin)`, each `(text + h * w, head_dim)`, of the angles of every position.

        Arguments:
            h: grid rows.
            w: grid columns.
            text: text prefix length `L` (0: none).
            dtype: dtype the positions and angles are computed in (as the public code: the
                activations' dtype).
            device: where the tables go.
        """
        pos = self.positions(h, w, text).to(dtype)
        angles = [pos[:, 0, None] * self.image_freqs.to(pos), pos[:, 1, None] * self.image_freqs.to(pos)]
        if pos.shape[1] == 3:
            angles.append(pos[:, 2, None] * self.text_freqs.to(pos))
        angle = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1).to(device)
        return angle.cos(), angle.sin()
