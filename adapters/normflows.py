"""normflows models with their autoregressive loops solved by Jacobi; everything else run by normflows.

normflows' masked autoregressive layers come from nflows: an `Autoregressive` flow inverts
its MADE by one sweep `x <- _elementwise_inverse(z, made(x))` per feature, from `x = 0`.
Which direction holds the loop depends on the layer: `MaskedAffineAutoregressive` (and any
`Autoregressive`) loops in `inverse` (what `log_prob` and `inverse` call), while
`AutoregressiveRationalQuadraticSpline` loops in `forward` (what `sample` and `forward` call).
Here every such loop, in whichever direction it is run, is a block of the shared masked
layer ([`MaskedARBlock`][arflow_solvers.adapters._masked.MaskedARBlock]) whose `inverse_map`
is that very sweep; every other layer is applied by normflows.

**Exact mode.** `Jacobi(tol=0.0)` returns normflows' result bit for bit, samples, data and
log-determinants (the last one recomputed from the fixed point, which is the input of
normflows' last sweep).

References:
    Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
    https://arxiv.org/abs/1705.07057

    Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from arflow_solvers import Flow, Solution

try:
    from normflows.core import NormalizingFlow
    from normflows.flows.affine.autoregressive import Autoregressive, MaskedAffineAutoregressive
    from normflows.flows.base import Composite, Reverse
    from normflows.flows.neural_spline.wrapper import (AutoregressiveRationalQuadraticSpline,
                                                       CircularAutoregressiveRationalQuadraticSpline)
    from normflows.nets.made import MADE, MaskedFeedforwardBlock, MaskedResidualBlock
except ImportError as error:  # pragma: no cover - exercised only without normflows
    raise ImportError("arflow_solvers.adapters.normflows needs normflows: "
                      "pip install 'arflow-solvers[normflows]'") from error

from ._masked import (AddPopped, Apply, Context, ElementwiseInverseBlock, Masked, MaskedAffineBlock, MaskedNetwork,
                      Push, check_sampleable, run_stages, sampling_steps)

__all__ = ["NormflowsARBlock", "NormflowsAffineBlock", "forward", "inverse", "log_prob", "sample", "wrap"]

_SPLINES = (AutoregressiveRationalQuadraticSpline, CircularAutoregressiveRationalQuadraticSpline)
_SUPPORTED = ("arflow_solvers.adapters.normflows solves the loops of Autoregressive layers "
              "(MaskedAffineAutoregressive, MaskedPiecewiseRationalQuadraticAutoregressive) and of "
              "(Circular)AutoregressiveRationalQuadraticSpline, and applies every other layer as normflows does")


def _residual(block: MaskedResidualBlock) -> list:
    """`inputs + glu([L1(dropout(act(bn1(L0(act(bn0(inputs))))))), ctx(c)])`, as normflows computes it."""
    ops: list = [Push()]
    if block.use_batch_norm:
        ops.append(Apply(block.batch_norm_layers[0], pointwise=False))
    ops += [Apply(block.activation), Masked(block.linear_layers[0])]
    if block.use_batch_norm:
        ops.append(Apply(block.batch_norm_layers[1], pointwise=False))
    ops += [Apply(block.activation), Masked(block.linear_layers[1])]  # dropout: identity in eval mode
    if hasattr(block, "context_layer"):
        ops.append(Context(block.context_layer, "glu"))
    return ops + [AddPopped()]


def read_made(net: nn.Module, features: int) -> MaskedNetwork | None:
    """normflows' `MADE.forward` as a program (same operations, same order); `None` for another network."""
    if type(net) is not MADE or any(type(b) not in (MaskedResidualBlock, MaskedFeedforwardBlock) for b in net.blocks):
        return None
    ops: list = [Masked(net.initial_layer)]
    if hasattr(net, "context_layer"):
        ops.append(Context(net.context_layer))
    for block in net.blocks:
        if isinstance(block, MaskedResidualBlock):
            ops += _residual(block)
        else:
            ops += [Apply(block.batch_norm, pointwise=False)] if block.batch_norm else []
            ops += [Masked(block.linear), Apply(block.activation)]
    ops.append(Masked(net.final_layer))
    multiplier = net.final_layer.out_features // features
    rows = torch.arange(features * multiplier, device=net.final_layer.weight.device).view(features, multiplier)
    preprocess = None if isinstance(net.preprocessing, nn.Identity) else net.preprocessing
    return MaskedNetwork(features, tuple(ops), rows, preprocess=preprocess)


class NormflowsARBlock(ElementwiseInverseBlock):
    r"""The loop of a normflows `Autoregressive` layer as a [`CausalMapBlock`][arflow_solvers.CausalMapBlock].

    `inverse_map` is one sweep of normflows' loop, `_elementwise_inverse(z, made(x))`, with
    the MADE evaluated by the shared masked layer (as normflows evaluates it, or packed).

    Arguments:
        transform: an `Autoregressive` layer (for the spline wrappers, their `mprqat`).
        bitwise: evaluate the MADE as normflows does (`True`) or packed (`False`).
    """

    def __init__(self, transform: Autoregressive, *, bitwise: bool = True):
        if not isinstance(transform, Autoregressive):
            raise TypeError(f"transform must be a normflows Autoregressive layer; got {type(transform).__name__}")
        if type(transform).inverse is not Autoregressive.inverse:
            raise TypeError(f"{type(transform).__name__} overrides normflows' autoregressive inverse; {_SUPPORTED}")
        super().__init__(transform, bitwise=bitwise)

    def read_network(self, transform: Autoregressive) -> MaskedNetwork | None:
        return read_made(transform.autoregressive_net, self.opaque_features(transform))

    def opaque_features(self, transform: Autoregressive) -> int:
        return int(transform.autoregressive_net.initial_layer.in_features)

    def inverse_and_log_det(self, x: Tensor, z: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """The last sweep at the fixed point `x` (library order, `(B, F)`): normflows' `(x, log|det|)`."""
        params = self._network_output(self._to_order(x), cond)
        return self.transform._elementwise_inverse(z, params)


class NormflowsAffineBlock(NormflowsARBlock, MaskedAffineBlock):
    r"""normflows' `MaskedAffineAutoregressive`, also affine for the metrics.

    Its density direction is $z = s\,x + b$ with $s = \sigma(u + 2) + 10^{-3}$, so
    $\mu = -b / s$ and $\log\sigma = -\log s$.
    """

    shift_scale = (1, 0)  # per feature: (unconstrained scale, shift)

    def univariate_affine(self, params: Tensor) -> tuple[Tensor, Tensor]:
        unconstrained, shift = self.transform._unconstrained_scale_and_shift(params)
        scale = torch.sigmoid(unconstrained + 2.0) + 1e-3
        return -shift / scale, -torch.log(scale)


def _block(transform: Autoregressive, bitwise: bool) -> NormflowsARBlock:
    affine = isinstance(transform, MaskedAffineAutoregressive) and (
        type(transform)._elementwise_inverse is MaskedAffineAutoregressive._elementwise_inverse)
    return (NormflowsAffineBlock if affine else NormflowsARBlock)(transform, bitwise=bitwise)


class _Step:
    """A layer applied by normflows in one direction: `(x, cond) -> (x, log_det)`."""

    def __init__(self, layer: nn.Module, direction: str):
        self.layer, self.direction = layer, direction
        self.__name__ = f"{type(layer).__name__}.{direction}"

    def with_log_det(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        check_sampleable(self.layer)
        call = getattr(self.layer, self.direction)
        return call(x) if cond is None else call(x, context=cond)

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return self.with_log_det(x, cond)[0]


def _stages(layer: nn.Module, direction: str, bitwise: bool) -> list:
    """Blocks and steps for `layer` run in `direction` (`"forward"` or `"inverse"`), in order."""
    if isinstance(layer, NormalizingFlow):
        layers = list(layer.flows) if direction == "forward" else list(layer.flows)[::-1]
        return [stage for sub in layers for stage in _stages(sub, direction, bitwise)]
    if isinstance(layer, Reverse):
        return _stages(layer.flow, "inverse" if direction == "forward" else "forward", bitwise)
    if isinstance(layer, Composite):
        layers = list(layer._flows) if direction == "forward" else list(layer._flows)[::-1]
        return [stage for sub in layers for stage in _stages(sub, direction, bitwise)]
    if isinstance(layer, Autoregressive) and direction == "inverse":
        return [_block(layer, bitwise)]
    if isinstance(layer, _SPLINES) and direction == "forward":
        return [_block(layer.mprqat, bitwise)]
    if isinstance(layer, (Autoregressive, *_SPLINES)):
        return [_Step(layer, direction)]
    if not isinstance(layer, nn.Module) or not callable(getattr(layer, direction, None)):
        raise TypeError(f"{type(layer).__name__} is not a normflows flow layer; {_SUPPORTED}")
    if any(isinstance(m, Autoregressive) for m in layer.modules()):
        raise TypeError(f"{type(layer).__name__} contains an autoregressive layer it runs itself; {_SUPPORTED}")
    return [_Step(layer, direction)]


def _check_direction(direction: str) -> None:
    if direction not in ("forward", "inverse"):
        raise ValueError(f"direction must be 'forward' (sampling) or 'inverse' (density); got {direction!r}")


def wrap(model: nn.Module, direction: str = "forward", *, bitwise: bool = True) -> Flow:
    """A normflows model (or layer) run in `direction` as an [`arflow_solvers.Flow`][arflow_solvers.Flow].

    `direction="forward"` is what `model.forward(z)` and `model.sample` run (latent to data),
    `"inverse"` what `model.inverse(x)` and `model.log_prob` run (data to latent). Each
    autoregressive loop met in that direction becomes a block (numbered in the order they
    are met), every other layer is applied by normflows. The flow takes `(B, F)` (or
    `(B, F, 1)`) and returns `(B, F)`; pass a conditional model's context as `cond`.

    Arguments:
        model: a `NormalizingFlow` (or `ConditionalNormalizingFlow`), or one flow layer.
        direction: `"forward"` or `"inverse"`.
        bitwise: evaluate the MADEs as normflows does (`True`) or packed (`False`).

    Raises:
        TypeError: a layer is not a normflows flow layer, or hides an autoregressive loop;
            the message names its class and says what is supported.

    Examples:
        >>> import torch, normflows as nf
        >>> from arflow_solvers import Jacobi, solve_inverse
        >>> _ = torch.manual_seed(0)
        >>> model = nf.NormalizingFlow(nf.distributions.DiagGaussian(3),
        ...     [nf.flows.AutoregressiveRationalQuadraticSpline(3, 1, 8, init_identity=False),
        ...      nf.flows.Permute(3, mode="swap")])
        >>> z = torch.randn(5, 3)
        >>> x = solve_inverse(wrap(model), z, Jacobi(tol=0.0))
        >>> bool(torch.equal(x, model.forward(z)))
        True
    """
    _check_direction(direction)
    items = _stages(model, direction, bitwise)
    blocks = [item for item in items if isinstance(item, NormflowsARBlock)]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no autoregressive loop in direction {direction!r}; run it "
                        "with normflows directly")
    return Flow(sampling_steps(items, blocks[0].seq_len))


def _run(model: nn.Module, x: Tensor, direction: str, plan: Any, context: Any, bitwise: bool,
         throw: bool) -> tuple[Tensor, list[Tensor], Solution]:
    """Apply `model` in `direction`, solving its loops by `plan`; the output, each layer's log|det|, stats."""
    _check_direction(direction)
    return run_stages(_stages(model, direction, bitwise), x, plan, context, throw)


def forward(model: nn.Module, z: Tensor, plan: Any, context: Any = None, *, bitwise: bool = True,
            return_solution: bool = False, throw: bool = True) -> Any:
    """`model.forward_and_log_det(z)` (latent to data): `(x, log_det)`, the loops solved by `plan`.

    Arguments:
        model: a normflows model or layer.
        z: `(B, F)` latent.
        plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver (`Jacobi(tol=0.0)`
            reproduces normflows bit for bit).
        context: a conditional model's context, or `None`.
        bitwise: `False` evaluates the MADEs packed.
        return_solution: also return the [`Solution`][arflow_solvers.Solution].
        throw: raise if some sample is not finite.
    """
    x, log_dets, solution = _run(model, z, "forward", plan, context, bitwise, throw)
    total = torch.zeros(len(z), device=z.device)
    for log_det in log_dets:
        total += log_det
    return ((x, total), solution) if return_solution else (x, total)


def inverse(model: nn.Module, x: Tensor, plan: Any, context: Any = None, *, bitwise: bool = True,
            return_solution: bool = False, throw: bool = True) -> Any:
    """`model.inverse_and_log_det(x)` (data to latent): `(z, log_det)`, the loops solved by `plan`.

    Arguments are those of [`forward`][arflow_solvers.adapters.normflows.forward], with `x`
    the `(B, F)` data.
    """
    z, log_dets, solution = _run(model, x, "inverse", plan, context, bitwise, throw)
    total = torch.zeros(len(x), device=x.device)
    for log_det in log_dets:
        total += log_det
    return ((z, total), solution) if return_solution else (z, total)


def sample(model: NormalizingFlow, num_samples: int, plan: Any, context: Any = None, *, bitwise: bool = True,
           return_solution: bool = False, throw: bool = True) -> Any:
    """`model.sample(num_samples)`: `(x, log_q)`, the loops solved by `plan`.

    Draws the latent from `model.q0` as normflows does (the same seed gives the same noise).

    Examples:
        >>> import torch, normflows as nf
        >>> from arflow_solvers import Jacobi
        >>> _ = torch.manual_seed(0)
        >>> model = nf.NormalizingFlow(nf.distributions.DiagGaussian(4),
        ...     [nf.flows.AutoregressiveRationalQuadraticSpline(4, 1, 8, init_identity=False)])
        >>> _ = torch.manual_seed(1)
        >>> x, log_q = sample(model, 6, Jacobi(tol=0.0))
        >>> _ = torch.manual_seed(1)
        >>> expected, expected_log_q = model.sample(6)
        >>> bool(torch.equal(x, expected)), bool(torch.equal(log_q, expected_log_q))
        (True, True)
    """
    if not isinstance(model, NormalizingFlow):
        raise TypeError(f"model must be a normflows NormalizingFlow; got {type(model).__name__}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
    with torch.no_grad():
        z, log_q = model.q0(num_samples) if context is None else model.q0(num_samples, context=context)
    x, log_dets, solution = _run(model, z, "forward", plan, context, bitwise, throw)
    for log_det in log_dets:
        log_q -= log_det
    return ((x, log_q), solution) if return_solution else (x, log_q)


def log_prob(model: NormalizingFlow, x: Tensor, plan: Any, context: Any = None, *, bitwise: bool = True,
             return_solution: bool = False, throw: bool = True) -> Any:
    """`model.log_prob(x)`: the `(B,)` log-density of data `x`, the loops solved by `plan`."""
    if not isinstance(model, NormalizingFlow):
        raise TypeError(f"model must be a normflows NormalizingFlow; got {type(model).__name__}")
    z, log_dets, solution = _run(model, x, "inverse", plan, context, bitwise, throw)
    log_q = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for log_det in log_dets:
        log_q += log_det
    with torch.no_grad():
        log_q += model.q0.log_prob(z) if context is None else model.q0.log_prob(z, context=context)
    return (log_q, solution) if return_solution else log_q
