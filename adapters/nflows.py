"""nflows flows as solver-ready flows: MAF blocks solved by Jacobi, everything else by nflows."""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from arflow_solvers import Flow, solve

from ._packed import PackedLinear, degree_order

try:
    from nflows.flows.base import Flow as NflowsFlow
    from nflows.transforms.autoregressive import (
        AutoregressiveTransform,
        MaskedAffineAutoregressiveTransform,
    )
    from nflows.transforms.base import CompositeTransform, InverseTransform, Transform
    from nflows.transforms.made import MADE, MaskedFeedforwardBlock, MaskedLinear, MaskedResidualBlock
    from nflows.transforms.normalization import BatchNorm
except ImportError as error:  # pragma: no cover - exercised only without nflows
    raise ImportError(
        "arflow_solvers.adapters.nflows needs nflows: pip install 'arflow-solvers[nflows]'"
    ) from error

__all__ = ["NflowsARBlock", "NflowsAffineBlock", "NflowsStep", "wrap", "sample", "ar_block", "build_maf",
           "load_for_planning"]


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


_PRODUCTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""layer -> (weight versions, `weight * mask`), shared by every wrap of the layer."""

_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""transform -> (weight versions, packed MADE), so that every wrap of a transform shares one packing."""


def _version_key(module: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `module` is replaced or updated in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                 for t in (*module.parameters(), *module.buffers()))


def _kept(store: weakref.WeakKeyDictionary, module: torch.nn.Module, build: Any) -> Any:
    """`build()`, computed once per version of `module`'s weights and kept in `store`."""
    key = _version_key(module)
    stored = store.get(module)
    if stored is None or stored[0] != key:
        with torch.no_grad():
            stored = (key, build())
        store[module] = stored
    return stored[1]


class _MaskedWeights:
    """`weight * mask` of every nflows `MaskedLinear` in a network, computed once per weight.

    nflows' `MaskedLinear.forward` is `F.linear(x, weight * mask, bias)`: it re-multiplies
    the mask on every call, which costs about as much memory traffic as the matrix product
    at small batches (twice the layer's time at batch 1). `applied()` makes the layers use
    the stored products instead: the same tensors nflows would compute, so the outputs are
    bit for bit the same. A product is recomputed when its weight or mask changes (in-place
    updates bump the tensor's version) and is only used without autograd.
    """

    def __init__(self, net: torch.nn.Module):
        self.layers = [m for m in net.modules() if isinstance(m, MaskedLinear)]

    @staticmethod
    def _product(layer: MaskedLinear) -> Tensor:
        return _kept(_PRODUCTS, layer, lambda: layer.weight * layer.mask)

    @contextmanager
    def applied(self) -> Iterator[None]:
        if torch.is_grad_enabled() or not self.layers:
            yield
            return
        for layer in self.layers:
            layer.forward = _fixed_linear(self._product(layer), layer.bias)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward


def _fixed_linear(weight: Tensor, bias: Tensor | None) -> Any:
    return lambda x: F.linear(x, weight, bias)


class _PackedMADE:
    """nflows' MADE for MAF's affine inverse, with the masked zeros skipped (see `arflow_solvers.adapters._packed`).

    Computes `(z - shift) / scale` like nflows, from the same weights, on feature-major
    activations: equal to nflows' result to float rounding (the sums run in another
    order), at about 0.42 of the cost of nflows' pass for the MNIST MAF of the docs.
    """

    def __init__(self, transform: MaskedAffineAutoregressiveTransform):
        net = transform.autoregressive_net
        _check_packable(transform, net)
        self.net = net
        self.epsilon = transform._epsilon
        features = net.initial_layer.in_features
        order = degree_order(net.initial_layer.degrees)  # hidden units; inputs are 1..D already
        self.order = order
        self.initial = _pack(net.initial_layer, order, torch.arange(features, device=order.device))
        self.blocks: list[tuple[torch.nn.Module, PackedLinear, PackedLinear | None]] = []
        for block in net.blocks:
            if isinstance(block, MaskedResidualBlock):  # keeps the degrees of its input
                self.blocks.append((block, _pack(block.linear_layers[0], order, order),
                                    _pack(block.linear_layers[1], order, order)))
            else:
                rows = degree_order(block.linear.degrees)
                self.blocks.append((block, _pack(block.linear, rows, order), None))
                order = rows
        # Outputs are interleaved (u_1, b_1, u_2, ...) with degrees 1..D: already sorted.
        final, outputs = net.final_layer, torch.arange(features, device=order.device)
        self.scale = PackedLinear.pack(final.weight[0::2], final.mask[0::2], final.bias[0::2], outputs, order)
        self.shift = PackedLinear.pack(final.weight[1::2], final.mask[1::2], final.bias[1::2], outputs, order)

    def inverse_map(self, x: Tensor, z: Tensor, context: Tensor | None) -> Tensor:
        """`(B, D)` iterate and noise to nflows' update `(z - shift) / scale`, `(B, D)`."""
        net, order = self.net, self.order
        h = self.initial(x.T.contiguous())
        if context is not None:
            h += net.activation(net.context_layer(context))[:, order].T
        if not net.use_residual_blocks:
            h = net.activation(h)
        for block, first, second in self.blocks:
            if second is None:  # feed-forward block: act(linear(h))
                h = block.activation(first(h))
                continue
            temps = first(block.activation(h))
            if context is not None:
                temps += block.context_layer(context)[:, order].T
            h = h + second(block.activation(temps))
        scale = F.softplus(self.scale(h)).add_(self.epsilon)
        return ((z.T - self.shift(h)) / scale).T


def _pack(layer: MaskedLinear, rows: Tensor, cols: Tensor) -> PackedLinear:
    return PackedLinear.pack(layer.weight, layer.mask, layer.bias, rows, cols)


def _check_packable(transform: Transform, net: torch.nn.Module) -> None:
    """Raise `ValueError` naming what keeps `transform`'s network from being packed."""
    name = type(transform).__name__
    if type(net) is not MADE:
        raise ValueError(f"bitwise=False needs nflows' MADE in {name}; got {type(net).__name__}")
    for block in net.blocks:
        if type(block) not in (MaskedResidualBlock, MaskedFeedforwardBlock):
            raise ValueError(f"bitwise=False cannot pack a {type(block).__name__} in {name}'s MADE")
        if getattr(block, "batch_norm", None) is not None or getattr(block, "use_batch_norm", False):
            raise ValueError(f"bitwise=False cannot pack batch norm inside {name}'s MADE")
        if block.training and block.dropout.p > 0:
            raise ValueError(f"{name}'s MADE uses dropout in training mode; call flow.eval() first")


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
        self._masked = _MaskedWeights(transform.autoregressive_net)

    def _net(self, x: Tensor, cond: Any) -> Tensor:
        """The MADE's outputs for `(B, T, 1)` inputs, with the masked weights computed once."""
        with self._masked.applied():
            return self.transform.autoregressive_net(_flat(x, self.seq_len), cond)

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
    same function at about 0.42 of the cost of nflows' pass on the MNIST MAF of the docs,
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
        if not bitwise:
            _check_packable(transform, transform.autoregressive_net)

    def _packed_made(self) -> _PackedMADE:
        """The transform's packed MADE, shared by every wrap of it, rebuilt when a weight changes."""
        return _kept(_PACKED, self.transform, lambda: _PackedMADE(self.transform))

    def _scale_shift(self, x: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        params = self._net(x, cond)
        unconstrained, shift = self.transform._unconstrained_scale_and_shift(params)
        return F.softplus(unconstrained) + self.transform._epsilon, shift

    def inverse_map(self, x: Tensor, z: Tensor, cond: Any = None) -> Tensor:
        """nflows' inverse sweep, `(z - shift) / scale`, without its unused log-determinant.

        The same operations in the same order as nflows' `_elementwise_inverse`, so the
        same bits; skipping `log(scale)` and its sum saves a fifth of a pass at batch 64.
        """
        flat_z = _flat(z, self.seq_len, "z")
        if not self.bitwise and not torch.is_grad_enabled():
            out = self._packed_made().inverse_map(_flat(x, self.seq_len), flat_z, cond)
            return out.unsqueeze(-1)
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


def _density_order(transform: Transform) -> list[Transform]:
    """The leaves of nested `CompositeTransform`s, in density (data to noise) order."""
    if isinstance(transform, CompositeTransform):
        return [leaf for child in transform._transforms for leaf in _density_order(child)]
    return [transform]


def _contains_ar(transform: Transform) -> bool:
    return any(isinstance(m, AutoregressiveTransform) for m in transform.modules())


def _step(transform: Transform, bitwise: bool) -> Any:
    """The sampling step for one nflows leaf transform."""
    if isinstance(transform, AutoregressiveTransform):
        return ar_block(transform, bitwise=bitwise)
    if isinstance(transform, BatchNorm) and transform.training:
        raise ValueError(
            "nflows BatchNorm has no inverse in training mode; call flow.eval() before wrapping"
        )
    if _contains_ar(transform) and not isinstance(transform, InverseTransform):
        raise TypeError(
            f"{type(transform).__name__} contains an nflows AutoregressiveTransform that is not "
            "a direct member of a CompositeTransform; only those can be solved by Jacobi"
        )
    return NflowsStep(transform)


def wrap(flow_or_transform: Any, *, bitwise: bool = True) -> Flow:
    """An nflows `Flow` or `Transform` as an [`arflow_solvers.Flow`][arflow_solvers.Flow].

    The transform list (nested `CompositeTransform`s flattened) is reversed into sampling
    order: each `AutoregressiveTransform` becomes a block the plan's solver inverts (block 0
    is the *last* AR transform of the nflows definition); every other transform is inverted
    by nflows (`transform.inverse(x, context)`). The flow works on `(B, D, 1)` tensors;
    nflows' `(B, D)` noise `z` maps to `z.unsqueeze(-1)`. Pass the embedded context as
    `cond` (what nflows hands its transforms: `flow._embedding_net(context)`);
    [`sample`][arflow_solvers.adapters.nflows.sample] does that for you.

    Transforms are used as they are (same parameters, same train/eval mode). With
    `bitwise=False` MAF's affine blocks evaluate a packed copy of their MADE that skips the
    masked zeros (see [`NflowsAffineBlock`][arflow_solvers.adapters.nflows.NflowsAffineBlock]): about
    0.42 of the cost of nflows' pass, equal to nflows to float rounding instead of bit for bit.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        https://arxiv.org/abs/1705.07057

        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Arguments:
        flow_or_transform: an `nflows.flows.Flow` (its `_transform` is wrapped) or any
            `nflows.transforms.Transform`.
        bitwise: evaluate MAF's blocks exactly as nflows does (default) or packed.

    Example:
        >>> import torch
        >>> from nflows.distributions import StandardNormal
        >>> from nflows.flows import Flow as NFlow
        >>> from nflows.transforms import (CompositeTransform, ReversePermutation,
        ...     MaskedAffineAutoregressiveTransform as MAT)
        >>> from arflow_solvers import Jacobi, solve_inverse
        >>> _ = torch.manual_seed(0)
        >>> nf = NFlow(CompositeTransform([MAT(4, 8), ReversePermutation(4), MAT(4, 8)]),
        ...            StandardNormal([4]))
        >>> flow = wrap(nf)
        >>> flow
        Flow(
          [0] NflowsAffineBlock(seq_len=4)
              ReversePermutation.inverse
          [1] NflowsAffineBlock(seq_len=4)
        )
        >>> z = torch.randn(3, 4)
        >>> x = solve_inverse(flow, z.unsqueeze(-1), Jacobi(tol=0.0)).squeeze(-1)
        >>> bool(torch.equal(x, nf._transform.inverse(z)[0]))
        True
    """
    if isinstance(flow_or_transform, NflowsFlow):
        transform = flow_or_transform._transform
    elif isinstance(flow_or_transform, Transform):
        transform = flow_or_transform
    else:
        raise TypeError(
            "flow_or_transform must be an nflows Flow or Transform; "
            f"got {type(flow_or_transform).__name__}"
        )
    leaves = _density_order(transform)
    return Flow([_step(leaf, bitwise) for leaf in reversed(leaves)])


def sample(
    flow: NflowsFlow,
    num_samples: int,
    plan: Any,
    context: Tensor | None = None,
    *,
    return_solution: bool = False,
    throw: bool = True,
    bitwise: bool = True,
) -> Any:
    """`flow.sample(num_samples, context)`, with the AR transforms inverted by `plan`.

    Mirrors nflows' `Flow.sample` step by step: embeds the context, draws the noise from
    `flow._distribution` (so the same seed gives the same noise), repeats the context per
    sample, inverts under `torch.no_grad()`, and returns the same shapes: `(num_samples, D)`
    without context, `(C, num_samples, D)` with `C` context rows.

    Arguments:
        flow: the nflows `Flow`.
        num_samples: samples per context row (or in all, without context).
        plan: a [`Plan`][arflow_solvers.Plan], a paper-notation string such as `"[10]"`, or
            one solver (`Jacobi(tol=0.0)` reproduces nflows bit for bit).
        context: `(C, ...)` context or `None`.
        return_solution: also return the [`Solution`][arflow_solvers.Solution] (statistics).
        throw: raise if the result is not finite (see [`solve`][arflow_solvers.solve]).
        bitwise: `False` evaluates MAF's blocks on packed MADEs (see [`wrap`][arflow_solvers.adapters.nflows.wrap]).

    Returns:
        The samples, or `(samples, solution)` with `return_solution=True`.
    """
    if not isinstance(flow, NflowsFlow):
        raise TypeError(f"flow must be an nflows Flow; got {type(flow).__name__}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
    with torch.no_grad():
        embedded = flow._embedding_net(context)
        noise = flow._distribution.sample(num_samples, context=embedded)
        if embedded is not None:
            noise = noise.reshape(-1, *noise.shape[2:])
            embedded = embedded.repeat_interleave(num_samples, dim=0)
        solution = solve(wrap(flow, bitwise=bitwise), noise.reshape(noise.shape[0], -1, 1), plan,
                         cond=embedded, throw=throw)
        samples = solution.x.reshape(noise.shape)
        if embedded is not None:
            samples = samples.reshape(-1, num_samples, *samples.shape[1:])
    return (samples, solution) if return_solution else samples


def build_maf(features: int, hidden: int, layers: int, blocks: int = 1) -> NflowsFlow:
    """nflows' `MaskedAutoregressiveFlow` as the MAF paper uses it (reversals, residual MADEs).

    The architecture `examples/mnist_maf.py` trains and `load_for_planning` rebuilds.
    """
    from nflows.flows.autoregressive import MaskedAutoregressiveFlow

    return MaskedAutoregressiveFlow(features=features, hidden_features=hidden, num_layers=layers,
                                    num_blocks_per_layer=blocks, use_residual_blocks=True)


def load_for_planning(path: str, batch: int, seed: int, device: str) -> tuple[Flow, Tensor, None]:
    """An nflows MAF checkpoint as `(flow, calibration noise, cond)` for `arflow-solvers plan`.

    Accepts a checkpoint `{"state_dict", "args": {"hidden", "layers", "blocks"}}` as written by
    `examples/mnist_maf.py` (the feature count is read from the weights), or a whole pickled
    nflows `Flow` (`torch.save(flow, path)`; unpickling runs code, so only load files you
    trust). The noise is `(batch, D, 1)`, drawn from the flow's base distribution with `seed`.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        data = torch.load(path, map_location=device, weights_only=False)
    if isinstance(data, NflowsFlow):
        flow = data
    elif isinstance(data, dict) and "state_dict" in data:
        args = data.get("args", {})
        first = next(v for k, v in data["state_dict"].items() if k.endswith("initial_layer.weight"))
        flow = build_maf(first.shape[1], int(args.get("hidden", first.shape[0])),
                         int(args.get("layers", 5)), int(args.get("blocks", 1)))
        flow.load_state_dict(data["state_dict"])
    else:
        raise ValueError(f"{path} holds neither an nflows Flow nor a {{'state_dict', 'args'}} checkpoint")
    flow = flow.to(device).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        z = flow._distribution.sample(batch)
    return wrap(flow), z.reshape(batch, -1, 1), None
