"""sbi posteriors sampled with their flow's autoregressive inverses solved by Jacobi.

`DirectPosterior.sample((n,), x=x_o)` draws from the trained density estimator (an nflows or
zuko flow) and rejects the samples outside the prior's support, drawing again until `n` are
accepted. [`sample`][arflow_solvers.adapters.sbi.sample] runs that same procedure, sbi's own
rejection loop included, with the estimator's draws made by
[`adapters.nflows.sample`][arflow_solvers.adapters.nflows.sample] or
[`adapters.zuko.sample`][arflow_solvers.adapters.zuko.sample]: the same noise, the same
context embedding, the autoregressive inverses solved by the plan. The exact plan
`Jacobi(tol=0.0)` returns `posterior.sample`'s samples bit for bit.

Supported estimators: sbi's nflows flows (`"maf"`, `"maf_rqs"`, and any other nflows flow;
coupling layers are run by nflows) and zuko flows (`"zuko_maf"`, `"zuko_nsf"`, and every
zuko flow of `MaskedAutoregressiveTransform`s).

References:
    Automatic Posterior Transformation for Likelihood-free Inference (Greenberg et al., 2019),
    https://arxiv.org/abs/1905.07488

    Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
    https://arxiv.org/abs/1705.07057
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Size, Tensor

from arflow_solvers import Jacobi

try:
    from sbi.inference.posteriors.direct_posterior import DirectPosterior
    from sbi.neural_nets.estimators.nflows_flow import NFlowsFlow
    from sbi.neural_nets.estimators.shape_handling import reshape_to_batch_event
    from sbi.neural_nets.estimators.zuko_flow import ZukoFlow
    from sbi.samplers.rejection import rejection
    from sbi.utils.sbiutils import warn_if_outside_prior_support, within_support
except ImportError as error:  # pragma: no cover - exercised only without sbi
    raise ImportError("arflow_solvers.adapters.sbi needs sbi: pip install 'arflow-solvers[sbi]'") from error

__all__ = ["proposal", "sample"]


def proposal(estimator: Any, plan: Any, *, bitwise: bool = True) -> Callable[..., Tensor]:
    """`estimator.sample(sample_shape, condition)` with the flow's autoregressive inverses solved by `plan`.

    Arguments:
        estimator: sbi's `NFlowsFlow` or `ZukoFlow` (a posterior's `posterior_estimator`).
        plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver.
        bitwise: `False` evaluates the masked networks packed.

    Raises:
        TypeError: another estimator; the message names it and says what is supported.
    """
    if isinstance(estimator, NFlowsFlow):
        from .nflows import sample as nflows_sample

        def draw(sample_shape: Sequence[int], condition: Tensor) -> Tensor:
            count = Size(sample_shape).numel()
            samples = nflows_sample(estimator.net, count, plan, context=condition, bitwise=bitwise)
            return samples.transpose(0, 1).reshape(*sample_shape, condition.shape[0], *estimator.input_shape)

        return draw
    if isinstance(estimator, ZukoFlow):
        from .zuko import sample as zuko_sample

        def draw(sample_shape: Sequence[int], condition: Tensor) -> Tensor:
            with torch.no_grad():
                embedded = estimator._embedding_net(condition)
            return zuko_sample(estimator.net, Size(sample_shape), plan, embedded, bitwise=bitwise)

        return draw
    raise TypeError(f"{type(estimator).__name__} is not supported: arflow_solvers.adapters.sbi samples sbi's "
                    "nflows flows (NFlowsFlow: 'maf', 'maf_rqs', ...) and zuko flows (ZukoFlow: 'zuko_maf', "
                    "'zuko_nsf', ...)")


def sample(posterior: DirectPosterior, sample_shape: Sequence[int] = (), x: Tensor | None = None,
           plan: Any = None, *, bitwise: bool = True, reject_outside_prior: bool = True,
           max_sampling_batch_size: int = 10_000, show_progress_bars: bool = False) -> Tensor:
    """`posterior.sample(sample_shape, x=x)`, with the flow's autoregressive inverses solved by `plan`.

    The same shapes (`(n, D)` for `n = prod(sample_shape)` samples), the same rejection of
    samples outside the prior's support (sbi's own loop, in batches of
    `max_sampling_batch_size`), the same noise for the same seed.

    Arguments:
        posterior: an sbi `DirectPosterior` (what `NPE(...).build_posterior()` returns).
        sample_shape: the sample shape, as sbi takes it.
        x: the observation `x_o`; `None` uses the posterior's default `x`.
        plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver; `None` is the
            exact mode `Jacobi(tol=0.0)`.
        bitwise: `False` evaluates the masked networks packed.
        reject_outside_prior: reject samples outside the prior's support (sbi's default).
        max_sampling_batch_size: the largest batch drawn at once.
        show_progress_bars: show sbi's progress bar.

    Raises:
        TypeError: `posterior` is not a `DirectPosterior`, or its estimator is not supported.
        ValueError: `x` holds more than one observation (use one `x_o` at a time).
    """
    if not isinstance(posterior, DirectPosterior):
        raise TypeError(f"posterior must be an sbi DirectPosterior; got {type(posterior).__name__}")
    estimator = posterior.posterior_estimator
    draw = proposal(estimator, Jacobi(tol=0.0) if plan is None else plan, bitwise=bitwise)
    count = Size(sample_shape).numel()
    x = reshape_to_batch_event(posterior._x_else_default_x(x), event_shape=estimator.condition_shape)
    if x.shape[0] > 1:
        raise ValueError(f"x must hold one observation; got a batch of {x.shape[0]}")
    if reject_outside_prior:
        samples = rejection.accept_reject_sample(
            proposal=draw,
            accept_reject_fn=lambda theta: within_support(posterior.prior, theta),
            num_samples=count,
            show_progress_bars=show_progress_bars,
            max_sampling_batch_size=max_sampling_batch_size,
            proposal_sampling_kwargs={"condition": x},
        )[0]
    else:
        samples = draw(Size([count]), condition=x)
        warn_if_outside_prior_support(posterior.prior, samples[:, 0])
    return samples[:, 0]
