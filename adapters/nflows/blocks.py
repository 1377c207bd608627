"""nflows autoregressive transforms as blocks the solvers invert, and other transforms as steps."""

from __future__ import annotations

import copy
from typing import Any

import torch
from nflows.transforms.autoregressive import AutoregressiveTransform, MaskedAffineAutoregressiveTransform
from nflows.transforms.base import Transform
from torch import Tensor
from torch.nn import functional as F

from .made import PACKED, PackedMADE, check_packable, check_sampleable, snapshot_network

__all__ = ["NflowsARBlock", "NflowsAffineBlock", "NflowsStep", "ar_block"]


def _flat(x: Tensor, features: int, name: str = "x") -> Tensor:
    """`(B, T, 1)` to nflows' `(B, T)`."""
    if x.dim() != 3 or x.shape[1] != features or x.shape[2] != 1:
        raise ValueError(f"{name} must have shape (B, {features}, 1); got {tuple(x.shape)}")
    return x.reshape(x.shape[0], features)


def _features(transform: AutoregressiveTransform) -> int:
    """The number of dimensions an nflows AR transform works on."""
    features = getattr(transform, "features", None)
    if isinstance(features, int):
        return features
    initial = getattr(transform.autoregressive_net, "initial_layer", None)
    if initial is not None and hasattr(initial, "in_features"):
        return int(initial.in_features)
    raise TypeError(
        f"cannot tell how many features {type(transform).__name__} has: it has no `features` "
        "attribute and its autoregressive_net is not an nflows MADE"
    )


class NflowsARBlock:
    r"""Any nflows `AutoregressiveTransform`, as a [`CausalMapBlock`][arflow_solvers.CausalMapBlock].

    nflows inverts an AR transform by `T` sweeps of
    `x <- transform._elementwise_inverse(z, net(x, context))` starting from `x = 0`. This
    block exposes that very sweep as `inverse_map`, so any solver's fixed point is the one
    nflows reaches, computed by the same operations (bit-identical in exact mode), for
    affine, spline (rational-quadratic, cubic, ...) and any other elementwise transform.
    Jacobi needs nothing else: row `t` of the update reads `x[:, :t]` and `z[:, t]` only.

    Shapes: the core's `(B, T, 1)` with `T = features`; nflows sees `(B, T)`. `cond` is the
    (embedded) context nflows would pass, `(B, context_features)`, or `None`.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        https://arxiv.org/abs/1705.07057

    Arguments:
        transform: the nflows autoregressive transform (a MADE-based one).
    """

    def __init__(self, transform: AutoregressiveTransform):
        if not isinstance(transform, AutoregressiveTransform):
            raise TypeError(
                f"transform must be an nflows AutoregressiveTransform; got {type(transform).__name__}"
            )
        if type(transform).inverse is not AutoregressiveTransform.inverse:
            raise TypeError(
                f"{type(transform).__name__} overrides nflows' autoregressive inverse, so its "
                "inverse is not the causal sweep the solvers iterate; it cannot be wrapped"
            )
        self.transform = transform
        self.seq_len = _features(transform)
        self._network = transform.autoregressive_net

    def snapshot(self) -> "NflowsARBlock":
        """This block for one solve: its MADE's masked products read once, now.

        The solvers call it at the start of every solve, so weights updated between solves (by
        an optimizer, or through `p.data` as an EMA does) are always seen; the transform itself
        is never modified. Refuses a transform whose training mode would change the samples.
        """
        check_sampleable(self.transform)
        if torch.is_grad_enabled():
            return self
        solving = copy.copy(self)
        solving._network = snapshot_network(self.transform.autoregressive_net)
        return solving

    def _net(self, x: Tensor, cond: Any) -> Tensor:
        """The MADE's outputs for `(B, T, 1)` inputs."""
        return self._network(_flat(x, self.seq_len), cond)

    def inverse_map(self, x: Tensor, z: Tensor, cond: Any = None) -> Tensor:
        """One sweep of nflows' inverse loop: `(B, T, 1)` iterate and noise to the new iterate."""
        batch = x.shape[0]
        params = self._net(x, cond)
        out, _ = self.transform._elementwise_inverse(_flat(z, self.seq_len, "z"), params)
        return out.reshape(batch, self.seq_len, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.transform).__name__}, features={self.seq_len})"


class NflowsAffineBlock(NflowsARBlock):
    r"""nflows' `MaskedAffineAutoregressiveTransform` as an affine block.

    nflows' density direction is $z = s\,x + b$ with $s = \mathrm{softplus}(u) + 10^{-3}$,
    where the MADE's outputs are interleaved per feature as `(u_i, b_i)`. Sampling inverts
    it: $x = (z - b) / s$, i.e. $\log\sigma = -\log s$ and $\mu = -b / s$, which `affine`
    returns for the metrics (IGM, CRM). The solvers iterate `inverse_map`, computed exactly
    as nflows does (`(z - shift) / scale`), so the answer matches nflows bit for bit.

    With `bitwise=False` the update runs on a packed copy of the MADE instead (degree-sorted,
    block-triangular weights that skip the masked zeros, feature-major activations): the
    same function at a fraction of the cost of nflows' pass (measured on the docs' MAF page),
    equal to nflows' update to float rounding rather than bit for bit. The copy is rebuilt
    when a weight changes.

    Arguments:
        transform: a `MaskedAffineAutoregressiveTransform`.
        bitwise: compute the update as nflows does (`True`, default) or on the packed MADE.
    """

    def __init__(self, transform: MaskedAffineAutoregressiveTransform, *, bitwise: bool = True):
        if not isinstance(transform, MaskedAffineAutoregressiveTransform):
            raise TypeError(
                "transform must be an nflows MaskedAffineAutoregressiveTransform; "
                f"got {type(transform).__name__}"
            )
        if not isinstance(bitwise, bool):
            raise TypeError(f"bitwise must be a bool; got {bitwise!r}")
        super().__init__(transform)
        self.bitwise = bitwise
        self._packed: PackedMADE | None = None
        if not bitwise:
            check_packable(transform)

    def snapshot(self) -> "NflowsAffineBlock":
        """This block for one solve: its masked products, or its packed MADE, read once, now."""
        solving = super().snapshot()
        if not self.bitwise and solving is not self:
            check_packable(self.transform)
            solving._packed = PACKED(self.transform)
        return solving

    def _scale_shift(self, x: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        params = self._net(x, cond)
        unconstrained, shift = self.transform._unconstrained_scale_and_shift(params)
        return F.softplus(unconstrained) + self.transform._epsilon, shift

    def inverse_map(self, x: Tensor, z: Tensor, cond: Any = None) -> Tensor:
        """nflows' inverse sweep, `(z - shift) / scale`, without its unused log-determinant.

        The same operations in the same order as nflows' `_elementwise_inverse`, so the
        same bits, without computing `log(scale)` and its sum.
        """
        flat_z = _flat(z, self.seq_len, "z")
        if not self.bitwise and not torch.is_grad_enabled():
            packed = self._packed or PACKED(self.transform)
            return packed.inverse_map(_flat(x, self.seq_len), flat_z, cond).unsqueeze(-1)
        scale, shift = self._scale_shift(x, cond)
        return ((flat_z - shift) / scale).reshape(x.shape[0], self.seq_len, 1)

    def affine(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """`(mu, log_sigma)` of `x = exp(log_sigma) z + mu`, each `(B, T, 1)`."""
        scale, shift = self._scale_shift(x, cond)
        return (-shift / scale).unsqueeze(-1), (-torch.log(scale)).unsqueeze(-1)

    def output_projection(self) -> tuple[Tensor, Tensor]:
        """`(W_shift, W_scale)`: the masked output rows producing the shift and the raw scale.

        nflows' `mu` and `log_sigma` are smooth functions of these two linear outputs
        (`-b/s`, `-log s`), so these are the matrices a CRM-style contractivity estimate
        reads; each is `(T, hidden)`.
        """
        final = self.transform.autoregressive_net.final_layer
        weight = final.weight * final.mask
        return weight[1::2], weight[0::2]


class NflowsStep:
    """A non-autoregressive nflows transform, inverted by nflows itself (`transform.inverse`).

    Used for permutations, batch norm (in eval mode), linear layers and any other transform
    whose inverse is parallel. Reshapes the core's `(B, T, 1)` to nflows' `(B, T)` and back.

    Arguments:
        transform: the nflows `Transform`.
    """

    def __init__(self, transform: Transform):
        self.transform = transform
        self.__name__ = f"{type(transform).__name__}.inverse"

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        out, _ = self.transform.inverse(x.reshape(x.shape[0], -1), context=cond)
        return out.reshape(out.shape[0], -1, 1)

    def __repr__(self) -> str:
        return f"NflowsStep({type(self.transform).__name__})"


def ar_block(transform: AutoregressiveTransform, *, bitwise: bool = True) -> NflowsARBlock:
    """The block for one nflows AR transform: affine when it is MAF's, a causal map otherwise.

    `bitwise=False` packs MAF's MADE (see [`NflowsAffineBlock`][arflow_solvers.adapters.nflows.NflowsAffineBlock]);
    other AR transforms are always evaluated by nflows.
    """
    if isinstance(transform, MaskedAffineAutoregressiveTransform) and (
        type(transform)._elementwise_inverse
        is MaskedAffineAutoregressiveTransform._elementwise_inverse
    ):
        return NflowsAffineBlock(transform, bitwise=bitwise)
    return NflowsARBlock(transform)


