"""zuko flows as solver-ready flows: masked autoregressive transforms solved by Jacobi, the rest by zuko.

zuko samples a flow by `flow(c).sample(shape)`, which inverts each
`MaskedAutoregressiveTransform` by `passes` sweeps `x <- meta(x).inv(y)` from `x = 0` (one
network pass per feature for a fully autoregressive transform). Here each such transform is
a block of the shared masked layer
([`MaskedARBlock`][arflow_solvers.adapters._masked.MaskedARBlock]) whose `inverse_map` is
that very sweep, so any plan's fixed point is zuko's answer; every other lazy transform
(permutations, element-wise transforms, coupling layers, inverses) is applied by zuko.

**Exact mode.** `Jacobi(tol=0.0)` (any initial guess; the solvers then keep the batch shape
fixed) returns zuko's result bit for bit: the sweep runs zuko's own operations on zuko's own
layout, and masked products only add exact zeros. The solve stops as soon as the iterate no
longer changes, typically far fewer passes than zuko's `passes`.

**Tolerance mode.** `Jacobi(tol=1e-6)` and any other plan stop each sample on its own and
drop converged samples; `bitwise=False` also evaluates the networks packed (degree-sorted,
block-triangular products). Both agree with zuko to the tolerance or float rounding.

Supported: any zuko flow whose autoregressive transforms are `MaskedAutoregressiveTransform`
(MAF, NSF, NAF, UNAF, SOSPF, BPF, ...: any univariate transformation, through its own `inv`),
with or without context, any `order`, `passes < features` (grouped orders: features of one
group do not read each other) and `adjacency` graphs, nested in `LazyComposedTransform`s.

References:
    Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
    https://arxiv.org/abs/1705.07057

    Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032

    Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
    https://arxiv.org/abs/2505.12849
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Size, Tensor, nn

from arflow_solvers import Flow, solve

try:
    from zuko.flows.autoregressive import MaskedAutoregressiveTransform
    from zuko.lazy import Flow as ZukoFlow
    from zuko.lazy import LazyComposedTransform, LazyInverse, LazyTransform
    from zuko.nn import MaskedLinear, MaskedMLP, Residual
    from zuko.transforms import MonotonicAffineTransform
    from zuko.utils import unpack
except ImportError as error:  # pragma: no cover - exercised only without zuko
    raise ImportError("arflow_solvers.adapters.zuko needs zuko: pip install 'arflow-solvers[zuko]'") from error

from ._masked import (AddPopped, Masked, MaskedAffineBlock, MaskedARBlock, MaskedNetwork, Push,
                      check_sampleable, pointwise, sampling_steps)
from ._masked.linearise import TailPartials

__all__ = ["ZukoARBlock", "ZukoAffineBlock", "ZukoStep", "ar_block", "inverse", "rsample", "rsample_and_log_prob",
           "sample", "wrap"]

_SUPPORTED = ("arflow_solvers.adapters.zuko solves zuko's MaskedAutoregressiveTransform (any univariate, "
              "order, passes, adjacency or context) and applies every other lazy transform as zuko does")


def _read_mlp(hyper: nn.Module, name: str) -> list:
    """zuko's `MaskedMLP` (an `nn.Sequential`) as ops, in its order."""
    ops: list = []
    for module in hyper:
        if isinstance(module, MaskedLinear):
            ops.append(Masked(module))
        elif isinstance(module, Residual):
            ops += [Push(), *_read_mlp(module, name), AddPopped()]
        elif isinstance(module, nn.Dropout):
            continue  # the identity in eval mode; training mode is refused per solve
        else:
            ops.append(pointwise(module, name))
    return ops


class ZukoARBlock(MaskedARBlock):
    r"""zuko's `MaskedAutoregressiveTransform` as a [`CausalMapBlock`][arflow_solvers.CausalMapBlock].

    `inverse_map` is one sweep of zuko's inverse, `meta(x).inv(z)`: the hyper-network
    (`MaskedMLP`) evaluated as zuko evaluates it (or packed, `bitwise=False`), its output
    unpacked by zuko and inverted by the transform's own univariate `inv`. The core's
    `(B, T, 1)` holds the features in the autoregressive order the masks imply
    (`self.order`); [`wrap`][arflow_solvers.adapters.zuko.wrap] permutes around the block.

    Arguments:
        transform: a `MaskedAutoregressiveTransform`.
        bitwise: evaluate its network as zuko does (`True`) or packed (`False`).
        context: `(C,)`: one context for every sample, or `None` (then pass `cond`, `(B, C)`,
            to the solver for a conditional transform).

    Examples:
        >>> import torch, zuko
        >>> from arflow_solvers import Jacobi, solve_inverse
        >>> _ = torch.manual_seed(0)
        >>> t = zuko.flows.MaskedAutoregressiveTransform(4, order=torch.tensor([3, 1, 2, 0]))
        >>> block = ZukoARBlock(t)
        >>> block.order.tolist()  # the masks' autoregressive order
        [3, 1, 2, 0]
        >>> z = torch.randn(5, 4)
        >>> x = solve_inverse(block, z[:, block.order].unsqueeze(-1), Jacobi(tol=0.0))
        >>> bool(torch.equal(x.squeeze(-1)[:, torch.argsort(block.order)], t().inv(z)))
        True
    """

    univariate_reads_any_features = True  # zuko's parameters are feature-major: (B, F * total)

    def __init__(self, transform: MaskedAutoregressiveTransform, *, bitwise: bool = True,
                 context: Tensor | None = None):
        _check_transform(transform)
        self.total = transform.total
        super().__init__(transform, bitwise=bitwise, context=context)

    def read_network(self, transform: MaskedAutoregressiveTransform) -> MaskedNetwork:
        hyper = transform.hyper
        if type(hyper) is not MaskedMLP:
            raise TypeError(f"{self.name}'s hyper-network is a {type(hyper).__name__}, not zuko's MaskedMLP; "
                            f"{_SUPPORTED}")
        features = hyper.out_features // transform.total
        rows = torch.arange(features * transform.total, device=_device(hyper)).view(features, transform.total)
        context = "append" if hyper.in_features > features else None
        return MaskedNetwork(features, tuple(_read_mlp(hyper, self.name)), rows, context=context)

    def univariate_inverse(self, params: Tensor, z: Tensor) -> Tensor:
        """`univariate(*unpack(params)).inv(z)`, as zuko's `meta(x).inv(z)` computes it."""
        return self._univariate(params).inv(z)

    def univariate_log_det(self, params: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """Minus zuko's `log |dz/dx|` of the univariate transformation."""
        return -self._univariate(params).log_abs_det_jacobian(x, z).sum(1)

    def univariate_inverse_and_log_det(self, params: Tensor, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        univariate = self._univariate(params)
        return univariate.inv(z), -univariate.log_abs_det_jacobian(x, z).sum(1)

    def _univariate(self, params: Tensor) -> Any:
        # zuko's unpack gives views strided by `total`; elementwise kernels run several times
        # faster on contiguous copies, with the same values
        phi = unpack(params.unflatten(-1, (-1, self.total)), self.transform.shapes)
        return self.transform.univariate(*(p.contiguous() for p in phi))


class ZukoAffineBlock(ZukoARBlock, MaskedAffineBlock):
    r"""A MAF transform of zuko (univariate `MonotonicAffineTransform`), also affine for the metrics.

    zuko's density direction is $y = e^{a} x + b$ with $a$ the softclipped raw scale; the
    inverse is $x = (y - b) e^{-a}$, so $\mu = -b e^{-a}$ and $\log\sigma = -a$, which
    `affine` returns for the IGM and `output_projection` reads for the CRM. The solvers
    iterate `inverse_map`, computed as zuko computes it.
    """

    shift_scale = (0, 1)  # zuko's MonotonicAffineTransform(shift, scale)

    def __init__(self, transform: MaskedAutoregressiveTransform, **options: Any):
        super().__init__(transform, **options)
        self._slope = _slope(transform.univariate)  # None: built some other way, zuko's own code only

    def univariate_affine(self, params: Tensor) -> tuple[Tensor, Tensor]:
        univariate = self._univariate(params)
        return -univariate.shift / univariate.scale, -univariate.log_scale

    def univariate_partials(self, grouped: Tensor, z: Tensor, x: Tensor, with_log_det: bool) -> TailPartials | None:
        r"""The partials of $x = (z - b) e^{-a}$, $a = s / (1 + |s / \log \mathrm{slope}|)$, in closed form.

        $\partial x/\partial z = e^{-a}$, $\partial x/\partial b = -e^{-a}$,
        $\partial x/\partial s = -x\, a'(s)$ with $a'(s) = (1 + |s / \log \mathrm{slope}|)^{-2}$;
        the log-determinant $-\sum a$ has $-a'(s)$. `None` for an affine transform whose
        `slope` is not known (autograd reads its partials).
        """
        if self._slope is None:
            return None
        shift, scale = grouped.unbind(1)
        softness = 1 + (scale / math.log(self._slope)).abs()
        log_scale = scale / softness
        dz = torch.exp(-log_scale)
        slope = softness.square().reciprocal()  # a'(s)
        new = (z - shift) * dz
        partials = TailPartials(torch.stack([-dz, -new * slope], 1), dz)
        if with_log_det:
            partials.log_det = -log_scale.sum(1)
            partials.dl_dp = torch.stack([torch.zeros_like(slope), -slope], 1)
        return partials

    def offers_grouped_inverse(self) -> bool:
        return self._slope is not None

    def grouped_inverse(self, grouped: Tensor, z: Tensor) -> Tensor:
        """zuko's `(z - shift) / exp(log_scale)` on contiguous shift and scale rows, its operations in its order."""
        shift, scale = grouped.unbind(1)
        log_scale = torch.div(scale, math.log(self._slope)).abs_().add_(1)  # 1 + abs(scale / log(slope))
        torch.div(scale, log_scale, out=log_scale)
        return torch.sub(z, shift).div_(log_scale.exp_())


_DEFAULT_SLOPE = inspect.signature(MonotonicAffineTransform).parameters["slope"].default


def _slope(univariate: Any) -> float | None:
    """The `slope` a `MonotonicAffineTransform` (or a partial of it by keywords) is built with, else `None`."""
    keywords: dict = {}
    while isinstance(univariate, functools.partial):
        if univariate.args:
            return None
        keywords = {**univariate.keywords, **keywords}
        univariate = univariate.func
    if univariate is not MonotonicAffineTransform or set(keywords) - {"slope"}:
        return None
    return float(keywords.get("slope", _DEFAULT_SLOPE))


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.buffers()), next(iter(module.parameters()), torch.empty(0))).device


def _check_transform(transform: Any) -> None:
    if not isinstance(transform, MaskedAutoregressiveTransform):
        raise TypeError(f"transform must be zuko's MaskedAutoregressiveTransform; got {type(transform).__name__}")
    kind = type(transform)
    if kind.forward is not MaskedAutoregressiveTransform.forward or kind.meta is not MaskedAutoregressiveTransform.meta:
        raise TypeError(f"{kind.__name__} overrides zuko's forward or meta, so its inverse is not the sweep "
                        f"the solvers iterate; {_SUPPORTED}")


def _is_affine(univariate: Any) -> bool:
    while isinstance(univariate, functools.partial):
        univariate = univariate.func
    return univariate is MonotonicAffineTransform


def ar_block(transform: MaskedAutoregressiveTransform, *, bitwise: bool = True,
             context: Tensor | None = None) -> ZukoARBlock:
    """The block for one transform: affine (with metrics) for MAF's univariate, a causal map otherwise."""
    _check_transform(transform)
    kind = ZukoAffineBlock if _is_affine(transform.univariate) else ZukoARBlock
    return kind(transform, bitwise=bitwise, context=context)


class ZukoStep:
    """A lazy transform that is not masked autoregressive, inverted by zuko: `transform(c).inv(x)`.

    Arguments:
        transform: the lazy transform.
        context: the context bound by `wrap`, used when the solver passes no `cond`.
    """

    def __init__(self, transform: LazyTransform, context: Tensor | None = None):
        self.transform, self.context = transform, context
        self.__name__ = f"{type(transform).__name__}.inv"

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        check_sampleable(self.transform)
        return self.transform(self.context if cond is None else cond).inv(x)

    def with_log_det(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """zuko's `transform(c).inv.call_and_ladj(x)`."""
        check_sampleable(self.transform)
        return self.transform(self.context if cond is None else cond).inv.call_and_ladj(x)

    def __repr__(self) -> str:
        return f"ZukoStep({type(self.transform).__name__})"


def _leaves(transform: LazyTransform) -> list[LazyTransform]:
    """The lazy transforms of nested `LazyComposedTransform`s, in density (data to noise) order."""
    if isinstance(transform, LazyComposedTransform):
        return [leaf for child in transform.transforms for leaf in _leaves(child)]
    return [transform]


def _item(transform: LazyTransform, bitwise: bool, context: Tensor | None) -> Any:
    if isinstance(transform, MaskedAutoregressiveTransform):
        return ar_block(transform, bitwise=bitwise, context=context)
    if not isinstance(transform, LazyTransform):
        raise TypeError(f"{type(transform).__name__} is not a zuko LazyTransform; {_SUPPORTED}")
    parallel = isinstance(transform, LazyInverse) and isinstance(transform.transform, MaskedAutoregressiveTransform)
    if not parallel and any(isinstance(m, MaskedAutoregressiveTransform) for m in transform.modules()):
        raise TypeError(f"{type(transform).__name__} contains a MaskedAutoregressiveTransform that is not a "
                        f"member of the flow's transform list; {_SUPPORTED}")
    return ZukoStep(transform, context)


def wrap(flow: Any, context: Tensor | None = None, *, bitwise: bool = True) -> Flow:
    """A zuko `Flow` (or lazy transform) as an [`arflow_solvers.Flow`][arflow_solvers.Flow].

    The lazy transforms (nested `LazyComposedTransform`s flattened) are reversed into sampling
    order; each `MaskedAutoregressiveTransform` becomes a block the plan's solver inverts
    (block 0 is the *last* one of zuko's list), every other one is inverted by zuko. The flow
    takes zuko's `(B, F)` noise (or the core's `(B, F, 1)`) and returns `(B, F)`:
    `solve_inverse(wrap(flow, c), z, plan)` is `flow(c).transform.inv(z)`.

    Arguments:
        flow: a `zuko.flows.Flow` (its `transform` is wrapped) or a `LazyTransform`.
        context: one context `(C,)` for every sample, or `None`. For one context per sample
            pass `cond=c` (`(B, C)`) to the solver instead, or use
            [`sample`][arflow_solvers.adapters.zuko.sample] / [`inverse`][arflow_solvers.adapters.zuko.inverse].
        bitwise: evaluate the networks as zuko does (`True`) or packed (`False`).

    Raises:
        TypeError: `flow` is neither, or holds an autoregressive transform that cannot be
            solved; the message names its class and says what is supported.
        ValueError: `context` is not one vector.

    Examples:
        >>> import torch, zuko
        >>> from arflow_solvers import Jacobi, solve_inverse
        >>> _ = torch.manual_seed(0)
        >>> nsf = zuko.flows.NSF(3, context=2, transforms=2)
        >>> c, z = torch.randn(2), torch.randn(6, 3)
        >>> flow = wrap(nsf, c)
        >>> flow
        Flow(
              to_sequence(permuted)
          [0] ZukoARBlock(seq_len=3)
              Permute
          [1] ZukoARBlock(seq_len=3)
              to_features
        )
        >>> bool(torch.equal(solve_inverse(flow, z, Jacobi(tol=0.0)), nsf(c).transform.inv(z)))
        True
    """
    transform = flow.transform if isinstance(flow, ZukoFlow) else flow
    if not isinstance(transform, LazyTransform):
        raise TypeError(f"flow must be a zuko Flow or LazyTransform; got {type(flow).__name__}")
    items = [_item(leaf, bitwise, context) for leaf in reversed(_leaves(transform))]
    blocks = [item for item in items if isinstance(item, ZukoARBlock)]
    if not blocks:
        raise TypeError(f"{type(flow).__name__} has no MaskedAutoregressiveTransform to solve; sample it with "
                        "zuko directly")
    return Flow(sampling_steps(items, blocks[0].seq_len))


def inverse(flow: Any, z: Tensor, plan: Any, context: Tensor | None = None, *, bitwise: bool = True,
            return_solution: bool = False, throw: bool = True) -> Any:
    """`flow(context).transform.inv(z)` for any batch shape, with the autoregressive inverses solved by `plan`.

    `z` (`(*, F)`) and `context` (`(*, C)`) broadcast against each other as zuko broadcasts
    them; the samples are flattened into one batch, solved with one context row each, and
    reshaped back. Runs under `torch.no_grad()`; [`rsample`][arflow_solvers.adapters.zuko.rsample]
    differentiates.

    Arguments:
        flow: a zuko `Flow` or lazy transform.
        z: `(*, F)` noise.
        plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver (`Jacobi(tol=0.0)`
            reproduces zuko bit for bit).
        context: `(*, C)` context or `None`.
        bitwise: `False` evaluates the networks packed.
        return_solution: also return the [`Solution`][arflow_solvers.Solution].
        throw: raise if some sample is not finite (see [`solve`][arflow_solvers.solve]).

    Returns:
        `(*, F)` data (the broadcast batch shape), or `(x, solution)`.
    """
    with torch.no_grad():
        x, solution = _solve_broadcast(flow, z, plan, context, bitwise=bitwise, throw=throw)
    return (x, solution) if return_solution else x


def _solve_broadcast(flow: Any, z: Tensor, plan: Any, context: Tensor | None, **options: Any) -> tuple[Tensor, Any]:
    """`solve` over the broadcast batch of `z` (`(*, F)`) and `context` (`(*, C)`); `x` has that batch shape."""
    if not isinstance(z, Tensor) or z.dim() < 1:
        raise ValueError(f"z must be a tensor of shape (*, F); got {getattr(z, 'shape', type(z).__name__)}")
    features = z.shape[-1]
    if context is None:
        batch, cond = z.shape[:-1], None
    else:
        batch = torch.broadcast_shapes(z.shape[:-1], context.shape[:-1])
        cond = context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])
    flat = z.expand(*batch, features).reshape(-1, features)
    bitwise = options.pop("bitwise")
    solution = solve(wrap(flow, bitwise=bitwise), flat, plan, cond=cond, **options)
    return solution.x.reshape(*batch, features), solution


def sample(flow: ZukoFlow, shape: Sequence[int] | int, plan: Any, context: Tensor | None = None, *,
           bitwise: bool = True, return_solution: bool = False, throw: bool = True) -> Any:
    """`flow(context).sample(shape)`, with the autoregressive inverses solved by `plan`.

    Draws the noise from `flow(context).base` as zuko does (the same seed gives the same
    noise), so with the exact plan `Jacobi(tol=0.0)` the samples equal zuko's bit for bit.

    Arguments:
        flow: the zuko `Flow`.
        shape: the sample shape (zuko's `sample_shape`); an int `n` means `(n,)`.
        plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver
            (`Jacobi(tol=0.0)`: the exact mode).
        context: the context, `(C,)` or `(*, C)` as zuko takes it, or `None`.
        bitwise: `False` evaluates the networks packed.
        return_solution: also return the [`Solution`][arflow_solvers.Solution].
        throw: raise if some sample is not finite.

    Returns:
        `shape + batch_shape + (F,)` samples, or `(samples, solution)`.

    Examples:
        >>> import torch, zuko
        >>> from arflow_solvers import Jacobi
        >>> _ = torch.manual_seed(0)
        >>> maf = zuko.flows.MAF(5, context=2, transforms=3)
        >>> c = torch.randn(2)
        >>> _ = torch.manual_seed(1)
        >>> ours = sample(maf, (64,), Jacobi(tol=0.0), c)
        >>> _ = torch.manual_seed(1)
        >>> bool(torch.equal(ours, maf(c).sample((64,))))
        True
    """
    if not isinstance(flow, ZukoFlow):
        raise TypeError(f"flow must be a zuko Flow; got {type(flow).__name__}")
    shape = Size((shape,) if isinstance(shape, int) else shape)
    with torch.no_grad():
        base = flow(context).base
        z = base.rsample(shape) if base.has_rsample else base.sample(shape)
    return inverse(flow, z, plan, context, bitwise=bitwise, return_solution=return_solution, throw=throw)


def rsample(flow: ZukoFlow, shape: Sequence[int] | int, plan: Any, context: Tensor | None = None, *,
            bitwise: bool = True, adjoint_tol: float = 0.0, return_solution: bool = False,
            throw: bool = True) -> Any:
    """`flow(context).rsample(shape)`: samples differentiable w.r.t. the flow's parameters and the context.

    Each autoregressive inverse is solved by `plan` and differentiated by its implicit adjoint
    (see [`arflow_solvers.adjoint`][arflow_solvers.adjoint]) instead of through zuko's
    `passes` network calls: memory of one network evaluation per transform, whatever the
    number of features. Gradients equal those through zuko's loop to float rounding.

    Arguments:
        flow: the zuko `Flow`.
        shape: the sample shape; an int `n` means `(n,)`.
        plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver.
        context: the context, `(C,)` or `(*, C)`, or `None`.
        bitwise: `False` evaluates the networks packed in the forward solves.
        adjoint_tol: relative tolerance of the backward solves (`0`: to their exactness bound).
        return_solution: also return the [`Solution`][arflow_solvers.Solution] (its
            `adjoint` statistics fill in when backward runs).
        throw: raise if some sample is not finite.

    Returns:
        `shape + batch_shape + (F,)` samples, or `(samples, solution)`.

    Examples:
        >>> import torch, zuko
        >>> from arflow_solvers import Jacobi
        >>> _ = torch.manual_seed(0)
        >>> maf = zuko.flows.MAF(4, transforms=2)
        >>> x = rsample(maf, (16,), Jacobi(tol=0.0))
        >>> loss = x.square().mean()
        >>> loss.backward()  # gradients for every parameter of maf
        >>> all(p.grad is not None for p in maf.parameters())
        True
    """
    x, _, solution = _reparameterised(flow, shape, plan, context, bitwise, adjoint_tol, throw, False)
    return (x, solution) if return_solution else x


def rsample_and_log_prob(flow: ZukoFlow, shape: Sequence[int] | int, plan: Any,
                         context: Tensor | None = None, *, bitwise: bool = True, adjoint_tol: float = 0.0,
                         return_solution: bool = False, throw: bool = True) -> Any:
    """`flow(context).rsample_and_log_prob(shape)`: samples and their log-density, both differentiable.

    The log-density is the base's log-density of the noise minus each step's
    log-determinant at the solution (one more network evaluation per transform); the
    variational-inference loss `log_prob - log p(x)` differentiates through both. Arguments
    as for [`rsample`][arflow_solvers.adapters.zuko.rsample].

    Returns:
        `(samples, log_prob)` with shapes `shape + batch_shape + (F,)` and
        `shape + batch_shape`, or `(samples, log_prob, solution)`.
    """
    x, log_prob, solution = _reparameterised(flow, shape, plan, context, bitwise, adjoint_tol, throw, True)
    return (x, log_prob, solution) if return_solution else (x, log_prob)


def _reparameterised(flow: ZukoFlow, shape: Sequence[int] | int, plan: Any, context: Tensor | None,
                     bitwise: bool, adjoint_tol: float, throw: bool, with_log_prob: bool) -> tuple:
    if not isinstance(flow, ZukoFlow):
        raise TypeError(f"flow must be a zuko Flow; got {type(flow).__name__}")
    base = flow(context).base
    if not base.has_rsample:
        raise ValueError(f"the base distribution {type(base).__name__} of this flow has no rsample, so its "
                         "samples cannot be reparameterised")
    z = base.rsample(Size((shape,) if isinstance(shape, int) else shape))
    x, solution = _solve_broadcast(flow, z, plan, context, bitwise=bitwise, throw=throw,
                                   adjoint_tol=adjoint_tol, log_prob=with_log_prob)
    if not with_log_prob:
        return x, None, solution
    batch = x.shape[:-1]
    return x, base.log_prob(z).expand(batch) - solution.log_det.reshape(batch), solution
