"""nflows autoregressive transforms as blocks the solvers invert, and other transforms as steps."""

from __future__ import annotations

from typing import Any

import torch
from nflows.transforms.autoregressive import AutoregressiveTransform, MaskedAffineAutoregressiveTransform
from nflows.transforms.base import Transform
from torch import Tensor
from torch.nn import functional as F

from .._masked import ElementwiseInverseBlock, MaskedAffineBlock, MaskedNetwork
from .made import check_packable, read_made

__all__ = ["NflowsARBlock", "NflowsAffineBlock", "NflowsStep", "ar_block"]


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


class NflowsARBlock(ElementwiseInverseBlock):
    r"""Any nflows `AutoregressiveTransform`, as a [`CausalMapBlock`][arflow_solvers.CausalMapBlock].

    nflows inverts an AR transform by `T` sweeps of
    `x <- transform._elementwise_inverse(z, net(x, context))` starting from `x = 0`. This
    block exposes that very sweep as `inverse_map`, so any solver's fixed point is the one
    nflows reaches, computed by the same operations (bit-identical in exact mode), for
    affine, spline (rational-quadratic, cubic, ...) and any other elementwise transform.
    Jacobi needs nothing else: row `t` of the update reads `x[:, :t]` and `z[:, t]` only.

    nflows' MADE is evaluated by the shared masked layer
    ([`MaskedARBlock`][arflow_solvers.adapters._masked.MaskedARBlock]) with its masked
    products read once per solve; any other `autoregressive_net` is called as nflows calls it.

    Shapes: the core's `(B, T, 1)` with `T = features`; nflows sees `(B, T)`. `cond` is the
    (embedded) context nflows would pass, `(B, context_features)`, or `None`.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        https://arxiv.org/abs/1705.07057

    Arguments:
        transform: the nflows autoregressive transform (a MADE-based one).
        bitwise: see [`NflowsAffineBlock`][arflow_solvers.adapters.nflows.NflowsAffineBlock].
    """

    def __init__(self, transform: AutoregressiveTransform, *, bitwise: bool = True):
        if not isinstance(transform, AutoregressiveTransform):
            raise TypeError(
                f"transform must be an nflows AutoregressiveTransform; got {type(transform).__name__}"
            )
        if type(transform).inverse is not AutoregressiveTransform.inverse:
            raise TypeError(
                f"{type(transform).__name__} overrides nflows' autoregressive inverse, so its "
                "inverse is not the causal sweep the solvers iterate; it cannot be wrapped"
            )
        if not isinstance(bitwise, bool):
            raise TypeError(f"bitwise must be a bool; got {bitwise!r}")
        if not bitwise:
            check_packable(transform)
        super().__init__(transform, bitwise=bitwise)
        if not self._identity:  # nflows' MADE always reads features in their own order
            raise ValueError(f"{self.name}'s masks are not autoregressive in nflows' feature order")

    def read_network(self, transform: AutoregressiveTransform) -> MaskedNetwork | None:
        return read_made(transform.autoregressive_net, _features(transform))

    def opaque_features(self, transform: AutoregressiveTransform) -> int:
        return _features(transform)


class NflowsAffineBlock(NflowsARBlock, MaskedAffineBlock):
    r"""nflows' `MaskedAffineAutoregressiveTransform` as an affine block.

    nflows' density direction is $z = s\,x + b$ with $s = \mathrm{softplus}(u) + 10^{-3}$,
    where the MADE's outputs are interleaved per feature as `(u_i, b_i)`. Sampling inverts
    it: $x = (z - b) / s$, i.e. $\log\sigma = -\log s$ and $\mu = -b / s$, which `affine`
    returns for the metrics (IGM, CRM). The solvers iterate `inverse_map`, computed exactly
    as nflows does (`(z - shift) / scale`), so the answer matches nflows bit for bit.

    With `bitwise=False` the update runs on a packed copy of the MADE instead (degree-sorted,
    block-triangular weights that skip the masked zeros, feature-major activations; see
    [`PackedProgram`][arflow_solvers.adapters._masked.PackedProgram]): the same function at
    a fraction of the cost of nflows' pass (measured on the docs' MAF page), equal to
    nflows' update to float rounding rather than bit for bit. The copy is rebuilt when a
    weight changes.

    Arguments:
        transform: a `MaskedAffineAutoregressiveTransform`.
        bitwise: compute the update as nflows does (`True`, default) or on the packed MADE.
    """

    shift_scale = (1, 0)  # nflows' outputs per feature: (unconstrained scale, shift)

    def __init__(self, transform: MaskedAffineAutoregressiveTransform, *, bitwise: bool = True):
        if not isinstance(transform, MaskedAffineAutoregressiveTransform):
            raise TypeError(
                "transform must be an nflows MaskedAffineAutoregressiveTransform; "
                f"got {type(transform).__name__}"
            )
        super().__init__(transform, bitwise=bitwise)

    def _scale_shift(self, params: Tensor) -> tuple[Tensor, Tensor]:
        unconstrained, shift = self.transform._unconstrained_scale_and_shift(params)
        return F.softplus(unconstrained) + self.transform._epsilon, shift

    def univariate_inverse(self, params: Tensor, z: Tensor) -> Tensor:
        """nflows' inverse sweep, `(z - shift) / scale`, without its unused log-determinant.

        The same operations in the same order as nflows' `_elementwise_inverse`, so the
        same bits, without computing `log(scale)` and its sum.
        """
        scale, shift = self._scale_shift(params)
        return (z - shift) / scale

    def univariate_affine(self, params: Tensor) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_shift(params)
        return -shift / scale, -torch.log(scale)


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
        return self.with_log_det(x, cond)[0]

    def with_log_det(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """nflows' `transform.inverse(x, context)`: the output as `(B, T, 1)` and its log |det|."""
        out, log_det = self.transform.inverse(x.reshape(x.shape[0], -1), context=cond)
        return out.reshape(out.shape[0], -1, 1), log_det

    def __repr__(self) -> str:
        return f"NflowsStep({type(self.transform).__name__})"


def ar_block(transform: AutoregressiveTransform, *, bitwise: bool = True) -> NflowsARBlock:
    """The block for one nflows AR transform: affine when it is MAF's, a causal map otherwise.

    `bitwise=False` packs the MADE (see [`NflowsAffineBlock`][arflow_solvers.adapters.nflows.NflowsAffineBlock]);
    it raises `ValueError` for a MAF whose MADE cannot be packed, while other AR transforms
    whose network cannot be packed are evaluated as nflows evaluates them.
    """
    if isinstance(transform, MaskedAffineAutoregressiveTransform) and (
        type(transform)._elementwise_inverse
        is MaskedAffineAutoregressiveTransform._elementwise_inverse
    ):
        return NflowsAffineBlock(transform, bitwise=bitwise)
    if not bitwise:
        try:
            return NflowsARBlock(transform, bitwise=False)
        except ValueError:
            pass
    return NflowsARBlock(transform)
