"""MADE blocks and a small MAF, in torch only, ready for the solvers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from arflow_solvers.density import standard_normal_log_prob
from arflow_solvers.flow import Flow, Permute

__all__ = ["MADE", "MAF", "MaskedLinear", "hidden_degrees"]



def hidden_degrees(width: int, features: int) -> Tensor:
    """Degrees of a hidden layer: `1, 2, ..., features - 1` cycled over `width` units.

    A hidden unit of degree `d` may read inputs `1..d` (1-based), so no hidden unit sees the
    last input and every output `t` reads only inputs `< t`.

    Examples:
        >>> hidden_degrees(5, 3).tolist()
        [1, 2, 1, 2, 1]
    """
    if features == 1:
        return torch.zeros(width, dtype=torch.long)
    return torch.arange(width) % (features - 1) + 1


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask.

    Arguments:
        in_degrees: `(in_features,)` degrees of the inputs.
        out_degrees: `(out_features,)` degrees of the outputs.
        strict: output `j` reads input `i` iff `out_degrees[j] > in_degrees[i]` (the output
            layer); otherwise iff `>=` (hidden layers).
    """

    def __init__(self, in_degrees: Tensor, out_degrees: Tensor, *, strict: bool):
        super().__init__(len(in_degrees), len(out_degrees))
        relation = torch.gt if strict else torch.ge
        mask = relation(out_degrees[:, None], in_degrees[None, :]).to(self.weight.dtype)
        self.register_buffer("mask", mask)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # older state dicts also hold the output degrees as `degrees`: ignored, the mask encodes them
        state_dict.pop(prefix + "degrees", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def masked_weight(self) -> Tensor:
        """The effective weight, `weight * mask`."""
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class _ResidualBlock(nn.Module):
    """`h + L2(act(L1(act(h))))` with masks that keep the degrees of `h`."""

    def __init__(self, degrees: Tensor, activation: nn.Module):
        super().__init__()
        self.first = MaskedLinear(degrees, degrees, strict=False)
        self.second = MaskedLinear(degrees, degrees, strict=False)
        nn.init.uniform_(self.second.weight, -1e-3, 1e-3)
        nn.init.uniform_(self.second.bias, -1e-3, 1e-3)
        self.activation = activation

    def forward(self, h: Tensor) -> Tensor:
        return h + self.second(self.activation(self.first(self.activation(h))))


def _as_order(order: Sequence[int] | Tensor | None, features: int) -> Tensor:
    """Validate `order` as a permutation of `range(features)` (`None`: the identity)."""
    if order is None:
        return torch.arange(features)
    order = torch.as_tensor(order, dtype=torch.long).flatten()
    if len(order) != features or not torch.equal(order.sort().values, torch.arange(features)):
        raise ValueError(
            f"order must be a permutation of range(features={features}); got {order.tolist()}"
        )
    return order


def _trim(values: Sequence[int], shown: int = 6) -> str:
    values = list(values)
    text = ", ".join(map(str, values[:shown]))
    return f"[{text}{', ...' if len(values) > shown else ''}]"


class MADE(nn.Module):
    r"""A masked autoencoder whose outputs are the shift and log-scale of an affine AR block.

    Over the `T = features` dimensions of a data vector, visited in `order`, it computes
    $(\mu_t, \alpha_t)$ from the dimensions before `t` in that order, and defines the block

    $$x_t = \exp(\alpha_t)\, z_t + \mu_t \quad\text{(sampling)},\qquad
      z_t = (x_t - \mu_t) \exp(-\alpha_t) \quad\text{(density)}.$$

    As an [`AffineARBlock`][arflow_solvers.AffineARBlock] it works on sequences in its own
    order: `affine(x)` takes `(B, T, 1)` with `x[:, t]` the `t`-th visited dimension, so
    `T = features` and `D = 1`. The data-space methods ([`forward`][arflow_solvers.adapters.made.MADE.forward],
    [`log_prob`][arflow_solvers.adapters.made.MADE.log_prob]) take `(B, features)` vectors and apply `order`
    themselves; [`as_flow`][arflow_solvers.adapters.made.MADE.as_flow] adds the permutations for sampling.

    References:
        MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015),
        https://arxiv.org/abs/1502.03509

        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        https://arxiv.org/abs/1705.07057

    Arguments:
        features: `T`, the dimension of the data.
        hidden_features: widths of the hidden layers (an int for one layer).
        order: the order in which dimensions are visited, a permutation of
            `range(features)`; `None` is `0, 1, ..., T-1`.
        residual_blocks: residual blocks (two masked layers each, as in nflows) after the
            hidden layers, at the width of the last one.
        context_features: size of a conditioning vector `cond` `(B, C)`, added to the first
            hidden layer; `None` for an unconditional block.
        activation: the nonlinearity module (default `nn.ReLU()`).

    Examples:
        >>> import torch
        >>> from arflow_solvers import AffineARBlock
        >>> made = MADE(4, hidden_features=[16, 16])
        >>> isinstance(made, AffineARBlock), made.seq_len
        (True, 4)
        >>> mu, log_sigma = made.affine(torch.zeros(2, 4, 1))
        >>> tuple(mu.shape), tuple(log_sigma.shape)
        ((2, 4, 1), (2, 4, 1))
    """

    def __init__(
        self,
        features: int,
        hidden_features: int | Sequence[int] = (512,),
        *,
        order: Sequence[int] | Tensor | None = None,
        residual_blocks: int = 0,
        context_features: int | None = None,
        activation: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be an int >= 1; got {features!r}")
        widths = [hidden_features] if isinstance(hidden_features, int) else list(hidden_features)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(
                f"hidden_features must be a positive int or a non-empty list of them; "
                f"got {hidden_features!r}"
            )
        if not isinstance(residual_blocks, int) or residual_blocks < 0:
            raise ValueError(f"residual_blocks must be an int >= 0; got {residual_blocks!r}")
        if context_features is not None and (
            not isinstance(context_features, int) or context_features < 1
        ):
            raise ValueError(f"context_features must be None or an int >= 1; got {context_features!r}")
        self.features = features
        self.seq_len = features
        self.hidden_features = tuple(widths)
        self.context_features = context_features
        self.activation = activation if activation is not None else nn.ReLU()
        self.register_buffer("order", _as_order(order, features))

        degrees = torch.arange(1, features + 1)
        layers = []
        for width in widths:
            out = hidden_degrees(width, features)
            layers.append(MaskedLinear(degrees, out, strict=False))
            degrees = out
        self.hidden = nn.ModuleList(layers)
        self.residual = nn.ModuleList(
            _ResidualBlock(degrees, self.activation) for _ in range(residual_blocks)
        )
        self.context = nn.Linear(context_features, widths[0]) if context_features else None
        targets = torch.arange(1, features + 1)
        self.output = MaskedLinear(degrees, torch.cat([targets, targets]), strict=True)

    # -- the AR block ---------------------------------------------------------------------

    def network(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`(B, T)` inputs in block order to `(mu, alpha)`, each `(B, T)`."""
        h = self.hidden[0](x)
        if self.context is not None:
            if cond is None:
                raise ValueError("this MADE is conditional: pass cond of shape (B, context_features)")
            h = h + self.context(cond)
        h = self.activation(h)
        for layer in self.hidden[1:]:
            h = self.activation(layer(h))
        for block in self.residual:
            h = block(h)
        out = self.output(h)
        return out[:, : self.features], out[:, self.features :]

    def affine(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`(mu, log_sigma)` of the sampling map `x = exp(log_sigma) z + mu`.

        Arguments:
            x: `(B, T, 1)` the iterate, in block order.
            cond: `(B, context_features)` or `None`.

        Returns:
            `(mu, log_sigma)`, each `(B, T, 1)`; row `t` reads only `x[:, :t]`.
        """
        if x.dim() != 3 or x.shape[1] != self.features or x.shape[2] != 1:
            raise ValueError(f"x must have shape (B, {self.features}, 1); got {tuple(x.shape)}")
        mu, alpha = self.network(x.reshape(x.shape[0], self.features), cond)
        return mu.unsqueeze(-1), alpha.unsqueeze(-1)

    def output_projection(self) -> tuple[Tensor, Tensor]:
        """`(W_mu, W_log_sigma)`, the masked output weights, each `(T, hidden)`."""
        weight = self.output.masked_weight()
        return weight[: self.features], weight[self.features :]

    # -- the density direction ------------------------------------------------------------

    def _check_data(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"x must have shape (B, {self.features}); got {tuple(x.shape)}")

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to noise: `(B, features)` to `(u, log|det du/dx|)`, `u` in data coordinates."""
        self._check_data(x)
        seq = x[:, self.order]
        mu, alpha = self.network(seq, cond)
        u = (seq - mu) * torch.exp(-alpha)
        return u[:, torch.argsort(self.order)], -alpha.sum(dim=1)

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """`(B,)` log-density of `(B, features)` data under a standard normal base."""
        u, log_det = self(x, cond)
        return standard_normal_log_prob(u) + log_det

    def as_flow(self) -> Flow:
        """The block in sampling order, with the permutations to and from data coordinates."""
        return Flow(_sampling_steps([self]))

    def extra_repr(self) -> str:
        text = f"features={self.features}, hidden_features={list(self.hidden_features)}"
        if not torch.equal(self.order, torch.arange(self.features)):
            text += f", order={_trim(self.order.tolist())}"
        if len(self.residual):
            text += f", residual_blocks={len(self.residual)}"
        if self.context_features:
            text += f", context_features={self.context_features}"
        return text


def _compose(first: Tensor, second: Tensor) -> Tensor:
    """`x[:, first][:, second] == x[:, first[second]]`."""
    return first[second]


def _sampling_steps(mades: Sequence[MADE]) -> list:
    """Steps that invert `mades` (listed in density order) from noise to data.

    Each block solves in its own order, so between blocks the data is permuted from one
    block's order to the next; consecutive permutations are merged, identities dropped.
    """
    steps: list = []
    pending: Tensor | None = None  # permutation still to apply, data -> current coordinates
    for made in reversed(mades):
        order = made.order.cpu()
        pending = order if pending is None else _compose(pending, order)
        if not torch.equal(pending, torch.arange(len(pending))):
            steps.append(Permute(pending))
        steps.append(made)
        pending = torch.argsort(order)
    if pending is not None and not torch.equal(pending, torch.arange(len(pending))):
        steps.append(Permute(pending))
    return steps


class MAF(nn.Module):
    r"""A masked autoregressive flow: MADE blocks whose orders alternate, trained by likelihood.

    Density direction: data `x` goes through block 1, 2, ..., K to the noise `u`; the log
    density is $\log N(u; 0, I) + \sum_k \log|\det \partial u_k / \partial u_{k-1}|$. Block
    `k` visits dimensions in natural order for even `k` and reversed for odd `k` (the MAF
    paper's reversal between layers); pass `orders` to choose them.

    [`as_flow`][arflow_solvers.adapters.made.MAF.as_flow] returns the blocks in **sampling order** (block 0
    of a plan is the last MADE of the density direction).

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        https://arxiv.org/abs/1705.07057

    Arguments:
        features: dimension of the data.
        num_layers: how many MADE blocks.
        hidden_features: hidden widths of every MADE.
        residual_blocks: residual blocks per MADE.
        context_features: conditioning size (`None`: unconditional).
        orders: one order per layer; `None` alternates natural and reversed.

    Examples:
        >>> import torch
        >>> from arflow_solvers import Jacobi, solve_inverse
        >>> _ = torch.manual_seed(0)
        >>> maf = MAF(5, num_layers=2, hidden_features=[16]).double()
        >>> z = torch.randn(3, 5, 1, dtype=torch.float64)
        >>> x = solve_inverse(maf.as_flow(), z, Jacobi(tol=0.0))
        >>> u, _ = maf.transform(x.squeeze(-1))
        >>> bool(torch.allclose(u, z.squeeze(-1)))
        True
    """

    def __init__(
        self,
        features: int,
        num_layers: int = 5,
        hidden_features: int | Sequence[int] = (512,),
        *,
        residual_blocks: int = 0,
        context_features: int | None = None,
        orders: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1; got {num_layers!r}")
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be an int >= 1; got {features!r}")
        if orders is None:
            natural = list(range(features))
            orders = [natural if k % 2 == 0 else natural[::-1] for k in range(num_layers)]
        if len(orders) != num_layers:
            raise ValueError(f"orders must have num_layers={num_layers} entries; got {len(orders)}")
        self.features = features
        self.layers = nn.ModuleList(
            MADE(
                features,
                hidden_features,
                order=order,
                residual_blocks=residual_blocks,
                context_features=context_features,
            )
            for order in orders
        )

    def transform(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to noise: `(B, features)` to `(u, log|det du/dx|)`."""
        log_det = x.new_zeros(x.shape[0])
        for made in self.layers:
            x, ld = made(x, cond)
            log_det = log_det + ld
        return x, log_det

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """The `(B,)` log-density of `(B, features)` data (same as `log_prob`)."""
        return self.log_prob(x, cond)

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """`(B,)` log-density of `(B, features)` data; maximise it to train."""
        u, log_det = self.transform(x, cond)
        return standard_normal_log_prob(u) + log_det

    def as_flow(self) -> Flow:
        """The MAF in sampling order: permutations between the MADE blocks, last MADE first."""
        return Flow(_sampling_steps(list(self.layers)))

    @torch.no_grad()
    def sample(self, num_samples: int, plan: Any = None, cond: Tensor | None = None) -> Tensor:
        """`(num_samples, features)` samples, inverted with `plan` (default: `Jacobi()`).

        Arguments:
            num_samples: how many samples; `cond`, if given, must have that many rows.
            plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver.
            cond: `(num_samples, context_features)` or `None`.
        """
        return self._sample(num_samples, plan, cond, with_log_prob=False)[0]

    def rsample(self, num_samples: int, plan: Any = None, cond: Tensor | None = None, *,
                adjoint_tol: float = 0.0) -> Tensor:
        """`sample` with gradients w.r.t. the parameters (and `cond`), by the implicit adjoint of each block.

        Arguments:
            num_samples: how many samples; `cond`, if given, must have that many rows.
            plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver (default `Jacobi()`).
            cond: `(num_samples, context_features)` or `None`.
            adjoint_tol: relative tolerance of the backward solves (`0`: to their exactness bound).
        """
        return self._sample(num_samples, plan, cond, with_log_prob=False, adjoint_tol=adjoint_tol)[0]

    def rsample_and_log_prob(self, num_samples: int, plan: Any = None, cond: Tensor | None = None, *,
                             adjoint_tol: float = 0.0) -> tuple[Tensor, Tensor]:
        """`rsample` and the `(num_samples,)` log-density of the samples, both differentiable.

        Examples:
            >>> import torch
            >>> _ = torch.manual_seed(0)
            >>> maf = MAF(4, num_layers=2, hidden_features=[8])
            >>> x, log_q = maf.rsample_and_log_prob(16)
            >>> bool(torch.allclose(log_q, maf.log_prob(x), atol=1e-4))
            True
        """
        x, log_prob = self._sample(num_samples, plan, cond, with_log_prob=True, adjoint_tol=adjoint_tol)
        return x, log_prob

    def _sample(self, num_samples: int, plan: Any, cond: Tensor | None, *, with_log_prob: bool,
                adjoint_tol: float = 0.0) -> tuple[Tensor, Tensor | None]:
        from arflow_solvers import Jacobi, solve

        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
        reference = next(self.parameters())
        z = torch.randn(num_samples, self.features, 1, dtype=reference.dtype, device=reference.device)
        solution = solve(self.as_flow(), z, Jacobi() if plan is None else plan, cond=cond,
                         adjoint_tol=adjoint_tol, log_prob=with_log_prob)
        return solution.x.squeeze(-1), solution.log_prob
