"""arflow_solvers.adapters.pyro: pyro's autoregressive inverses solved, bit for bit in float32 (observed)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as T  # noqa: E402
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN  # noqa: E402

from arflow_solvers import Jacobi, solve_inverse  # noqa: E402
from arflow_solvers.adapters.pyro import PyroARBlock, inverse, log_prob, sample, wrap  # noqa: E402
from arflow_solvers.testing import check_block  # noqa: E402

EXACT = Jacobi(tol=0.0)


@contextlib.contextmanager
def default_dtype(dtype):
    """pyro's affine inverse starts from `torch.zeros` of the default dtype: float64 needs it set."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _perturb(module: torch.nn.Module, seed: int, gain: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(gain * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _transform(kind, features, context, hidden, skip, seed):
    torch.manual_seed(seed)
    param_dims = {"affine": [1, 1], "stable": [1, 1]}.get(kind, None)
    if kind.startswith("spline"):
        bins = 3
        order = "quadratic" if kind == "spline-quadratic" else "linear"
        param_dims = [bins, bins, bins - 1] + ([bins] if order == "linear" else [])
    arn = (ConditionalAutoRegressiveNN(features, context, hidden, param_dims=param_dims, skip_connections=skip)
           if context else AutoRegressiveNN(features, hidden, param_dims=param_dims, skip_connections=skip))
    if kind.startswith("spline"):
        maker = T.ConditionalSplineAutoregressive if context else T.SplineAutoregressive
        transform = maker(features, arn, count_bins=3, order=order)
    else:
        maker = T.ConditionalAffineAutoregressive if context else T.AffineAutoregressive
        transform = maker(arn, stable=kind == "stable")
    _perturb(transform, seed)
    return transform


@settings(max_examples=14, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["affine", "stable", "spline-linear", "spline-quadratic"]),
    features=st.integers(2, 6),
    context=st.integers(0, 2),
    extra=st.lists(st.integers(0, 6), min_size=1, max_size=2),
    skip=st.booleans(),
    batch=st.integers(1, 5),
)
def test_inverse_and_log_prob_equal_pyros_loop(seed, kind, features, context, extra, skip, batch):
    transform = _transform(kind, features, context, [features + e for e in extra], skip, seed)
    permute = T.Permute(torch.randperm(features))
    base = dist.Normal(torch.zeros(features), torch.ones(features)).to_event(1)
    maker = dist.ConditionalTransformedDistribution if context else dist.TransformedDistribution
    flow = maker(base, [transform, permute])
    y = torch.randn(batch, features)
    c = torch.randn(batch, context) if context else None
    conditioned = transform.condition(c) if context else transform
    with torch.no_grad():
        expected = conditioned.inv(y)
        expected_log_prob = (flow.condition(c) if context else flow).log_prob(y)
    x = inverse(transform, y, EXACT, c)
    assert torch.equal(x, expected)  # float32: the same operations on the same values
    assert torch.equal(log_prob(flow, y, EXACT, c), expected_log_prob)
    tolerance = inverse(transform, y, Jacobi(tol=1e-6), c, bitwise=False)
    torch.testing.assert_close(tolerance, expected, rtol=1e-4, atol=1e-4)


def test_float64_agrees_with_pyro_in_float64():
    with default_dtype(torch.float64):
        transform = _transform("affine", 5, 0, [12], True, 1)
        y = torch.randn(7, 5)
        with torch.no_grad():
            expected = transform.inv(y)
    assert torch.equal(inverse(transform, y, EXACT), expected)


def test_sampling_through_inv_mirrors_pyro_sample():
    features = 4
    iaf, spline = _transform("affine", features, 0, [8], False, 2), _transform("spline-linear", features, 0, [8], False, 3)
    base = dist.Normal(torch.zeros(features), torch.ones(features)).to_event(1)
    flow = dist.TransformedDistribution(base, [iaf.inv, T.Permute(torch.tensor([3, 1, 0, 2])), spline.inv])
    torch.manual_seed(7)
    expected = flow.sample((5, 2))
    torch.manual_seed(7)
    ours = sample(flow, (5, 2), EXACT)
    assert ours.shape == expected.shape and torch.equal(ours, expected)
    conditional = _transform("affine", features, 2, [8], False, 4)
    cflow = dist.ConditionalTransformedDistribution(base, [T.ConditionalAffineAutoregressive(conditional.nn).inv])
    c = torch.randn(2)
    torch.manual_seed(8)
    expected = cflow.condition(c).sample((6,))
    torch.manual_seed(8)
    assert torch.equal(sample(cflow, 6, EXACT, c), expected)


def test_wrap_builds_a_flow_in_either_direction():
    transform = _transform("affine", 5, 0, [10], False, 5)
    y = torch.randn(6, 5)
    flow = wrap([transform, T.Permute(torch.tensor([4, 3, 2, 1, 0]))])
    assert flow.num_blocks == 1 and isinstance(flow.blocks[0], PyroARBlock)
    with torch.no_grad():
        expected = T.ComposeTransform([transform, T.Permute(torch.tensor([4, 3, 2, 1, 0]))]).inv(y)
    assert torch.equal(solve_inverse(flow, y, EXACT), expected)
    assert wrap([transform.inv], direction="forward").num_blocks == 1
    with pytest.raises(TypeError, match="no autoregressive inverse"):
        wrap([transform], direction="forward")
    conditional = _transform("spline-linear", 5, 3, [10], False, 6)
    c = torch.randn(3)
    with torch.no_grad():
        expected = conditional.condition(c).inv(y)
    assert torch.equal(solve_inverse(wrap(conditional, c), y, EXACT), expected)


def test_unsupported_transforms_and_training_mode_are_refused_by_name():
    class OwnInverse(T.AffineAutoregressive):
        def _inverse(self, y):
            return super()._inverse(y)

    arn = AutoRegressiveNN(4, [8])
    with pytest.raises(TypeError, match="OwnInverse overrides pyro's inverse.*solves the inverses"):
        inverse(OwnInverse(arn), torch.randn(2, 4), EXACT)
    naf = T.NeuralAutoregressive(AutoRegressiveNN(4, [8], param_dims=[4, 4, 4]), hidden_units=4)
    with pytest.raises(TypeError, match="NeuralAutoregressive is autoregressive but not one whose inverse"):
        inverse(naf, torch.randn(2, 4), EXACT)
    with pytest.raises(TypeError, match="not a torch or pyro Transform"):
        inverse(torch.nn.Linear(4, 4), torch.randn(2, 4), EXACT)
    norm = T.BatchNorm(4)
    flow = [T.AffineAutoregressive(arn), norm]
    y = torch.randn(3, 4)
    with pytest.raises(ValueError, match="BatchNorm has batch norm in training mode"):
        inverse(flow, y, EXACT)
    norm.eval()
    with torch.no_grad():
        expected = T.ComposeTransform(flow).inv(y)
    assert torch.equal(inverse(flow, y, EXACT), expected)


@pytest.mark.parametrize("bitwise", [True, False])
def test_weight_updates_are_always_seen(bitwise):
    transform = _transform("affine", 4, 0, [8], False, 9)
    y = torch.randn(5, 4)
    plan = EXACT if bitwise else Jacobi(tol=1e-7)
    flow = wrap(transform, bitwise=bitwise)
    before = solve_inverse(flow, y, plan)
    optimiser = torch.optim.SGD(transform.parameters(), lr=0.1)
    transform(torch.randn(8, 4)).sum().backward()
    optimiser.step()
    after = solve_inverse(flow, y, plan)
    for p in transform.parameters():
        p.data.mul_(0.9)  # through .data, as an EMA does
    last = solve_inverse(flow, y, plan)
    with torch.no_grad():
        expected = transform._inverse(y)
    assert not torch.equal(after, before) and not torch.equal(last, after)
    torch.testing.assert_close(last, expected, rtol=0 if bitwise else 1e-5, atol=0 if bitwise else 1e-5)


def test_blocks_pass_the_conformance_checks_in_float64():
    for kind, context, skip in (("affine", 0, True), ("stable", 2, False), ("spline-linear", 2, True),
                                ("spline-quadratic", 0, False)):
        transform = _transform(kind, 5, context, [9], skip, 10).double()
        c = torch.randn(3, context, dtype=torch.float64) if context else None
        for bitwise in (True, False):
            block = PyroARBlock(transform.condition(c) if context else transform, bitwise=bitwise)
            check_block(block, 0.5 * torch.randn(3, 5, 1, dtype=torch.float64), cond=c)
