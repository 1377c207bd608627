"""nflows flows as solver-ready flows: MAF blocks solved by Jacobi, everything else by nflows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from arflow_solvers import Flow, solve

try:
    from nflows.flows.base import Flow as NflowsFlow
    from nflows.transforms.autoregressive import AutoregressiveTransform
    from nflows.transforms.base import CompositeTransform, InverseTransform, Transform
    from nflows.transforms.normalization import BatchNorm
except ImportError as error:  # pragma: no cover - exercised only without nflows
    raise ImportError(
        "arflow_solvers.adapters.nflows needs nflows: pip install 'arflow-solvers[nflows]'"
    ) from error

from .._checkpoint import load_checkpoint
from .blocks import NflowsAffineBlock, NflowsARBlock, NflowsStep, ar_block

__all__ = ["NflowsARBlock", "NflowsAffineBlock", "NflowsStep", "wrap", "sample", "rsample", "rsample_and_log_prob",
           "ar_block", "build_maf", "load_for_planning"]


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
    masked zeros (see [`NflowsAffineBlock`][arflow_solvers.adapters.nflows.NflowsAffineBlock]):
    cheaper per pass, equal to nflows to float rounding instead of bit for bit.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        https://arxiv.org/abs/1705.07057

        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Arguments:
        flow_or_transform: an `nflows.flows.Flow` (its `_transform` is wrapped) or any
            `nflows.transforms.Transform`.
        bitwise: evaluate MAF's blocks exactly as nflows does (default) or packed.

    Examples:
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
    with torch.no_grad():
        samples, _, solution = _sample(flow, num_samples, plan, context, bitwise=bitwise, throw=throw)
    return (samples, solution) if return_solution else samples


def rsample(flow: NflowsFlow, num_samples: int, plan: Any, context: Tensor | None = None, *,
            bitwise: bool = True, adjoint_tol: float = 0.0, return_solution: bool = False,
            throw: bool = True) -> Any:
    """`flow.sample(num_samples, context)` with gradients: differentiable w.r.t. the parameters and context.

    nflows' `sample` records a graph through every network pass of every autoregressive
    inverse; here each inverse is solved by `plan` and differentiated by its implicit adjoint
    (see [`arflow_solvers.adjoint`][arflow_solvers.adjoint]): memory of one network
    evaluation per transform. Shapes and noise as in [`sample`][arflow_solvers.adapters.nflows.sample].

    Arguments:
        flow: the nflows `Flow`.
        num_samples: samples per context row (or in all, without context).
        plan: a [`Plan`][arflow_solvers.Plan], a plan string or one solver.
        context: `(C, ...)` context or `None`.
        bitwise: `False` evaluates MAF's blocks on packed MADEs in the forward solves.
        adjoint_tol: relative tolerance of the backward solves (`0`: to their exactness bound).
        return_solution: also return the [`Solution`][arflow_solvers.Solution].
        throw: raise if the result is not finite.

    Returns:
        The samples, or `(samples, solution)`.
    """
    samples, _, solution = _sample(flow, num_samples, plan, context, bitwise=bitwise, throw=throw,
                                   adjoint_tol=adjoint_tol)
    return (samples, solution) if return_solution else samples


def rsample_and_log_prob(flow: NflowsFlow, num_samples: int, plan: Any, context: Tensor | None = None, *,
                         bitwise: bool = True, adjoint_tol: float = 0.0, return_solution: bool = False,
                         throw: bool = True) -> Any:
    """`flow.sample_and_log_prob(num_samples, context)`, both outputs differentiable.

    The log-density is the base distribution's log-density of the noise minus every
    transform's log-determinant at the solution. Arguments as for
    [`rsample`][arflow_solvers.adapters.nflows.rsample].

    Returns:
        `(samples, log_prob)`: `(num_samples, D)` and `(num_samples,)`, or with context
        `(C, num_samples, D)` and `(C, num_samples)`; or `(samples, log_prob, solution)`.
    """
    samples, log_prob, solution = _sample(flow, num_samples, plan, context, bitwise=bitwise, throw=throw,
                                          adjoint_tol=adjoint_tol, with_log_prob=True)
    return (samples, log_prob, solution) if return_solution else (samples, log_prob)


def _sample(flow: NflowsFlow, num_samples: int, plan: Any, context: Tensor | None, *, bitwise: bool,
            throw: bool, adjoint_tol: float = 0.0, with_log_prob: bool = False) -> tuple:
    """nflows' `Flow.sample` (and `sample_and_log_prob`) step by step, the inverses solved by `plan`."""
    if not isinstance(flow, NflowsFlow):
        raise TypeError(f"flow must be an nflows Flow; got {type(flow).__name__}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
    embedded = flow._embedding_net(context)
    noise = flow._distribution.sample(num_samples, context=embedded)
    if embedded is not None:
        noise = noise.reshape(-1, *noise.shape[2:])
        embedded = embedded.repeat_interleave(num_samples, dim=0)
    base = (lambda z: flow._distribution.log_prob(z.reshape(noise.shape), context=embedded)) if with_log_prob else False
    solution = solve(wrap(flow, bitwise=bitwise), noise.reshape(noise.shape[0], -1, 1), plan, cond=embedded,
                     throw=throw, adjoint_tol=adjoint_tol, log_prob=base)
    samples, log_prob = solution.x.reshape(noise.shape), solution.log_prob
    if embedded is not None:
        samples = samples.reshape(-1, num_samples, *samples.shape[1:])
        log_prob = None if log_prob is None else log_prob.reshape(-1, num_samples)
    return samples, log_prob, solution


def build_maf(features: int, hidden: int, layers: int, blocks: int = 1) -> NflowsFlow:
    """nflows' `MaskedAutoregressiveFlow` as the MAF paper uses it (reversals, residual MADEs).

    The architecture `examples/mnist_maf.py` trains and `load_for_planning` rebuilds.
    """
    from nflows.flows.autoregressive import MaskedAutoregressiveFlow

    return MaskedAutoregressiveFlow(features=features, hidden_features=hidden, num_layers=layers,
                                    num_blocks_per_layer=blocks, use_residual_blocks=True)


def load_for_planning(path: str, batch: int, seed: int, device: str, *,
                      trust_pickle: bool = False) -> tuple[Flow, Tensor, None]:
    """An nflows MAF checkpoint as `(flow, calibration noise, cond)` for `arflow-solvers plan`.

    Accepts a checkpoint `{"state_dict", "args": {"hidden", "layers", "blocks"}}` as written by
    `examples/mnist_maf.py` (the feature count is read from the weights), or, with
    `trust_pickle=True`, a whole pickled nflows `Flow` (`torch.save(flow, path)`). The noise
    is `(batch, D, 1)`, drawn from the flow's base distribution with `seed`.

    Arguments:
        path: checkpoint file.
        batch: calibration batch size (>= 1).
        seed: seed of the noise.
        device: where the flow and the noise go (`'cpu'`, `'cuda'`, ...).
        trust_pickle: also load files that hold pickled Python objects (a whole `Flow`).
            Unpickling runs code from the file: only for files you trust.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `batch` is not an int >= 1, or the file is unreadable (truncated, another
            format), holds pickled objects while `trust_pickle` is False, or is no nflows MAF
            checkpoint; each message names the file.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    try:
        data = load_checkpoint(path, trust_pickle)
    except ValueError as error:
        if "pickled Python objects" not in str(error):
            raise
        raise ValueError(f"{error}; a whole nflows Flow saved with torch.save(flow)? Or save "
                         "{'state_dict': flow.state_dict(), 'args': {...}} instead") from error
    if isinstance(data, NflowsFlow):
        flow = data
    elif isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        args = data.get("args", {})
        first = next((v for k, v in data["state_dict"].items() if k.endswith("initial_layer.weight")), None)
        if first is None:
            raise ValueError(f"{path} is not an nflows MAF checkpoint: its state_dict has no "
                             "'*initial_layer.weight' (a TarFlow checkpoint? use --model tarflow)")
        flow = build_maf(first.shape[1], int(args.get("hidden", first.shape[0])),
                         int(args.get("layers", 5)), int(args.get("blocks", 1)))
        try:
            flow.load_state_dict(data["state_dict"])
        except RuntimeError as error:
            raise ValueError(f"{path}: the weights do not fit the MAF its 'args' describe ({args}): "
                             f"{str(error).splitlines()[0]}") from error
    else:
        raise ValueError(f"{path} holds neither an nflows Flow nor a {{'state_dict', 'args'}} checkpoint")
    flow = flow.to(device).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        z = flow._distribution.sample(batch)
    return wrap(flow), z.reshape(batch, -1, 1), None
