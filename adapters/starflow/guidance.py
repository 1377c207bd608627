"""Classifier-free guidance of STARFlow sampling: the public `logits_guided` rule."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..tarflow.guidance import Guidance

__all__ = ["LogitsGuidance"]


@dataclass(frozen=True)
class LogitsGuidance(Guidance):
    r"""STARFlow's guidance settings and its `logits_guided` rule (public semantics).

    Each row's conditional Gaussian $(\mu_c, \sigma_c)$ and unconditional one
    $(\mu_u, \sigma_u)$ (the null caption) are combined as the density
    $p_c^{1+w} / p_u^{w}$ would, with the variance ratio clipped so the result stays proper:

    $$s = \min(\sigma_c / \sigma_u, 1)^2,\quad
      \sigma = \frac{\sigma_c}{\sqrt{1 + w - w s}},\quad
      \mu = \frac{(1 + w)\mu_c - w s\,\mu_u}{1 + w - w s}.$$

    Unlike TarFlow's [`Guidance`][arflow_solvers.adapters.tarflow.guidance.Guidance],
    `attn_temp` divides the attention logits of *every* pass (conditional and unconditional,
    text prefix included) and applies without guidance too, and `annealed` changes nothing:
    the public sampler computes an annealing ramp but its `logits_guided` rule never reads it.
    `what` only switches guidance off when empty.

    References:
        STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
        (Gu et al., 2025), https://arxiv.org/abs/2506.06276

    Arguments:
        weight: guidance weight $w$; 0 turns guidance off.
        what: a non-empty subset of `'ab'` to guide (the rule always guides both).
        attn_temp: attention temperature of every pass.
        annealed: accepted for the public signature; no effect (see above).

    Examples:
        >>> import torch
        >>> g = LogitsGuidance(weight=1.0)
        >>> mu, sigma = g.combine((torch.ones(1), torch.ones(1)), (torch.zeros(1), 2 * torch.ones(1)), 0, 4)
        >>> mu.item(), round(sigma.item(), 4)
        (1.1428571939468384, 0.7559)
    """

    def combine(self, cond: tuple[Tensor, Tensor], uncond: tuple[Tensor, Tensor], start: int,
                seq_len: int) -> tuple[Tensor, Tensor]:
        """Guided `(mu, sigma)` from the conditional and unconditional `(mu, sigma)` pairs.

        Takes and returns the scale $\\sigma$ itself, not its log, as the public sampler does.

        Arguments:
            cond: conditional `(mu, sigma)`, each `(B, n, D)`.
            uncond: unconditional `(mu, sigma)`, same shapes.
            start: the first row (unused: the weight is the same for every row).
            seq_len: `T` (unused).
        """
        (mu_c, sigma_c), (mu_u, sigma_u) = cond, uncond
        w = self.weight
        s = (sigma_c / sigma_u).clip(max=1.0).square()
        spread = 1 + w - w * s
        return ((1 + w) * mu_c - (w * s) * mu_u) / spread, sigma_c / spread.sqrt()
