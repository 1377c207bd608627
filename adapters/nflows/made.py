"""nflows' MADE evaluated without touching the module: snapshotted masked products, or packed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
from nflows.transforms.base import Transform
from nflows.transforms.made import MADE, MaskedFeedforwardBlock, MaskedLinear, MaskedResidualBlock
from torch import Tensor
from torch.nn import functional as F

from .._masked import PackedLinear, WeightCache, degree_order

__all__ = ["check_sampleable", "check_packable", "made_forward", "snapshot_network", "PackedMADE", "PACKED"]

Linear = Callable[[MaskedLinear, Tensor], Tensor]

_PRODUCTS: WeightCache[Tensor] = WeightCache(lambda layer: layer.weight * layer.mask)
"""layer -> `weight * mask`, shared by every solve, rebuilt when the weights change."""


def check_sampleable(transform: Transform) -> None:
    """Raise `ValueError` naming a module of `transform` whose training mode would change samples."""
    name = type(transform).__name__
    for module in transform.modules():
        if not module.training:
            continue
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            raise ValueError(f"{name} uses dropout in training mode, which makes samples random; "
                             "call flow.eval() first")
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"{name} has batch norm in training mode, which would update its running "
                             "statistics and make samples depend on the batch; call flow.eval() first")


def made_forward(net: MADE, linear: Linear, inputs: Tensor, context: Tensor | None) -> Tensor:
    """nflows' `MADE.forward` (same operations, same order), each masked layer computed by `linear`."""
    temps = linear(net.initial_layer, inputs)
    if context is not None:
        temps += net.activation(net.context_layer(context))
    if not net.use_residual_blocks:
        temps = net.activation(temps)
    for block in net.blocks:
        if isinstance(block, MaskedResidualBlock):
            h = block.batch_norm_layers[0](temps) if block.use_batch_norm else temps
            h = linear(block.linear_layers[0], block.activation(h))
            if context is not None:
                h += block.context_layer(context)
            if block.use_batch_norm:
                h = block.batch_norm_layers[1](h)
            temps = temps + linear(block.linear_layers[1], block.dropout(block.activation(h)))
        else:
            h = block.batch_norm(temps) if block.batch_norm else temps
            temps = block.dropout(block.activation(linear(block.linear, h)))
    return linear(net.final_layer, temps)


def snapshot_network(net: torch.nn.Module) -> Callable[[Tensor, Tensor | None], Tensor]:
    """`net(inputs, context)` with its masked products read once, now; nflows' own call otherwise.

    Bit for bit nflows' result: its `MaskedLinear` computes `F.linear(x, weight * mask, bias)`,
    and the snapshot holds those very products. The module is never modified, so other threads
    may train or sample it meanwhile.
    """
    if type(net) is not MADE or any(type(b) not in (MaskedResidualBlock, MaskedFeedforwardBlock)
                                    for b in net.blocks):
        return net
    products = {layer: _PRODUCTS(layer) for layer in net.modules() if isinstance(layer, MaskedLinear)}

    def linear(layer: MaskedLinear, h: Tensor) -> Tensor:
        return F.linear(h, products[layer], layer.bias)

    return lambda inputs, context=None: made_forward(net, linear, inputs, context)


class PackedMADE:
    """MAF's affine inverse `(z - shift) / scale` on a packed copy of nflows' MADE.

    Degree-sorted, block-triangular weights skip the masked zeros (see
    [`PackedLinear`][arflow_solvers.adapters._masked.PackedLinear]) on feature-major
    activations: the same function as nflows' from the same weights, equal to it to float
    rounding (the sums run in another order). The docs' MAF page measures its cost.
    """

    def __init__(self, transform: MaskedAffineAutoregressiveTransform):
        net = transform.autoregressive_net
        check_packable(transform)
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


PACKED: WeightCache[PackedMADE] = WeightCache(PackedMADE)
"""transform -> its packed MADE, shared by every solve, rebuilt when a weight changes."""


def _pack(layer: MaskedLinear, rows: Tensor, cols: Tensor) -> PackedLinear:
    return PackedLinear.pack(layer.weight, layer.mask, layer.bias, rows, cols)


def check_packable(transform: Transform) -> None:
    """Raise `ValueError` naming what keeps `transform`'s network from being packed."""
    name = type(transform).__name__
    net = transform.autoregressive_net
    if type(net) is not MADE:
        raise ValueError(f"bitwise=False needs nflows' MADE in {name}; got {type(net).__name__}")
    for block in net.blocks:
        if type(block) not in (MaskedResidualBlock, MaskedFeedforwardBlock):
            raise ValueError(f"bitwise=False cannot pack a {type(block).__name__} in {name}'s MADE")
        if getattr(block, "batch_norm", None) is not None or getattr(block, "use_batch_norm", False):
            raise ValueError(f"bitwise=False cannot pack batch norm inside {name}'s MADE")
    check_sampleable(transform)
