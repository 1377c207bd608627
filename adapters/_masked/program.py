"""Two evaluations of a masked network: exactly as its library computes it, or packed.

Both take the iterate in the autoregressive order the masks imply (`(B, F)`, see
[`analyse`][arflow_solvers.adapters._masked.network.analyse]) and return the network's
output in the library's own layout (`(B, out)`), so the library's univariate inverse reads it
as it would read its own.

- [`DenseProgram`][arflow_solvers.adapters._masked.program.DenseProgram] runs the library's
  operations in the library's order on the library's feature order, with each masked product
  `weight * mask` read once per solve: bit for bit the library's output.
- [`PackedProgram`][arflow_solvers.adapters._masked.program.PackedProgram] runs the same
  function on feature-major activations with every layer's units sorted by degree, so each
  masked layer becomes a few products over the prefixes of inputs its rows read
  ([`PackedLinear`][arflow_solvers.adapters._masked.packed.PackedLinear]): less work, equal
  to the library's output to float rounding (the sums run in another order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .network import AddPopped, Analysis, Apply, Context, Masked, MaskedNetwork, Push, take_columns
from .packed import PackedLinear

__all__ = ["DenseProgram", "PackedProgram", "grouped_rows", "products"]


def products(network: MaskedNetwork) -> dict[int, Tensor]:
    """`weight * mask` of every masked layer, keyed by the op's index (computed now)."""
    return {i: op.layer.weight * op.layer.mask for i, op in enumerate(network.program)
            if isinstance(op, (Masked, AddPopped)) and op.layer is not None}


def _with_context(network: MaskedNetwork, x: Tensor, cond: Any, order: str | None = None) -> Tensor:
    """`x` with the context columns the first layer reads, `network.context` (or `order`) first or last."""
    order = network.context if order is None else order
    if network.context is None:
        return x
    if not isinstance(cond, Tensor):
        raise ValueError("this masked network reads a context: pass cond, a (B, "
                         f"{network.context_features}) tensor; got {type(cond).__name__}")
    return torch.cat([x, cond] if order == "append" else [cond, x], dim=-1)


MIN_PROBED = 1 << 14
"""Outputs a probe of the grouped final layer must compare before its layout is trusted."""


def grouped_rows(network: MaskedNetwork, analysis: Analysis) -> Tensor:
    """`(P * F,)`: the output rows grouped by parameter, features in autoregressive order within each."""
    return network.param_rows.to(analysis.order.device)[analysis.order].T.reshape(-1)


class DenseProgram:
    """The network as its library evaluates it: same products, operations and order.

    Arguments:
        network: the description.
        analysis: what its masks imply (the order the iterate comes in).
        weights: the masked products by op index (from
            [`products`][arflow_solvers.adapters._masked.program.products]), or `None` to
            compute them at every call (with autograd, for calls outside a solve).
    """

    def __init__(self, network: MaskedNetwork, analysis: Analysis, weights: dict[int, Tensor] | None = None):
        self.network, self.analysis, self.weights = network, analysis, weights
        self.rows = grouped_rows(network, analysis)
        last = len(network.program) - 1
        self._final = last if isinstance(network.program[last], Masked) else None
        self._grouped_final: dict[tuple[int, int], tuple[Tensor, Tensor | None]] = {}  # by features kept
        self._exact: dict[tuple, bool] = {}

    def __call__(self, x: Tensor, cond: Any = None, buffers: dict[int, Tensor] | None = None) -> Tensor:
        """`(B, F)` iterate in autoregressive order to the `(B, out)` output, library layout.

        `buffers` (op index to tensor, filled here) lets the masked products of successive calls
        write into the same tensors, as `F.linear` computes them (`addmm`); the output is then
        overwritten by the next call.
        """
        return self.run(self._library_inputs(x), cond, buffers)

    @property
    def has_final_layer(self) -> bool:
        """Whether the network ends with a masked layer (whose rows can be computed apart)."""
        return self._final is not None

    def output_rows(self, x: Tensor, cond: Any, lo: int, hi: int, buffers: dict[int, Tensor] | None = None) -> Tensor:
        """Outputs `[lo, hi)` of `self(x, cond)`: the final layer computes only those rows.

        Each output is the same dot product, but a product of fewer rows may round otherwise.
        """
        layer = self.network.program[self._final].layer
        final = self._product(self._final)[lo:hi], None if layer.bias is None else layer.bias[lo:hi]
        return self.run(self._library_inputs(x), cond, buffers, final, key=-3)

    def grouped(self, x: Tensor, cond: Any = None, buffers: dict[int, Tensor] | None = None,
                exact: bool = True) -> Tensor:
        """The same output as `(B, P, F)`: grouped by parameter, features in autoregressive order.

        A final masked layer computes just those rows, in that order: each output is the same
        dot product as in the library's layout, and the univariate parameters come out
        contiguous and already in the iterate's order. `exact=False` (equal to rounding) also
        reads the iterate in its own order through the first layer's columns, without
        reordering it (and, under autograd, without reordering every pull back).
        """
        batch = x.shape[0]
        first = None if exact else self._ordered_first()
        inputs = x if first is not None else self._library_inputs(x)
        if self._final is None:
            out = self.run(inputs, cond, buffers, first=first).index_select(1, self.rows)
        else:
            out = self.run(inputs, cond, buffers, self._final_rows(), first)
        return out.view(batch, -1, self.network.features)

    def _ordered_first(self) -> tuple[Tensor, Tensor | None] | None:
        """The first layer's masked product with its feature columns in autoregressive order, or `None`."""
        network, analysis = self.network, self.analysis
        if analysis.identity or network.preprocess is not None or not isinstance(network.program[0], Masked) \
                or self._final == 0:  # one layer: its rows are grouped already
            return None
        layer = network.program[0].layer
        product = self._product(0)
        context = torch.arange(network.context_features, device=analysis.order.device)
        columns = {None: analysis.order, "append": torch.cat([analysis.order, network.features + context]),
                   "prepend": torch.cat([context, network.context_features + analysis.order])}[network.context]
        return product[:, columns], layer.bias

    def grouped_range(self, x: Tensor, cond: Any, start: int, stop: int,
                      buffers: dict[int, Tensor] | None = None) -> Tensor:
        """`(B, P, stop - start)`: features `[start, stop)` (autoregressive order) of `grouped(x, cond)`.

        The final layer computes only those rows (gathered once per range): each output is the
        same dot product, but a product of fewer rows may round otherwise.
        """
        final = self._final_rows(start, stop)
        out = self.run(self._library_inputs(x), cond, buffers, final, key=-4 if start == 0 else -5)
        return out.view(x.shape[0], -1, stop - start)

    def grouped_is_exact(self, batch: int, like: Tensor) -> bool:
        """Whether `grouped` gives the library's outputs bit for bit for `batch` rows (like `like`).

        Matrix-multiply kernels may round an output differently when its row of the weight
        sits elsewhere (small or odd shapes take other code paths). Which operations a kernel
        runs does not depend on the values, but whether two orders round alike does, so one
        random probe of the final layer settles it only over many outputs: below
        `MIN_PROBED` outputs the answer is no (small problems gain little from the grouped
        layout anyway).
        """
        key = (batch, like.dtype, like.device)
        if key not in self._exact:
            probed = batch * len(self.rows) >= MIN_PROBED
            self._exact[key] = self._final is not None and probed and self._probe(batch, like)
        return self._exact[key]

    def _probe(self, batch: int, like: Tensor) -> bool:
        layer = self.network.program[self._final].layer
        generator = torch.Generator(device=like.device).manual_seed(0)
        h = torch.randn(batch, layer.weight.shape[1], generator=generator, dtype=like.dtype, device=like.device)
        library = F.linear(h, self.weights[self._final], layer.bias).index_select(1, self.rows)
        return bool(torch.equal(F.linear(h, *self._final_rows()), library))

    def _product(self, index: int) -> Tensor:
        """Op `index`'s `weight * mask`: read for the solve, or computed now (with its graph)."""
        if self.weights is not None:
            return self.weights[index]
        layer = self.network.program[index].layer
        return layer.weight * layer.mask

    def _library_inputs(self, x: Tensor) -> Tensor:
        return x if self.analysis.identity else take_columns(x, self.analysis.position, self.analysis.reversal)

    def _final_rows(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor | None]:
        """The final layer's masked product and bias, rows grouped (only features `[start, stop)` of each).

        Gathered once per range from the products read for a solve; without them (under
        autograd, for a linearisation) computed at every call, with their graph.
        """
        key = (start, self.network.features if stop is None else stop)
        if key in self._grouped_final:
            return self._grouped_final[key]
        rows = self.rows.view(-1, self.network.features)[:, key[0]:key[1]].reshape(-1)
        layer = self.network.program[self._final].layer
        final = self._product(self._final)[rows], None if layer.bias is None else layer.bias[rows]
        if self.weights is not None:
            self._grouped_final[key] = final
        return final

    def run(self, x: Tensor, cond: Any = None, buffers: dict[int, Tensor] | None = None,
            final: tuple[Tensor, Tensor | None] | None = None,
            first: tuple[Tensor, Tensor | None] | None = None, key: int = -1) -> Tensor:
        """`(B, F)` inputs in library order to the `(B, out)` output.

        `final`, `first`: the last and the first layer's product and bias, if not the
        network's own (grouped rows, or some of them; columns for inputs in another order).
        `key`: the buffer the replaced final layer writes into.
        """
        network = self.network
        weights = products(network) if self.weights is None else self.weights
        h = x if network.preprocess is None else network.preprocess(x)
        h = _with_context(network, h, cond)
        stack: list[Tensor] = []
        owned = False  # whether h is an intermediate of this call that nothing else holds
        for index, op in enumerate(network.program):
            if isinstance(op, Masked) and final is not None and index == self._final:
                h = _linear(h, final[0], final[1], buffers, key)
            elif index == 0 and first is not None:
                h = _linear(h, first[0], first[1], buffers, -2)
            elif isinstance(op, Masked):
                h = _linear(h, weights[index], op.layer.bias, buffers, index)
            elif isinstance(op, Apply):
                h = torch.relu_(h) if owned and not torch.is_grad_enabled() and _is_relu(op.fn) else op.fn(h)
            elif isinstance(op, Context):
                if cond is None:  # as nflows' MADE does: a conditional layer called without context
                    continue
                extra = op.fn(cond)
                h = h + extra if op.mode == "add" else F.glu(torch.cat((h, extra), dim=1), dim=1)
            elif isinstance(op, Push):
                stack.append(h)
            elif op.layer is None:
                h = stack.pop() + h
            else:
                h = h + F.linear(stack.pop(), weights[index], op.layer.bias)
            owned = not isinstance(op, Push) and (owned or not isinstance(op, Apply))
        return h


def _linear(h: Tensor, weight: Tensor, bias: Tensor | None, buffers: dict[int, Tensor] | None, index: int) -> Tensor:
    """`F.linear(h, weight, bias)`, into `buffers[index]` when given: the same `addmm`, so the same bits."""
    if buffers is None or bias is None or h.dim() != 2 or torch.is_grad_enabled():
        return F.linear(h, weight, bias)
    out = buffers.get(index)
    if out is None or out.shape != (h.shape[0], weight.shape[0]) or out.dtype != h.dtype:
        out = buffers[index] = h.new_empty(h.shape[0], weight.shape[0])
    return torch.addmm(bias, h, weight.t(), out=out)


def _is_relu(fn: Any) -> bool:
    """Whether `fn` is ReLU, which may then run in place: the same values without a new tensor."""
    return type(fn) is torch.nn.ReLU or fn is F.relu or fn is torch.relu


class PackedProgram:
    """The network on feature-major activations, every layer packed in degree order.

    Raises `ValueError` naming what cannot be packed: per-unit ops (batch norm), input
    preprocessing, or masks that are not triangular once sorted by degree (connectivity
    that is not nested, such as a general DAG).

    Arguments:
        network: the description.
        analysis: its masks' order and degrees.
        name: what to name in errors.
        group_rows: rows per packed product group (see `PackedLinear.pack`).
    """

    def __init__(self, network: MaskedNetwork, analysis: Analysis, name: str = "the network",
                 group_rows: int = 192):
        if network.preprocess is not None:
            raise ValueError(f"bitwise=False cannot pack {name}: it preprocesses its inputs per feature")
        self.network, self.analysis = network, analysis
        features, position = network.features, analysis.position
        source = torch.cat([position, features + torch.arange(network.context_features, device=position.device)])
        if network.context == "prepend":
            source = torch.cat([source[features:], source[:features]])
        order = analysis.input_order
        self.input_index = source[order]
        if bool(torch.equal(self.input_index, torch.arange(len(order), device=order.device))):
            self.input_index = None
        steps: list[tuple] = []
        for index, op in enumerate(network.program):
            if isinstance(op, Masked):
                rows, cols = analysis.unit_orders[index]
                steps.append(("linear", self._pack(op.layer, rows, cols, name, group_rows)))
                order = rows
            elif isinstance(op, Apply):
                if not op.pointwise:
                    what = getattr(op.fn, "__name__", type(op.fn).__name__)
                    raise ValueError(f"bitwise=False cannot pack {name}: its {what} acts per unit "
                                     "(batch norm?), which needs the library's layout")
                steps.append(("apply", op.fn))
            elif isinstance(op, Context):
                steps.append(("context", op.fn, order, op.mode))
            elif isinstance(op, Push):
                steps.append(("push",))
            elif op.layer is None:
                steps.append(("add",))
            else:
                rows, cols = analysis.unit_orders[index]
                steps.append(("skip", self._pack(op.layer, rows, cols, name, group_rows)))
        self.steps = tuple(steps)
        identity = bool(torch.equal(order, torch.arange(len(order), device=order.device)))
        self.output_rows = None if identity else order

    @staticmethod
    def _pack(layer: Any, rows: Tensor, cols: Tensor, name: str, group_rows: int) -> PackedLinear:
        try:
            return PackedLinear.pack(layer.weight.detach(), layer.mask, layer.bias, rows, cols, group_rows)
        except ValueError as error:
            raise ValueError(f"bitwise=False cannot pack {name}: {error} (its connectivity is not "
                             "nested, e.g. a general adjacency)") from error

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        """`(B, F)` iterate in autoregressive order to the `(B, out)` output, library layout."""
        source = _with_context(self.network, x, cond, "append")  # input_index reads [x, cond]
        h = (source if self.input_index is None else source.index_select(1, self.input_index)).T.contiguous()
        stack: list[Tensor] = []
        for step in self.steps:
            kind = step[0]
            if kind == "linear":
                h = step[1](h)
            elif kind == "apply":
                h = step[1](h)
            elif kind == "context":
                if cond is None:
                    continue
                extra = step[1](cond).index_select(1, step[2]).T
                h = h + extra if step[3] == "add" else F.glu(torch.cat((h, extra), dim=0), dim=0)
            elif kind == "push":
                stack.append(h)
            elif kind == "add":
                h = stack.pop() + h
            else:
                h = h + step[1](stack.pop())
        if self.output_rows is None:
            return h.T.contiguous()
        return h.new_empty(h.shape[1], h.shape[0]).index_copy_(1, self.output_rows, h.T)
