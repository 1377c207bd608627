r"""A masked block linearised at its solution, its elementwise tail differentiated once.

A masked transform's inverse update is $F(x) = u(p(x), z)$: a network $p$ (all the
dependence on $x$ and the weights) and a univariate inverse $u$ acting feature by feature
(each output feature reads only its own parameters and noise). The adjoint iterates
$\lambda \leftarrow g + (\partial F/\partial x)^\top \lambda$ several times per block; through
autograd, each iteration would differentiate the univariate tail again (a dozen elementwise
kernels for zuko's affine transform, a split's concatenation, more for splines). Here the
tail's partial derivatives $\partial u/\partial p$, $\partial u/\partial z$ (and those of the
log-determinant) are read once, by one backward pass with unit seeds (exact because each
output reads a disjoint set of inputs) or in closed form where the adapter knows them
(`univariate_partials`), and every iteration is one multiply and one backward pass through
the network alone. The network is evaluated for this with its final rows grouped by
parameter, `(B, P, F)`, so that multiply broadcasts each feature's adjoint over contiguous
rows instead of over an innermost axis of length `P` (several times slower on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["TailLinearisation", "TailPartials", "NotElementwiseError", "autograd_partials"]


class NotElementwiseError(ValueError):
    """A univariate tail's output read parameters or noise of other features: it is not elementwise."""


def _partials(output: Tensor, leaves: list[Tensor]) -> list[Tensor | None]:
    """Per-element partial derivatives of an elementwise `output` w.r.t. `leaves` (`None` where unused)."""
    return list(torch.autograd.grad(output, leaves, torch.ones_like(output), retain_graph=True, allow_unused=True))


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


@dataclass
class TailPartials:
    """A univariate tail at one point: its log-determinant and per-element partial derivatives.

    Features in the block's order throughout. The network's outputs are **grouped by
    parameter**: `du_dp` and `dl_dp` are `(B, P, F)`, `[:, k, t]` the partial w.r.t.
    parameter `k` of the feature at position `t` (so a per-feature factor broadcasts over
    contiguous rows); the others are `(B, F)`. `None` where the tail does not read that
    input (or no log-determinant was asked for).
    """

    du_dp: Tensor
    du_dz: Tensor | None
    log_det: Tensor | None = None
    dl_dp: Tensor | None = None
    dl_dz: Tensor | None = None
    dl_dx: Tensor | None = None


def autograd_partials(tail: Any, grouped: Tensor, z: Tensor, x: Tensor, with_log_det: bool,
                      check: bool = False) -> TailPartials:
    """The partials of `tail(p, z, x) -> (new, log_det)` at the `(B, P, F)` parameters, by unit seeds.

    `tail` takes the parameters grouped as given. Unit seeds read every partial only if each
    output feature reads its own parameters and noise alone; `check` verifies that with one
    random pull and raises `NotElementwiseError`.
    """
    p = grouped.detach().requires_grad_(True)
    z = z.detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        new, log_det = tail(p, z, x)
        du_dp, du_dz = _partials(new, [p, z])
        partials = TailPartials(torch.zeros_like(p) if du_dp is None else du_dp, du_dz)
        if check:
            _check_elementwise(new, p, z, partials)
        if with_log_det:
            partials.log_det = log_det.detach()
            partials.dl_dp, partials.dl_dz, partials.dl_dx = _partials(log_det, [p, z, x])
    return partials


def _check_elementwise(new: Tensor, p: Tensor, z: Tensor, partials: TailPartials) -> None:
    """Raise `NotElementwiseError` unless one random pull through the tail equals the partials' pull."""
    seed = torch.randn(new.shape, dtype=new.dtype, device=new.device, generator=_generator(new.device))
    on_p, on_z = torch.autograd.grad(new, [p, z], seed, retain_graph=True, allow_unused=True)
    tol = 1e3 * torch.finfo(new.dtype).eps
    pulls = [(on_p, seed.unsqueeze(1) * partials.du_dp)]
    if partials.du_dz is not None:
        pulls.append((on_z, seed * partials.du_dz))
    for got, expected in pulls:
        if got is None or not got.numel():
            continue
        if not bool(torch.isfinite(got).all()) or float((got - expected).abs().max()) > tol * (1 + float(expected.abs().max())):
            raise NotElementwiseError("the univariate transform is not elementwise (an output feature reads "
                                      "another feature's parameters or noise)")


class TailLinearisation:
    """The network's graph at `x` and the univariate tail's partial derivatives there.

    Arguments:
        x: the `(B, T, 1)` leaf the network's output was computed from.
        grouped: the network's `(B, P, F)` output grouped by parameter (see
            [`TailPartials`][arflow_solvers.adapters._masked.linearise.TailPartials]), with
            its graph to `x`, context and weights.
        partials: the tail's partial derivatives at `grouped`.
        z: the `(B, T, 1)` noise leaf.
    """

    def __init__(self, x: Tensor, grouped: Tensor, partials: TailPartials, z: Tensor):
        self.x, self.grouped, self.z, self.partials = x, grouped, z, partials
        self.log_det = partials.log_det
        self._constant: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    def _log_det_pull(self, g_log_det: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The log-determinant's constant pull on the parameters and, explicitly, on `x` (our order)."""
        if g_log_det is None or self.log_det is None:
            return None, None
        if self._constant is None or self._constant[0] is not g_log_det:
            weight, partials = g_log_det.unsqueeze(1), self.partials
            on_params = None if partials.dl_dp is None else weight.unsqueeze(2) * partials.dl_dp
            on_x = None if partials.dl_dx is None else (weight * partials.dl_dx).reshape(self.x.shape)
            self._constant = (g_log_det, on_params, on_x)
        return self._constant[1], self._constant[2]

    def _seed(self, lam: Tensor, g_log_det: Tensor | None) -> Tensor:
        """`dL/dp`, `(B, P, F)`: the adjoint times each parameter's partial, plus the log-determinant's pull."""
        on_params, _ = self._log_det_pull(g_log_det)
        per_feature = lam.reshape(lam.shape[0], 1, -1)
        if on_params is None:
            return per_feature * self.partials.du_dp
        return torch.addcmul(on_params, per_feature, self.partials.du_dp)

    def pull_x(self, lam: Tensor, g_log_det: Tensor | None) -> Tensor | None:
        (pulled,) = torch.autograd.grad(self.grouped, self.x, self._seed(lam, g_log_det), retain_graph=True,
                                        allow_unused=True)
        _, explicit = self._log_det_pull(g_log_det)
        if explicit is not None:
            pulled = explicit if pulled is None else pulled + explicit
        return pulled

    def pull(self, lam: Tensor, g_log_det: Tensor | None, targets: list[Tensor]) -> list[Tensor | None]:
        through_network = [t for t in targets if t is not self.z]
        found = iter(torch.autograd.grad(self.grouped, through_network, self._seed(lam, g_log_det),
                                         allow_unused=True) if through_network else ())
        return [next(found) if target is not self.z else self._pull_z(lam, g_log_det) for target in targets]

    def _pull_z(self, lam: Tensor, g_log_det: Tensor | None) -> Tensor:
        flat_lam = lam.reshape(lam.shape[0], -1)
        partials = self.partials
        dz = torch.zeros_like(flat_lam) if partials.du_dz is None else flat_lam * partials.du_dz
        if g_log_det is not None and partials.dl_dz is not None:
            dz = dz + g_log_det.unsqueeze(1) * partials.dl_dz
        return dz.reshape(self.z.shape)
