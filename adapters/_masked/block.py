"""One block for every masked autoregressive transform: the library says how to read it, we do the rest.

A library adapter subclasses [`MaskedARBlock`][arflow_solvers.adapters._masked.block.MaskedARBlock]
(or [`MaskedAffineBlock`][arflow_solvers.adapters._masked.block.MaskedAffineBlock]) and
supplies two things: `read_network` (its network as a
[`MaskedNetwork`][arflow_solvers.adapters._masked.network.MaskedNetwork]) and
`univariate_inverse` (its elementwise inverse, computed as the library computes it). The
block does everything else once: the autoregressive order and the shape checks, the
per-solve snapshot of the masked products through a proven
[`WeightCache`][arflow_solvers.adapters._masked.weights.WeightCache], the packed evaluation,
`affine` and `output_projection` for the metrics, and refusing a model whose training mode
would change the samples.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .linearise import NotElementwiseError, TailLinearisation, TailPartials, autograd_partials
from .network import Analysis, MaskedNetwork, analyse, take_columns
from .program import DenseProgram, PackedProgram, products
from .weights import WeightCache, masks

__all__ = ["MaskedARBlock", "MaskedAffineBlock", "ElementwiseInverseBlock", "check_sampleable"]


def check_sampleable(module: nn.Module, name: str | None = None) -> None:
    """Raise `ValueError` naming `module` if a submodule's training mode would change the samples.

    Dropout (with `p > 0`) and batch norm in training mode are refused: the first makes the
    samples random, the second updates running statistics and makes samples depend on the
    batch. Batch norm is torch's, or any module with running statistics among its own
    buffers (`running_mean` / `running_var` or `moving_mean` / `moving_variance`: the
    batch-norm transforms of nflows, normflows and pyro). Anything else in training mode
    samples as in eval mode.
    """
    name = name or type(module).__name__
    for sub in module.modules():
        if not sub.training:
            continue
        if isinstance(sub, nn.Dropout) and sub.p > 0:
            raise ValueError(f"{name} uses dropout in training mode, which makes samples random; "
                             "call flow.eval() first")
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) or _has_running_statistics(sub):
            raise ValueError(f"{name} has batch norm in training mode, which would update its running "
                             "statistics and make samples depend on the batch; call flow.eval() first")


def _has_running_statistics(module: nn.Module) -> bool:
    names = {name for name, _ in module.named_buffers(recurse=False)}
    return {"running_mean", "running_var"} <= names or {"moving_mean", "moving_variance"} <= names


def _analysis(owner: nn.Module, network: MaskedNetwork, name: str) -> Analysis:
    return analyse(network, name)


def _dense(owner: nn.Module, network: MaskedNetwork, analysis: Analysis) -> DenseProgram:
    return DenseProgram(network, analysis, products(network))


def _packed(owner: nn.Module, network: MaskedNetwork, analysis: Analysis, name: str) -> PackedProgram:
    return PackedProgram(network, analysis, name)


ANALYSES: WeightCache[Analysis] = WeightCache(_analysis, tensors=masks)
"""owner -> what its masks imply; recomputed only when a mask changes."""
DENSE: WeightCache[DenseProgram] = WeightCache(_dense)
"""owner -> its network with the masked products read; rebuilt when any weight changes."""
PACKED: WeightCache[PackedProgram] = WeightCache(_packed)
"""owner -> its packed network; rebuilt when any weight changes."""
ELEMENTWISE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""transform -> whether its univariate passed the elementwise check of its first linearisation."""


def _flat(x: Tensor, features: int, name: str) -> Tensor:
    """`(B, T, 1)` to `(B, T)`."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != features or x.shape[2] != 1:
        raise ValueError(f"{name} must have shape (B, {features}, 1); got {tuple(getattr(x, 'shape', ()))}")
    return x.reshape(x.shape[0], features)


MIN_UNREAD_SHARE = 1 / 8
"""The share of the rows nothing reads below which a block with a grouped inverse sweeps whole
passes: computing those rows once costs a whole sweep, and each sweep that skips them saves only
that share of its rows."""


class MaskedARBlock:
    r"""A library's masked autoregressive transform as a [`CausalMapBlock`][arflow_solvers.CausalMapBlock].

    The library inverts such a transform by sweeps `x <- f^{-1}(z; params(x))` from `x = 0`;
    `inverse_map` is one such sweep, evaluated as the library evaluates it, so the fixed
    point of any solver is the library's answer (bit for bit in the exact mode). The core
    works on `(B, T, 1)` with `T = F` in the **autoregressive order** the masks imply
    (`self.order[t]` is the library index of position `t`): each position reads only earlier
    ones. Grouped orders (features that do not read each other) and any acyclic connectivity
    are sorted into such an order.

    Subclasses implement `read_network` and `univariate_inverse`; `context` binds one
    context vector for every sample (otherwise the solvers pass `cond`, `(B, C)`).

    References:
        MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015),
        https://arxiv.org/abs/1502.03509

        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        https://arxiv.org/abs/1705.07057

    Arguments:
        transform: the library's transform (a module; its weights are read once per solve).
        bitwise: evaluate the network as the library does (`True`) or packed (`False`: less
            work per pass, equal to float rounding).
        context: `(C,)`: one context for every sample, or `None`.
    """

    univariate_reads_any_features = False
    """Whether `univariate_inverse` takes the parameters and noise of any number of consecutive
    features (parameters feature-major), so that a sweep can invert a suffix of positions, or
    single elements as samples of one feature, alone."""

    unread_proven = True
    """`unread_from` is read from the masks, and every evaluation multiplies by them: no row
    of `inverse_map` reads the positions from there on, whatever they hold (if finite)."""

    def __init__(self, transform: nn.Module, *, bitwise: bool = True, context: Tensor | None = None):
        if not isinstance(bitwise, bool):
            raise TypeError(f"bitwise must be a bool; got {bitwise!r}")
        if context is not None and (not isinstance(context, Tensor) or context.dim() != 1):
            raise ValueError("context must be None or one context vector of shape (C,); pass per-sample "
                             f"contexts as cond to the solver; got {tuple(getattr(context, 'shape', ()))}")
        self.transform, self.bitwise, self.context = transform, bitwise, context
        self.network = self.read_network(transform)
        self._program: DenseProgram | PackedProgram | None = None
        self._noise: tuple[Tensor, Tensor] | None = None  # in a snapshot: the noise and its library-order copy
        self._buffers: dict[int, Tensor] | None = None  # in a snapshot: the network's outputs, reused by each sweep
        self._grouped_agrees: bool | None = False  # in a snapshot: None until a sweep's shape was probed
        self._grouped_batch = 0
        if self.network is None:  # opaque: called as the library calls it, assumed causal in its order
            self.seq_len = self.opaque_features(transform)
            self.order = self._position = torch.arange(self.seq_len)
            self._identity, self._reversal = True, False
            self.unread_from = self.seq_len
        else:
            self._analysis = analysis = ANALYSES(transform, self.network, self.name)
            self.order, self._position = analysis.order, analysis.position
            self._identity, self._reversal = analysis.identity, analysis.reversal
            self.seq_len = self.network.features
            self.unread_from = analysis.unread_from  # positions from here on are read by no row
            rows = self.network.param_rows
            self._feature_major = bool(torch.equal(rows.flatten().cpu(), torch.arange(rows.numel())))
        if not bitwise:
            self._check_packable()

    # -- what a library supplies ---------------------------------------------------------

    def read_network(self, transform: nn.Module) -> MaskedNetwork | None:
        """The transform's network as a program of masked ops, or `None` for a network to call as is."""
        raise NotImplementedError

    def opaque_features(self, transform: nn.Module) -> int:
        """`F` of a transform whose network `read_network` could not read."""
        raise NotImplementedError

    def call_network(self, x: Tensor, cond: Any) -> Tensor:
        """The output of a network `read_network` could not read, for `(B, F)` inputs in library order."""
        raise NotImplementedError

    def univariate_inverse(self, params: Tensor, z: Tensor) -> Tensor:
        """The elementwise inverse, library layout: `(B, out)` network output and `(B, F)` noise to `(B, F)`."""
        raise NotImplementedError

    def univariate_log_det(self, params: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """`(B,)` log |det dx/dz| of the elementwise inverse at data `x` and noise `z` (library layout)."""
        raise TypeError(f"{self.name}: the adapter does not give the log-determinant of its inverse, so "
                        "log_prob is not available for it")

    def univariate_inverse_and_log_det(self, params: Tensor, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both of the above at once (library layout); override to share their work."""
        return self.univariate_inverse(params, z), self.univariate_log_det(params, x, z)

    # -- the block -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The transform's class name, for messages."""
        return type(self.transform).__name__

    def parameters(self) -> Iterator[nn.Parameter]:
        """The transform's parameters (the solvers check their device and dtype against the noise)."""
        return self.transform.parameters()

    def _check_packable(self) -> None:
        if self.network is None:
            raise ValueError(f"bitwise=False needs a masked network it can read in {self.name}")
        check_sampleable(self.transform, self.name)
        PACKED(self.transform, self.network, ANALYSES(self.transform, self.network, self.name), self.name)

    def snapshot(self) -> "MaskedARBlock":
        """This block for one solve: its masked products (or packed network) read once, now.

        The solvers call it at the start of every solve, so weights updated between solves (by
        an optimizer, or through `p.data` as an EMA does) are always seen; the transform is
        never modified, so other threads may train or sample it meanwhile.

        Raises:
            ValueError: the transform has dropout or batch norm in training mode, or its masks
                changed since this block was made (wrap it again).
        """
        check_sampleable(self.transform, self.name)
        if torch.is_grad_enabled() or self.network is None:
            return self
        analysis = ANALYSES(self.transform, self.network, self.name)
        if not torch.equal(analysis.order, self.order):
            raise ValueError(f"{self.name}'s masks changed since it was wrapped (a state dict with other "
                             "masks loaded?); wrap the flow again")
        solving = copy.copy(self)
        solving._noise, solving._buffers = None, {}
        solving._grouped_agrees = None if self._offers_grouped() else False
        solving._grouped_batch = 0  # the batch size _grouped_agrees was decided at
        if self.bitwise:
            solving._program = DENSE(self.transform, self.network, analysis)
        else:
            solving._program = PACKED(self.transform, self.network, analysis, self.name)
        if not solving._reads_suffixes():
            solving.inverse_map_rows = None  # type: ignore[method-assign]  # the solvers then sweep whole passes
        return solving

    def _reads_suffixes(self) -> bool:
        """Whether `inverse_map_rows` can compute a run of positions alone in this snapshot."""
        program = self._program
        if not (self.univariate_reads_any_features and isinstance(program, DenseProgram) and program.has_final_layer):
            return False
        if self._offers_grouped():  # its sweeps gain from rows apart by skipping the rows nothing reads
            return self.seq_len - self.unread_from >= MIN_UNREAD_SHARE * self.seq_len
        return self._library_runs()

    @property
    def reads_settled(self) -> bool:
        """Whether `inverse_map_rows` reads its `settled` argument: not for a block with a grouped inverse."""
        return not self._offers_grouped()

    def _offers_grouped(self) -> bool:
        return self.bitwise and self.offers_grouped_inverse()

    def _library_runs(self) -> bool:
        """Whether the positions are one run of library features, each feature's parameters together."""
        return (self._identity or self._reversal) and self._feature_major

    def _grouped_for(self, x: Tensor) -> bool:
        """Whether sweeps of `x`'s batch use the grouped layout: proven at the largest batch of the solve."""
        if self._grouped_agrees is not False and x.shape[0] > self._grouped_batch:
            # the exact mode certifies its answer at the largest batch
            self._grouped_agrees = self._program.grouped_is_exact(x.shape[0], x)
            self._grouped_batch = x.shape[0]
        # the grouped sweep may run in place, so not under autograd (Newton's forward mode enables it)
        return bool(self._grouped_agrees) and not torch.is_grad_enabled()

    def _bind(self, cond: Any, batch: int) -> Any:
        if self.context is None:
            return cond
        if cond is not None:
            raise ValueError(f"{self.name} was wrapped with a context; do not also pass cond")
        return self.context.expand(batch, -1)

    def _network_output(self, x: Tensor, cond: Any, reuse: bool = False) -> Tensor:
        """The network's `(B, out)` output (library layout) for the `(B, F)` iterate in our order.

        `reuse`: in a snapshot, the dense network writes into this solve's buffers (the output
        is overwritten by the next such call: for a sweep, whose result is computed from it).
        """
        program = self._program
        if self.network is None:
            return self.call_network(x, self._bind(cond, x.shape[0]))
        if program is None:  # called outside a solve
            analysis = ANALYSES(self.transform, self.network, self.name)
            if not self.bitwise and not torch.is_grad_enabled():
                program = PACKED(self.transform, self.network, analysis, self.name)
            else:
                program = DenseProgram(self.network, analysis)
        if reuse and isinstance(program, DenseProgram) and self._buffers is not None:
            return program(x, self._bind(cond, x.shape[0]), self._buffers)
        return program(x, self._bind(cond, x.shape[0]))

    def _to_order(self, values: Tensor) -> Tensor:
        """Library-order `(B, F)` values in our order."""
        return values if self._identity else take_columns(values, self.order, self._reversal)

    def _to_library(self, values: Tensor) -> Tensor:
        """Our-order `(B, F)` values in library order."""
        return values if self._identity else take_columns(values, self._position, self._reversal)

    def _library_noise(self, z: Tensor) -> Tensor:
        """`(B, T, 1)` noise as `(B, F)` in library order; in a snapshot, reordered once per noise tensor."""
        flat = _flat(z, self.seq_len, "z")
        if self._identity or self._program is None:
            return self._to_library(flat)
        if self._noise is None or self._noise[0] is not z:
            self._noise = (z, self._to_library(flat))
        return self._noise[1]

    def log_det(self, x: Tensor, z: Tensor, cond: Any = None) -> Tensor:
        """`(B,)` log |det dx/dz| of the block's sampling map at its solution `x` for noise `z` (`(B, T, 1)`)."""
        flat_x, flat_z = _flat(x, self.seq_len, "x"), _flat(z, self.seq_len, "z")
        params = self._network_output(flat_x, cond)
        return self.univariate_log_det(params, self._to_library(flat_x), self._to_library(flat_z))

    def inverse_map_and_log_det(self, x: Tensor, z: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """`inverse_map(x, z)` and `log_det(x, z)` from one network evaluation (what a gradient needs)."""
        flat_x = _flat(x, self.seq_len, "x")
        params = self._network_output(flat_x, cond)
        library_z = self._to_library(_flat(z, self.seq_len, "z"))
        new, log_det = self.univariate_inverse_and_log_det(params, library_z, self._to_library(flat_x))
        return self._to_order(new).reshape(x.shape), log_det

    def univariate_partials(self, grouped: Tensor, z: Tensor, x: Tensor, with_log_det: bool) -> TailPartials | None:
        """The elementwise inverse's partial derivatives in closed form, or `None` (autograd reads them).

        `grouped` is the network's output grouped by parameter, `(B, P, F)`, and `z`, `x` are
        `(B, F)`, all with the features in one order (the block's; an elementwise inverse does
        not mind which). An adapter that knows the partials overrides this;
        `tests/test_linearise.py` holds every such override to autograd's.
        """
        return None

    def offers_grouped_inverse(self) -> bool:
        """Whether `grouped_inverse` is available (the default: no)."""
        return False

    def grouped_inverse(self, grouped: Tensor, z: Tensor) -> Tensor:
        """The elementwise inverse from `(B, P, F)` grouped parameters and `(B, F)` noise.

        Features in the block's order, as for `univariate_partials`. An adapter whose
        inverse reads contiguous per-parameter rows faster than its own layout implements
        this with the library's operations in the library's order (so the values are the
        library's) and says so in `offers_grouped_inverse`; a snapshot uses it only where
        the grouped final layer is proven to round as the library's
        (`DenseProgram.grouped_is_exact`) at the largest batch it has swept (where the exact
        mode certifies its answer; smaller batches only move the iterate).
        """
        raise NotImplementedError(f"{type(self).__name__} offers no grouped inverse")

    def linearise(self, x: Tensor, z: Tensor, cond: Any = None, with_log_det: bool = False) -> Any:
        """This block linearised at `x` for the implicit adjoint, its univariate tail differentiated once.

        `None` (autograd through every call) for a network the adapter could not read, or a
        univariate found not to be elementwise: the first linearisation of each transform
        whose partials come from autograd checks that with one random pull.
        """
        if self.network is None or ELEMENTWISE.get(self.transform) is False:
            return None
        flat_x = _flat(x, self.seq_len, "x")
        program = DenseProgram(self.network, self._analysis)  # the masks a solve's snapshot just checked
        grouped = program.grouped(flat_x, self._bind(cond, x.shape[0]), exact=False)
        flat_z = _flat(z, self.seq_len, "z").detach()
        partials = self.univariate_partials(grouped.detach(), flat_z, flat_x.detach(), with_log_det)
        if partials is None:
            partials = self._autograd_partials(grouped, program.rows, flat_z, flat_x.detach(), with_log_det)
            if partials is None:
                return None
        return TailLinearisation(x, grouped, partials, z)

    def _autograd_partials(self, grouped: Tensor, rows: Tensor, z: Tensor, x: Tensor,
                           with_log_det: bool) -> TailPartials | None:
        width = self.network.final.weight.shape[0]

        def tail(p: Tensor, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
            """The library's univariate on its own layout, read and returned in our order."""
            params = p.new_zeros(p.shape[0], width).index_copy(1, rows, p.flatten(1))
            library_z, library_x = self._to_library(z), self._to_library(x)
            if not with_log_det:
                return self._to_order(self.univariate_inverse(params, library_z)), None
            new, log_det = self.univariate_inverse_and_log_det(params, library_z, library_x)
            return self._to_order(new), log_det

        check = self.transform not in ELEMENTWISE
        try:
            partials = autograd_partials(tail, grouped, z, x, with_log_det, check)
        except NotElementwiseError:
            ELEMENTWISE[self.transform] = False
            return None
        ELEMENTWISE[self.transform] = True
        return partials

    def inverse_map(self, x: Tensor, z: Tensor, cond: Any = None) -> Tensor:
        """One sweep of the library's inverse: `(B, T, 1)` iterate and noise to the new iterate."""
        if self._grouped_for(x):
            return self._grouped_sweep(x, z, cond)
        return self._library_sweep(x, z, cond)

    def inverse_map_rows(self, x: Tensor, z: Tensor, cond: Any, start: int, settled: Tensor | None = None,
                         stop: int | None = None) -> Tensor:
        """Rows `[start, stop)` of `inverse_map(x, z, cond)` (`stop` default `T`), computed for those positions only.

        The final layer computes only their outputs (in a snapshot whose positions are one
        run of library features: orders the identity or its reversal, parameters
        feature-major). `settled` (`(B,)`, default `start`): the rows before it are
        final for each sample, so they keep their values and the univariate inverts only the
        others, each as a sample of one feature. A snapshot that sweeps the grouped layout
        computes every feature before `stop` instead, settled or not. The values are the
        library's to rounding: a product of fewer rows, or an elementwise kernel over another
        layout, may round otherwise, so the exact mode certifies an answer found this way with
        `inverse_map`.
        Outside a snapshot: `inverse_map`'s rows.
        """
        stop = self.seq_len if stop is None else stop
        if self._grouped_for(x):
            return self._grouped_rows(x, z, cond, start, stop)
        if not isinstance(self._program, DenseProgram) or self._offers_grouped():
            # outside a snapshot; or a grouped inverse the probe refused, whose elementwise inverse is cheap
            return self.inverse_map(x, z, cond)[:, start:stop]
        features, batch = self.seq_len, x.shape[0]
        span = stop - start
        lo = start if self._identity else features - stop  # library features lo, ..., lo + span - 1
        per_feature = self.network.param_rows.shape[1]
        flat = _flat(x, features, "x")
        params = self._program.output_rows(flat, self._bind(cond, batch), lo * per_feature,
                                           (lo + span) * per_feature, self._buffers)
        if settled is None or bool((settled <= start).all()):  # every element: no gathers
            chosen = params.view(batch, span, per_feature)
            elements = self._library_noise(z)[:, lo:lo + span]
            if not self._identity:  # row r is library feature lo + span - 1 - r
                chosen, elements = chosen.flip(1), elements.flip(1)
            inverted = self.univariate_inverse(chosen.reshape(-1, per_feature), elements.reshape(-1, 1))
            return inverted.view(batch, span, 1)
        # the elements not final yet: flat index `i * span + r` of sample i, row start + r
        todo = (torch.arange(start, stop, device=x.device) >= settled[:, None]).view(-1).nonzero().squeeze(1)
        new = flat[:, start:stop].clone()
        if todo.numel():
            sample, row = todo.div(span, rounding_mode="floor"), todo.remainder(span)
            feature = row if self._identity else span - 1 - row  # library feature lo + feature
            chosen = params.view(batch * span, per_feature).index_select(0, sample * span + feature)
            elements = self._library_noise(z).reshape(-1).index_select(0, sample * features + lo + feature)
            inverted = self.univariate_inverse(chosen, elements.unsqueeze(1)).squeeze(1)
            new.view(-1).index_copy_(0, todo, inverted)
        return new.unsqueeze(-1)

    def _grouped_rows(self, x: Tensor, z: Tensor, cond: Any, start: int, stop: int) -> Tensor:
        """Rows `[start, stop)` of a grouped sweep: the final layer computes the features before `stop`.

        The rows before `start` are computed too, so every sweep of a segment has one product
        shape and rounds alike; `settled` is not read. Rows no row reads are computed once:
        the final layer computes just those.
        """
        lo = start if start >= self.unread_from else 0
        flat = _flat(x, self.seq_len, "x")
        grouped = self._program.grouped_range(flat, self._bind(cond, x.shape[0]), lo, stop, self._buffers)
        new = self.grouped_inverse(grouped, _flat(z, self.seq_len, "z")[:, lo:stop])
        return new[:, start - lo:].unsqueeze(-1)

    def _library_sweep(self, x: Tensor, z: Tensor, cond: Any) -> Tensor:
        params = self._network_output(_flat(x, self.seq_len, "x"), cond, reuse=True)
        return self._to_order(self.univariate_inverse(params, self._library_noise(z))).reshape(x.shape)

    def _grouped_sweep(self, x: Tensor, z: Tensor, cond: Any) -> Tensor:
        grouped = self._program.grouped(_flat(x, self.seq_len, "x"), self._bind(cond, x.shape[0]), self._buffers)
        return self.grouped_inverse(grouped, _flat(z, self.seq_len, "z")).reshape(x.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, features={self.seq_len})"


class MaskedAffineBlock(MaskedARBlock):
    r"""A masked transform whose inverse is affine, $x = \exp(\log\sigma)\, z + \mu$, for the metrics.

    Subclasses also implement `univariate_affine` and set `shift_scale`, the parameter
    indices (columns of the network's `param_rows`) of the shift and the raw scale, so that
    `affine` (IGM) and `output_projection` (CRM) work. The solvers still iterate
    `inverse_map`, computed as the library computes it.
    """

    shift_scale: tuple[int, int] = (0, 1)

    def univariate_affine(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """`(B, out)` network output to the library-order `(mu, log_sigma)`, each `(B, F)`."""
        raise NotImplementedError

    def univariate_log_det(self, params: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """The sum of `log_sigma`: `x = exp(log_sigma) z + mu` elementwise."""
        return self.univariate_affine(params)[1].sum(1)

    def affine(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """`(mu, log_sigma)` of `x = exp(log_sigma) z + mu`, each `(B, T, 1)` in our order."""
        mu, log_sigma = self.univariate_affine(self._network_output(_flat(x, self.seq_len, "x"), cond))
        return self._to_order(mu).unsqueeze(-1), self._to_order(log_sigma).unsqueeze(-1)

    def output_projection(self) -> tuple[Tensor, Tensor]:
        """`(W_shift, W_scale)`: the masked rows of the last layer that produce the shift and the raw scale.

        `mu` and `log_sigma` are smooth functions of these two linear outputs, so these are
        the matrices a CRM-style contractivity estimate reads; each is `(T, hidden)`, rows
        in our order.
        """
        final = self.network.final
        weight = final.weight * final.mask
        rows = self.network.param_rows.to(self.order.device)[self.order]
        shift, scale = self.shift_scale
        return weight[rows[:, shift]], weight[rows[:, scale]]


class ElementwiseInverseBlock(MaskedARBlock):
    """A transform laid out as nflows' `AutoregressiveTransform` (normflows' `Autoregressive` ports it).

    Its network is `autoregressive_net(x, context)` and its elementwise inverse
    `_elementwise_inverse(z, params)` returns `(x, log|det dx/dz|)`: the network call, the
    inverse and its log-determinant are read from them. Subclasses still implement
    `read_network` and `opaque_features`.
    """

    def call_network(self, x: Tensor, cond: Any) -> Tensor:
        return self.transform.autoregressive_net(x, cond)

    def univariate_inverse(self, params: Tensor, z: Tensor) -> Tensor:
        """The library's `_elementwise_inverse(z, params)`, its log-determinant dropped."""
        return self.transform._elementwise_inverse(z, params)[0]

    def univariate_log_det(self, params: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """The log-determinant of the library's `_elementwise_inverse(z, params)`."""
        return self.transform._elementwise_inverse(z, params)[1]

    def univariate_inverse_and_log_det(self, params: Tensor, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """The library's `_elementwise_inverse(z, params)`, called once."""
        return self.transform._elementwise_inverse(z, params)
