"""A library's masked network as a short program, and what its masks say about it.

Every MADE-like network (nflows' and normflows' `MADE`, zuko's `MaskedMLP`, pyro's
`AutoRegressiveNN`) is a chain of masked linear layers, pointwise activations, residual or
skip connections and some way of reading a context. An adapter describes its network once
as a [`MaskedNetwork`][arflow_solvers.adapters._masked.network.MaskedNetwork]: a tuple of the
ops below, in the order the library applies them. From that description the shared layer

- recovers which features each output reads, by pushing the masks through the program
  ([`analyse`][arflow_solvers.adapters._masked.network.analyse]): the autoregressive order
  (features sorted so that each one reads only those before it, grouped orders and any
  acyclic connectivity included) and an order of every layer's units in which each masked
  row reads a prefix of its inputs (the units' *degrees*, recovered from the masks);
- evaluates it either exactly as the library does (same products, same operations, same
  order: bit for bit; [`DenseProgram`][arflow_solvers.adapters._masked.program.DenseProgram])
  or packed (degree-sorted, block-triangular products that skip the masked zeros; equal to
  float rounding; [`PackedProgram`][arflow_solvers.adapters._masked.program.PackedProgram]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

from arflow_solvers.flow import is_reversal, take_columns

__all__ = [
    "AddPopped",
    "Analysis",
    "Apply",
    "Context",
    "Masked",
    "MaskedNetwork",
    "Op",
    "Push",
    "analyse",
    "pointwise",
    "take_columns",
]


@dataclass(frozen=True)
class Masked:
    """`h = F.linear(h, weight * mask, bias)`: a masked linear layer (`layer.weight`, `.mask`, `.bias`)."""

    layer: nn.Module


@dataclass(frozen=True)
class Apply:
    """`h = fn(h)` on every unit without mixing units.

    `pointwise=True`: the same scalar function everywhere (an activation), so it may run in
    any layout; `False`: per-unit parameters (batch norm in eval mode), library layout only,
    so such a network cannot be packed.
    """

    fn: Callable[[Tensor], Tensor]
    pointwise: bool = True


@dataclass(frozen=True)
class Context:
    """Conditioning through an unmasked layer: `h + fn(cond)` (`"add"`) or `glu([h, fn(cond)])` (`"glu"`).

    Skipped when `cond` is `None`, as nflows' MADE skips its context layers.
    """

    fn: Callable[[Tensor], Tensor]
    mode: str = "add"

    def __post_init__(self) -> None:
        if self.mode not in ("add", "glu"):
            raise ValueError(f"Context mode must be 'add' or 'glu'; got {self.mode!r}")


@dataclass(frozen=True)
class Push:
    """Save `h`: a residual or skip connection starts here."""


@dataclass(frozen=True)
class AddPopped:
    """End a connection: `h = saved + h`, or with a masked `layer`, `h = h + layer(saved)` (a skip)."""

    layer: nn.Module | None = None


Op = Union[Masked, Apply, Context, Push, AddPopped]


@dataclass(frozen=True)
class MaskedNetwork:
    """How a library's masked network computes the parameters of its univariate transforms.

    Attributes:
        features: `F`, the dimension of the data.
        program: the ops, in the order the library applies them, from the first layer's
            input to the output.
        param_rows: `(F, P)` long: output index of parameter `k` of feature `i` (library
            indices), e.g. `arange(F * P).view(F, P)` for outputs grouped per feature.
        context: how the context enters the first layer's input: `None` (not at all, or
            through [`Context`][arflow_solvers.adapters._masked.network.Context] ops),
            `"append"` (`cat([x, cond], -1)`, zuko) or `"prepend"` (`cat([cond, x], -1)`, pyro).
        preprocess: a per-feature function applied to `x` before the first layer, or `None`.
    """

    features: int
    program: tuple[Op, ...]
    param_rows: Tensor
    context: str | None = None
    preprocess: Callable[[Tensor], Tensor] | None = None
    layers: tuple[nn.Module, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.context not in (None, "append", "prepend"):
            raise ValueError(f"context must be None, 'append' or 'prepend'; got {self.context!r}")
        layers = tuple(op.layer for op in self.program if isinstance(op, (Masked, AddPopped)) and op.layer is not None)
        if not layers or not isinstance(self.program[0], (Masked, Push)):
            raise ValueError("a masked network's program must start with a Masked layer (or a Push)")
        if tuple(self.param_rows.shape[:1]) != (self.features,):
            raise ValueError(f"param_rows must be (features={self.features}, P); got {tuple(self.param_rows.shape)}")
        object.__setattr__(self, "layers", layers)

    @property
    def context_features(self) -> int:
        """How many context columns the first layer reads (0 unless `context` is set)."""
        return 0 if self.context is None else int(self.layers[0].mask.shape[1]) - self.features

    @property
    def final(self) -> nn.Module:
        """The last masked layer of the main path (whose rows produce the parameters)."""
        return next(op.layer for op in reversed(self.program) if isinstance(op, Masked))


_NOT_POINTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.MultiheadAttention)


def pointwise(module: Any, owner: str) -> Apply:
    """An activation module as a pointwise op; `TypeError` naming it if it mixes or scales units.

    Arguments:
        module: a module from `torch.nn`'s activations (`ReLU`, `ELU`, `Tanh`, ...).
        owner: what to name in the error (the library's transform).
    """
    single = not isinstance(module, nn.PReLU) or module.num_parameters == 1
    if type(module).__module__ == "torch.nn.modules.activation" and single and not isinstance(module, _NOT_POINTWISE):
        return Apply(module)
    raise TypeError(f"{owner} contains a {type(module).__name__}, which is not a pointwise activation; "
                    "a masked network may hold masked linear layers, residual blocks and torch.nn "
                    "activations (ReLU, ELU, Tanh, ...) only")


@dataclass(frozen=True)
class Analysis:
    """What the masks say: the autoregressive order, and an order of every layer's units.

    Attributes:
        order: `(F,)` the library index of the feature at each position; every feature's
            parameters read only features at earlier positions.
        position: `(F,)` the inverse permutation (the position of each library feature).
        identity: whether `order` is `0, 1, ..., F-1`.
        reversal: whether it is `F-1, ..., 1, 0` (then so is `position`).
        input_order: `(in,)` the first layer's input columns (library indices, context
            columns included) sorted by degree.
        unit_orders: for each op with a layer, the order of the units it reads (`"cols"`) and
            writes (`"rows"`), as `{index: (rows, cols)}`.
        feature_deps: `(F, F)` bool, `[i, j]`: feature `i`'s parameters read feature `j`.
        unread_from: the first position from which on no feature's parameters read any
            (a MADE whose hidden layers are narrower than `F` reads only its first positions).

    Units are sorted by degree, which the masks give without being told: the more units
    of the next layer read a unit, the lower its degree. For MADE-like (nested) masks every
    masked row then reads a prefix of its sorted inputs; the outputs are sorted by feature
    position, then parameter.
    """

    order: Tensor
    position: Tensor
    identity: bool
    reversal: bool
    input_order: Tensor
    unit_orders: dict[int, tuple[Tensor, Tensor]]
    feature_deps: Tensor
    unread_from: int


def _through(mask: Tensor, deps: Tensor) -> Tensor:
    """Which features the outputs of a masked layer read, given what its inputs read."""
    return (mask.detach().ne(0).to(torch.float32) @ deps.to(torch.float32)) > 0


def _inputs(network: MaskedNetwork) -> Tensor:
    features, context = network.features, network.context_features
    eye = torch.eye(features, dtype=torch.bool, device=network.layers[0].mask.device)
    none = torch.zeros(context, features, dtype=torch.bool, device=eye.device)
    return {None: eye, "append": torch.cat([eye, none]), "prepend": torch.cat([none, eye])}[network.context]


def _output_deps(network: MaskedNetwork) -> Tensor:
    """Which features each output of the network reads (outputs x features, bool)."""
    deps = _inputs(network)
    stack: list[Tensor] = []
    for index, op in enumerate(network.program):
        if isinstance(op, Masked):
            deps = _through(op.layer.mask, deps)
        elif isinstance(op, Push):
            stack.append(deps)
        elif isinstance(op, AddPopped):
            saved = stack.pop()
            if op.layer is not None:
                saved = _through(op.layer.mask, saved)
            if saved.shape != deps.shape:
                raise ValueError(f"op {index} adds tensors of {saved.shape[0]} and {deps.shape[0]} units")
            deps = deps | saved
    return deps


def _autoregressive_order(deps: Tensor, name: str) -> Tensor:
    """Features sorted so that each reads only earlier ones: the library order or its reversal when
    one is such an order (a reversal is a cheap flip), else sorted by how many features each reads,
    else by generations (ties in library order)."""
    features = deps.shape[0]
    if bool(deps.diagonal().any()):
        bad = torch.nonzero(deps.diagonal()).flatten().tolist()
        raise ValueError(f"{name} is not autoregressive: the parameters of features {bad[:8]} read "
                         "those features themselves")
    order = torch.arange(features, device=deps.device)  # the library's own order when it is one
    if bool(torch.triu(deps).any()):
        order = order.flip(0)  # reversed, as MAF stacks reverse every other transform
    if bool(torch.triu(deps[order][:, order]).any()):
        order = torch.sort(deps.sum(1), stable=True).indices  # nested (MADE-like) connectivity
    if bool(torch.triu(deps[order][:, order]).any()):  # any other acyclic graph: its generations
        generation = torch.full((features,), -1, dtype=torch.long, device=deps.device)
        remaining = torch.ones(features, dtype=torch.bool, device=deps.device)
        level = 0
        while bool(remaining.any()):
            ready = remaining & ~(deps & remaining).any(1)
            if not bool(ready.any()):
                raise ValueError(f"{name} is not autoregressive: its masks connect features in a cycle")
            generation[ready], remaining, level = level, remaining & ~ready, level + 1
        order = torch.sort(generation, stable=True).indices
    return order


def _unit_orders(network: MaskedNetwork, outputs: Tensor) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """Each layer's units sorted by how many units of the layers that read them do (descending).

    Tensors that are added (a residual stream) hold the same units, so they share one order,
    sorted by all their readers together. The network's outputs are sorted as `outputs` says.
    """
    parent: list[int] = []
    readers: list[list[Tensor]] = []

    def new() -> int:
        parent.append(len(parent))
        readers.append([])
        return len(parent) - 1

    def find(v: int) -> int:
        while parent[v] != v:
            v = parent[v]
        return v

    current, stack, edges = new(), [], {}
    first = current
    for index, op in enumerate(network.program):
        if isinstance(op, Masked):
            readers[current].append(op.layer.mask)
            reads, current = current, new()
            edges[index] = (current, reads)
        elif isinstance(op, Push):
            stack.append(current)
        elif isinstance(op, AddPopped):
            saved = stack.pop()
            if op.layer is None:
                parent[find(saved)] = find(current)
            else:
                readers[saved].append(op.layer.mask)
                edges[index] = (current, saved)
    final = find(current)
    groups: dict[int, list[Tensor]] = {}
    for value in range(len(parent)):
        groups.setdefault(find(value), []).extend(readers[value])
    orders: dict[int, Tensor] = {}
    for root, masks in groups.items():
        if root == final:
            orders[root] = outputs
        else:
            counts = sum(mask.detach().ne(0).sum(0) for mask in masks)
            orders[root] = torch.sort(-counts, stable=True).indices
    return orders[find(first)], {i: (orders[find(r)], orders[find(c)]) for i, (r, c) in edges.items()}


def analyse(network: MaskedNetwork, name: str = "the network") -> Analysis:
    """The order and degrees that `network`'s masks imply.

    Raises:
        ValueError: the masks let a feature read itself, or connect features in a cycle;
            the message names `name`.

    Examples:
        >>> import torch
        >>> class Layer(torch.nn.Module):  # just what a masked layer has: weight, mask, bias
        ...     def __init__(self, mask):
        ...         super().__init__()
        ...         self.weight, self.bias = torch.nn.Parameter(torch.ones(mask.shape)), None
        ...         self.register_buffer("mask", mask)
        >>> hidden = Layer(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]))  # units read {x2}, {x0, x2}
        >>> output = Layer(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))  # x0, x1, x2's parameters
        >>> net = MaskedNetwork(3, (Masked(hidden), Apply(torch.relu), Masked(output)), torch.arange(3).view(3, 1))
        >>> analyse(net).order.tolist()  # x2 reads nothing, x0 reads x2, x1 reads x0 and x2
        [2, 0, 1]
    """
    rows = network.param_rows
    deps = _output_deps(network)
    feature_deps = deps[rows.flatten().to(deps.device)].view(*rows.shape, -1).any(1)
    order = _autoregressive_order(feature_deps, name)
    position = torch.argsort(order)
    identity = bool(torch.equal(order, torch.arange(len(order), device=order.device)))
    input_order, unit_orders = _unit_orders(network, rows.to(order.device)[order].flatten())
    read = feature_deps.any(0)[order].nonzero()
    return Analysis(order=order, position=position, identity=identity, reversal=is_reversal(order),
                    input_order=input_order, unit_orders=unit_orders, feature_deps=feature_deps,
                    unread_from=int(read.max()) + 1 if read.numel() else 0)
