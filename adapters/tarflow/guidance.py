"""Classifier-free guidance of TarFlow sampling: its settings and how the two passes combine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Guidance"]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings (public semantics).

    With `weight > 0` each row's conditional output `c` and unconditional output `u` (mean
    class embedding, attention temperature `attn_temp`) give `c + g (c - u)` for the parts
    named in `what` (`'a'`: `log_sigma`, `'b'`: `mu`); `g = weight`, or `weight * t / (T-1)`
    for row `t` when `annealed`.

    References:
        Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
        https://arxiv.org/abs/2412.06329

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

    def row_weight(self, start: int, n: int, seq_len: int, like: Tensor) -> float | Tensor:
        """The weight `g` of rows `[start, start + n)`: a float, or `(n, 1)` when annealed."""
        if not self.annealed:
            return self.weight
        rows = torch.arange(start, start + n, dtype=torch.float64)
        return (rows / max(seq_len - 1, 1) * self.weight).to(like.dtype).to(like.device).view(n, 1)

    def combine(self, cond: tuple[Tensor, Tensor], uncond: tuple[Tensor, Tensor], start: int,
                seq_len: int) -> tuple[Tensor, Tensor]:
        """Guided `(mu, log_sigma)` of rows `[start, start + n)` of a length-`seq_len` sequence.

        Arguments:
            cond: conditional `(mu, log_sigma)`, each `(B, n, D)`.
            uncond: unconditional `(mu, log_sigma)`, same shapes.
            start: the first row.
            seq_len: `T`, for the annealing ramp.
        """
        (mu, log_sigma), (mu_u, log_sigma_u) = cond, uncond
        weight = self.row_weight(start, mu.shape[-2], seq_len, mu)
        if "a" in self.what:
            log_sigma = log_sigma + weight * (log_sigma - log_sigma_u)
        if "b" in self.what:
            mu = mu + weight * (mu - mu_u)
        return mu, log_sigma
