"""nflows' MADE read as a masked network of the shared layer (`arflow_solvers.adapters._masked`)."""

from __future__ import annotations

import torch
from nflows.transforms.base import Transform
from nflows.transforms.made import MADE, MaskedFeedforwardBlock, MaskedResidualBlock

from .._masked import AddPopped, Apply, Context, Masked, MaskedNetwork, Push, check_sampleable

__all__ = ["check_packable", "check_sampleable", "read_made"]


def _residual(block: MaskedResidualBlock) -> list:
    """`temps + L1(dropout(act(bn1(L0(act(bn0(temps))) + ctx(c)))))`, as nflows computes it."""
    ops: list = [Push()]
    if block.use_batch_norm:
        ops.append(Apply(block.batch_norm_layers[0], pointwise=False))
    ops += [Apply(block.activation), Masked(block.linear_layers[0])]
    if hasattr(block, "context_layer"):
        ops.append(Context(block.context_layer))
    if block.use_batch_norm:
        ops.append(Apply(block.batch_norm_layers[1], pointwise=False))
    # dropout is left out: it is the identity in eval mode, and training mode is refused
    return ops + [Apply(block.activation), Masked(block.linear_layers[1]), AddPopped()]


def _feedforward(block: MaskedFeedforwardBlock) -> list:
    """`dropout(act(L(bn(temps))))`."""
    ops: list = [] if block.batch_norm is None else [Apply(block.batch_norm, pointwise=False)]
    return ops + [Masked(block.linear), Apply(block.activation)]


def read_made(net: torch.nn.Module, features: int) -> MaskedNetwork | None:
    """nflows' `MADE.forward` as a program (same operations, same order); `None` for another network.

    The outputs are grouped per feature (nflows views them as `(B, F, multiplier)`).
    """
    if type(net) is not MADE or any(type(b) not in (MaskedResidualBlock, MaskedFeedforwardBlock)
                                    for b in net.blocks):
        return None
    ops: list = [Masked(net.initial_layer)]
    if getattr(net, "context_layer", None) is not None:
        ops.append(Context(lambda c, net=net: net.activation(net.context_layer(c))))
    if not net.use_residual_blocks:
        ops.append(Apply(net.activation))
    for block in net.blocks:
        ops += _residual(block) if isinstance(block, MaskedResidualBlock) else _feedforward(block)
    ops.append(Masked(net.final_layer))
    multiplier = net.final_layer.out_features // features
    rows = torch.arange(features * multiplier, device=net.final_layer.weight.device).view(features, multiplier)
    return MaskedNetwork(features, tuple(ops), rows)


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
