"""pyro's autoregressive transforms with their inverse loops solved by Jacobi; the rest run by pyro.

pyro's `AffineAutoregressive` (an inverse autoregressive flow, IAF) samples in one network
pass but inverts (what `log_prob` of data and `.inv` need) by a loop of one network pass per
feature: Gauss-Seidel in the order of its network's `permutation`, updating one feature per
pass. `SplineAutoregressive` inverts by `F` full sweeps from zero. Here each such inverse is a
block of the shared masked layer ([`MaskedARBlock`][arflow_solvers.adapters._masked.MaskedARBlock])
whose `inverse_map` computes every feature's update at once with pyro's own operations;
every other transform is run by pyro.

**Exactness.** The exact mode `Jacobi(tol=0.0)` reaches the fixed point both loops reach,
with the same network and the same elementwise operations, so it agrees with pyro bit for
bit wherever those operations round the same on a whole `(B, F)` tensor as on pyro's single
columns: observed bit for bit for `AffineAutoregressive` (both variants) and
`SplineAutoregressive` in float32 (tested), to float rounding otherwise.

References:
    Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016),
    https://arxiv.org/abs/1606.04934

    Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import Size, Tensor, nn
from torch.distributions import ComposeTransform, Transform, TransformedDistribution
from torch.distributions.transforms import _InverseTransform
from torch.distributions.utils import _sum_rightmost

from arflow_solvers import Flow

try:
    from pyro.distributions import ConditionalTransformedDistribution
    from pyro.distributions.conditional import ConditionalTransformModule
    from pyro.distributions.transforms import (AffineAutoregressive, ConditionalAffineAutoregressive,
                                               ConditionalSplineAutoregressive, SplineAutoregressive)
    from pyro.distributions.transforms.spline import ConditionalSpline, ConditionedSpline
    from pyro.distributions.transforms.utils import clamp_preserve_gradients
    from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
except ImportError as error:  # pragma: no cover - exercised only without pyro
    raise ImportError("arflow_solvers.adapters.pyro needs pyro: pip install 'arflow-solvers[pyro]'") from error

from ._masked import (AddPopped, Masked, MaskedARBlock, MaskedNetwork, Push, check_sampleable, pointwise, run_stages,
                      sampling_steps)

__all__ = ["PyroARBlock", "inverse", "log_prob", "sample", "wrap"]

_SUPPORTED = ("arflow_solvers.adapters.pyro solves the inverses of AffineAutoregressive and SplineAutoregressive "
              "(and their Conditional versions) on pyro's AutoRegressiveNN, and runs every other transform as pyro does")
_SOLVED = (AffineAutoregressive, SplineAutoregressive)
_CONDITIONAL = (ConditionalAffineAutoregressive, ConditionalSplineAutoregressive)


def _network(transform: Transform) -> nn.Module:
    """The transform's `AutoRegressiveNN` (the module behind a conditioned transform's partial)."""
    arn = transform.arn
    return arn.func if isinstance(arn, functools.partial) else arn


class PyroARBlock(MaskedARBlock):
    r"""The inverse of a pyro `AffineAutoregressive` or `SplineAutoregressive`, as a block.

    `inverse_map` updates every feature at once from pyro's network output: for the affine
    transform $x = (y - \mu) \exp(-\mathrm{clamp}(\log s))$ (or the `stable` variant's
    $x = s^{-1} y + (1 - s^{-1})\mu$), for the spline pyro's own `ConditionedSpline` inverse.
    The network (pyro's `AutoRegressiveNN`, skip connections and context included) is read
    by the shared masked layer; its `permutation` gives the block's order.

    Arguments:
        transform: an `AffineAutoregressive` or `SplineAutoregressive` (possibly made by
            `condition(context)`; pass its context as `cond`, or here as `context`).
        bitwise: evaluate the network as pyro does (`True`) or packed (`False`).
        context: `(C,)`: one context for every sample, or `None`.
    """

    def __init__(self, transform: Transform, *, bitwise: bool = True, context: Tensor | None = None):
        if not isinstance(transform, _SOLVED):
            raise TypeError(f"transform must be pyro's AffineAutoregressive or SplineAutoregressive; "
                            f"got {type(transform).__name__}")
        kind = AffineAutoregressive if isinstance(transform, AffineAutoregressive) else SplineAutoregressive
        if type(transform)._inverse is not kind._inverse:
            raise TypeError(f"{type(transform).__name__} overrides pyro's inverse; {_SUPPORTED}")
        network = _network(transform)
        if not isinstance(network, ConditionalAutoRegressiveNN):
            raise TypeError(f"{type(transform).__name__}'s network is a {type(network).__name__}, not pyro's "
                            f"AutoRegressiveNN; {_SUPPORTED}")
        self.flow_transform = transform
        super().__init__(network, bitwise=bitwise, context=context)

    @property
    def name(self) -> str:
        return type(self.flow_transform).__name__

    def read_network(self, arn: ConditionalAutoRegressiveNN) -> MaskedNetwork:
        ops: list = [Push()] if arn.skip_layer is not None else []
        for layer in arn.layers[:-1]:
            ops += [Masked(layer), pointwise(arn.f, self.name)]
        ops.append(Masked(arn.layers[-1]))
        if arn.skip_layer is not None:
            ops.append(AddPopped(arn.skip_layer))
        features, multiplier = arn.input_dim, arn.output_multiplier
        rows = torch.arange(features * multiplier, device=arn.permutation.device).view(multiplier, features).T
        return MaskedNetwork(features, tuple(ops), rows, context="prepend" if arn.context_dim else None)

    def _outputs(self, params: Tensor) -> list[Tensor]:
        """pyro's network outputs: `(B, F)` per parameter of one dimension, `(B, p, F)` otherwise."""
        arn = _network(self.flow_transform)
        shaped = params.reshape(params.shape[0], arn.output_multiplier, arn.input_dim)
        if arn.all_ones:
            return list(torch.unbind(shaped, dim=-2))
        return [shaped[..., s, :] for s in arn.param_slices]

    def _spline(self, params: Tensor) -> ConditionedSpline:
        spline = self.flow_transform.spline
        raw = tuple(self._outputs(params))
        reader = types.SimpleNamespace(nn=lambda context: raw, input_dim=spline.input_dim,
                                       count_bins=spline.count_bins, order=spline.order)
        return ConditionedSpline(ConditionalSpline._params(reader, None), bound=spline.bound, order=spline.order)

    def univariate_inverse(self, params: Tensor, z: Tensor) -> Tensor:
        """Every feature's update at once, with pyro's operations in pyro's order."""
        t = self.flow_transform
        if isinstance(t, SplineAutoregressive):
            return self._spline(params)._inverse(z)
        mean, scale = self._outputs(params)
        if t.stable:
            inverse_scale = 1 + torch.exp(-scale - t.sigmoid_bias)
            return inverse_scale * z + (1 - inverse_scale) * mean
        return (z - mean) * torch.exp(-clamp_preserve_gradients(scale, min=t.log_scale_min_clip,
                                                                max=t.log_scale_max_clip))

    def inverse_and_log_det(self, x: Tensor, z: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """`x` (the fixed point, library order) and pyro's `log_abs_det_jacobian(x, z)`, from one more pass."""
        t = self.flow_transform
        params = self._network_output(self._to_order(x), cond)
        if isinstance(t, SplineAutoregressive):
            spline = self._spline(params)
            return spline._inverse(z), spline._cache_log_detJ.sum(-1)
        _, scale = self._outputs(params)
        if t.stable:
            log_scale = t.logsigmoid(scale + t.sigmoid_bias)
        else:
            log_scale = clamp_preserve_gradients(scale, min=t.log_scale_min_clip, max=t.log_scale_max_clip)
        return self.univariate_inverse(params, z), log_scale.sum(-1)


class _Step:
    """A transform pyro runs itself, in one direction; keeps `log_abs_det_jacobian` of the forward map."""

    def __init__(self, transform: Transform, direction: str):
        self.transform, self.direction = transform, direction
        self.__name__ = f"{type(transform).__name__}.{'inv' if direction == 'inverse' else 'call'}"

    def with_log_det(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        if isinstance(self.transform, nn.Module):
            check_sampleable(self.transform)
        if self.direction == "inverse":
            out = self.transform.inv(x)
            return out, self.transform.log_abs_det_jacobian(out, x)
        out = self.transform(x)
        return out, self.transform.log_abs_det_jacobian(x, out)

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return self.with_log_det(x, cond)[0]


def _flip(direction: str) -> str:
    return "forward" if direction == "inverse" else "inverse"


def _stages(transform: Any, direction: str, context: Any, bitwise: bool, bind: Tensor | None = None) -> list:
    """Blocks and steps that run `transform` in `direction`, in the order they apply.

    `context` conditions the conditional transforms; `bind` (one `(C,)` vector) is bound to
    the blocks, which otherwise read their context from the solver's `cond`.
    """
    if isinstance(transform, (list, tuple)):
        parts = list(transform) if direction == "forward" else list(transform)[::-1]
        return [stage for part in parts for stage in _stages(part, direction, context, bitwise, bind)]
    if isinstance(transform, ComposeTransform):
        return _stages(list(transform.parts), direction, context, bitwise, bind)
    if isinstance(transform, _InverseTransform):
        return _stages(transform._inv, _flip(direction), context, bitwise, bind)
    if isinstance(transform, ConditionalTransformModule):
        if context is None:
            raise ValueError(f"{type(transform).__name__} is conditional: pass a context")
        transform = transform.condition(context)
    if isinstance(transform, _SOLVED) and direction == "inverse":
        return [PyroARBlock(transform, bitwise=bitwise, context=bind if _network(transform).context_dim else None)]
    if not isinstance(transform, Transform):
        raise TypeError(f"{type(transform).__name__} is not a torch or pyro Transform; {_SUPPORTED}")
    if direction == "inverse" and not isinstance(transform, _SOLVED) and isinstance(transform, nn.Module) and any(
            isinstance(m, (AutoRegressiveNN, ConditionalAutoRegressiveNN)) for m in transform.modules()):
        raise TypeError(f"{type(transform).__name__} is autoregressive but not one whose inverse can be solved; "
                        f"{_SUPPORTED}")
    return [_Step(transform, direction)]


def _distribution(target: Any, context: Any) -> TransformedDistribution:
    """`target`, conditioned on `context` if it is a `ConditionalTransformedDistribution`."""
    if isinstance(target, ConditionalTransformedDistribution):
        if context is None:
            raise ValueError("a ConditionalTransformedDistribution needs a context")
        return target.condition(context)
    if isinstance(target, TransformedDistribution):
        return target
    raise TypeError(f"expected a (Conditional)TransformedDistribution; got {type(target).__name__}")


def _leaf(stage: Any) -> tuple[int, int, int]:
    """`(sign, domain, codomain)` of the transform a stage inverts: its log|det| enters `log_prob` with `sign`."""
    if isinstance(stage, PyroARBlock) or stage.direction == "inverse":
        t = stage.flow_transform if isinstance(stage, PyroARBlock) else stage.transform
        return 1, t.domain.event_dim, t.codomain.event_dim
    return -1, stage.transform.codomain.event_dim, stage.transform.domain.event_dim  # an inverted transform


def _cond(context: Any, batch: Sequence[int]) -> Any:
    """A context row for every sample of batch shape `batch`, flattened: `(prod(batch), C)`, as pyro broadcasts it."""
    return None if context is None else context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])


def wrap(transform: Any, context: Tensor | None = None, *, direction: str = "inverse", bitwise: bool = True) -> Flow:
    """pyro transforms run in `direction` as an [`arflow_solvers.Flow`][arflow_solvers.Flow].

    `direction="inverse"` is `transform.inv` (what `log_prob` runs, data to noise);
    `"forward"` is `transform(x)` (what `sample` runs), where the inverses of
    autoregressive transforms (`t.inv` in a flow's list) are the loops solved. The flow
    takes `(B, F)` (or `(B, F, 1)`) and returns `(B, F)`.

    Arguments:
        transform: a transform, a `ComposeTransform` or a list (in pyro's forward order), or
            a `TransformedDistribution` / `ConditionalTransformedDistribution` (its transforms).
        context: `(C,)`: one context for every sample of a conditional flow, or `None`.
        direction: `"inverse"` or `"forward"`.
        bitwise: evaluate the networks as pyro does (`True`) or packed (`False`).

    Examples:
        >>> import torch
        >>> from pyro.distributions.transforms import affine_autoregressive
        >>> from arflow_solvers import Jacobi, solve_inverse
        >>> _ = torch.manual_seed(0)
        >>> iaf = affine_autoregressive(5, hidden_dims=[20])
        >>> y = torch.randn(8, 5)
        >>> bool(torch.equal(solve_inverse(wrap(iaf), y, Jacobi(tol=0.0)), iaf.inv(y)))
        True
    """
    if direction not in ("inverse", "forward"):
        raise ValueError(f"direction must be 'inverse' or 'forward'; got {direction!r}")
    if context is not None and (not isinstance(context, Tensor) or context.dim() != 1):
        raise ValueError("context must be None or one context vector of shape (C,); for one context per sample "
                         f"use inverse, log_prob or sample; got {tuple(getattr(context, 'shape', ()))}")
    if isinstance(transform, (TransformedDistribution, ConditionalTransformedDistribution)):
        transform = list(_distribution(transform, context).transforms)
    items = _stages(transform, direction, context, bitwise, bind=context)
    blocks = [item for item in items if isinstance(item, PyroARBlock)]
    if not blocks:
        raise TypeError(f"no autoregressive inverse to solve in direction {direction!r}; run it with pyro")
    return Flow(sampling_steps(items, blocks[0].seq_len))


def inverse(transform: Any, y: Tensor, plan: Any, context: Tensor | None = None, *, bitwise: bool = True,
            return_solution: bool = False, throw: bool = True) -> Any:
    """`transform.inv(y)` (or `transform.condition(context).inv(y)`), the loops solved by `plan`.

    Arguments:
        transform: as for [`wrap`][arflow_solvers.adapters.pyro.wrap] (not a distribution).
        y: `(*, F)` values.
        plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver.
        context: the context of conditional transforms, `(C,)` or `(*, C)`, or `None`.
        bitwise: `False` evaluates the networks packed.
        return_solution: also return the [`Solution`][arflow_solvers.Solution].
        throw: raise if some sample is not finite.
    """
    batch = y.shape[:-1] if context is None else torch.broadcast_shapes(y.shape[:-1], context.shape[:-1])
    flat, cond = y.expand(*batch, y.shape[-1]).reshape(-1, y.shape[-1]), _cond(context, batch)
    x, _, solution = run_stages(_stages(transform, "inverse", cond, bitwise), flat, plan, cond, throw)
    x = x.reshape(*batch, y.shape[-1])
    return (x, solution) if return_solution else x


def log_prob(distribution: Any, y: Tensor, plan: Any, context: Tensor | None = None, *, bitwise: bool = True,
             return_solution: bool = False, throw: bool = True) -> Any:
    """`distribution.log_prob(y)` (conditioned on `context` if it is conditional), the loops solved by `plan`.

    The log-determinants are those pyro computes, from the fixed point of each inverse.

    Arguments:
        distribution: a `TransformedDistribution` or `ConditionalTransformedDistribution`.
        y: `(B, F)` data.
        plan: a plan, a solver or plan notation, as for
            [`inverse`][arflow_solvers.adapters.pyro.inverse].
        context: `(B, C)` or `(C,)` context of a conditional distribution, else `None`.
        bitwise: compute each update as pyro does (`True`) or on packed products.
        return_solution: also return the [`Solution`][arflow_solvers.Solution].
        throw: raise if some sample is not finite.
    """
    cond = _cond(context, y.shape[:-1])
    conditioned = _distribution(distribution, cond)
    stages = _stages(list(conditioned.transforms), "inverse", None, bitwise)
    x, log_dets, solution = run_stages(stages, y, plan, cond, throw)
    event_dim, total = len(conditioned.event_shape), 0.0
    for stage, log_det in zip(stages, log_dets):  # torch's TransformedDistribution.log_prob, stage by stage
        sign, domain, codomain = _leaf(stage)
        event_dim += domain - codomain
        total = total - _sum_rightmost(log_det if sign > 0 else -log_det, event_dim - domain)
    with torch.no_grad():
        base = conditioned.base_dist
        total = total + _sum_rightmost(base.log_prob(x), event_dim - len(base.event_shape))
    return (total, solution) if return_solution else total


def sample(distribution: Any, shape: Sequence[int] | int, plan: Any, context: Tensor | None = None, *,
           bitwise: bool = True, return_solution: bool = False, throw: bool = True) -> Any:
    """`distribution.sample(shape)`, with the inverses of autoregressive transforms (`t.inv`) solved by `plan`.

    Draws the noise from the base distribution as pyro does (the same seed gives the same noise).
    """
    shape = Size((shape,) if isinstance(shape, int) else shape)
    with torch.no_grad():
        z = _distribution(distribution, context).base_dist.sample(shape)
    flat, cond = z.reshape(-1, z.shape[-1]), _cond(context, z.shape[:-1])
    stages = _stages(list(_distribution(distribution, cond).transforms), "forward", None, bitwise)
    x, _, solution = run_stages(stages, flat, plan, cond, throw)
    x = x.reshape(z.shape)
    return (x, solution) if return_solution else x
