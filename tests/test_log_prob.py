"""log q(x) of solved samples, and reparameterised sampling in zuko's, nflows' and MADE's APIs.

The log-density equals the flow's own density evaluated at the samples; samples and
log-densities differentiate like autograd through each library's own sampling loop.
"""

import pytest
import torch
import zuko
from hypothesis import given, settings, strategies as st

from arflow_solvers import Flow, GSJacobi, Jacobi, Permute, Serial, init, solve
from arflow_solvers.adapters import nflows as ours_nflows
from arflow_solvers.adapters import zuko as ours_zuko
from arflow_solvers.adapters.made import MAF
from test_adjoint import assert_close, serial_with_graph

F64 = torch.float64
EXACT = Jacobi(tol=0.0)


def maf(features, layers, hidden, seed, context=None):
    torch.manual_seed(seed)
    flow = MAF(features, layers, hidden, context_features=context).to(F64)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(1.1)  # away from the initialisation; larger scales overflow some 3-layer flows
    return flow


def loss_gradients(x, log_prob, inputs):
    return torch.autograd.grad((x**2).mean() + log_prob.mean(), inputs)


solvers = st.one_of(
    st.just(Serial()),
    st.builds(lambda i: Jacobi(tol=0.0, init=i), st.sampled_from([init.noise, init.zeros])),
    st.builds(lambda m: GSJacobi(m, tol=0.0), st.integers(1, 4)),
)


@settings(max_examples=15, deadline=None)
@given(features=st.integers(2, 7), layers=st.integers(1, 3), solver=solvers, seed=st.integers(0, 1000))
def test_log_prob_is_the_flows_density_at_its_samples_for_any_solver(features, layers, solver, seed):
    flow = maf(features, layers, [10], seed, context=2)
    z = torch.randn(4, features, 1, dtype=F64)
    cond = torch.randn(4, 2, dtype=F64)
    with torch.no_grad():
        sol = solve(flow.as_flow(), z, solver, cond=cond, log_prob=True)
        expected = flow.log_prob(sol.x.squeeze(-1), cond)
    assert (sol.log_prob - expected).abs().max() <= 1e-10
    assert torch.allclose(sol.log_det, -flow.transform(sol.x.squeeze(-1), cond)[1], atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(features=st.integers(2, 6), layers=st.integers(1, 3), solver=solvers, seed=st.integers(0, 1000))
def test_log_prob_gradients_equal_autograd_through_serial(features, layers, solver, seed):
    flow = maf(features, layers, [8], seed)
    z = torch.randn(3, features, 1, dtype=F64, requires_grad=True)
    inputs = [z, *flow.parameters()]
    x = serial_with_graph(flow.as_flow(), z).squeeze(-1)
    expected = loss_gradients(x, flow.log_prob(x), inputs)
    sol = solve(flow.as_flow(), z, solver, log_prob=True)
    assert_close(loss_gradients(sol.x, sol.log_prob, inputs), expected)


def test_a_base_density_function_and_batch_chunks():
    flow = maf(5, 2, [8], 0)
    z = torch.randn(7, 5, 1, dtype=F64)
    with torch.no_grad():
        whole = solve(flow.as_flow(), z, EXACT, log_prob=lambda z: -z.flatten(1).abs().sum(1))
        chunked = solve(flow.as_flow(), z, EXACT, log_prob=lambda z: -z.flatten(1).abs().sum(1), max_batch=3)
    assert torch.allclose(whole.log_prob, -z.flatten(1).abs().sum(1) - whole.log_det)
    assert torch.allclose(chunked.log_prob, whole.log_prob, atol=1e-12)
    assert solve(flow.as_flow(), z, EXACT).log_prob is None


def test_steps_without_a_log_determinant_are_refused_by_name():
    flow = maf(4, 1, [8], 0)
    made = flow.layers[0]
    z = torch.randn(2, 4, 1, dtype=F64)
    with pytest.raises(TypeError, match=r"steps\[1\] \(double\) has no with_log_det"):
        def double(x, cond=None):
            return 2 * x
        solve(Flow([made, double]), z, EXACT, log_prob=True)

    class Map:  # a causal map without log_det
        seq_len = 4

        def inverse_map(self, x, z, cond=None):
            return z

    with pytest.raises(TypeError, match=r"block 0 \(Map\) has an inverse_map but no log_det"):
        solve(Map(), z, EXACT, log_prob=True)
    with pytest.raises(TypeError, match="log_prob must be a bool or a function"):
        solve(made, z, EXACT, log_prob="yes")
    with pytest.raises(ValueError, match=r"base density must return shape \(2,\)"):
        solve(made, z, EXACT, log_prob=lambda z: z.sum())
    assert torch.equal(Permute([1, 0, 2, 3]).with_log_det(z, None)[1], torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("spline", [False, True])
@pytest.mark.parametrize("context", [None, (3, 2)])
def test_zuko_rsample_and_log_prob_match_zuko(spline, context):
    torch.manual_seed(0)
    make = zuko.flows.NSF if spline else zuko.flows.MAF
    flow = make(5, context=0 if context is None else context[1], transforms=3, hidden_features=(16, 16)).to(F64)
    c = None if context is None else torch.randn(*context, dtype=F64, requires_grad=True)
    inputs = [*flow.parameters()] + ([] if c is None else [c])
    torch.manual_seed(1)
    x, log_prob = flow(c).rsample_and_log_prob((4,))
    expected = loss_gradients(x, log_prob, inputs)
    torch.manual_seed(1)
    ours_x, ours_log_prob = ours_zuko.rsample_and_log_prob(flow, (4,), EXACT, c)
    assert ours_x.shape == x.shape and ours_log_prob.shape == log_prob.shape
    assert torch.equal(ours_x, x)
    assert (ours_log_prob - log_prob).abs().max() <= 1e-10
    assert_close(loss_gradients(ours_x, ours_log_prob, inputs), expected)
    torch.manual_seed(1)
    assert torch.equal(ours_zuko.rsample(flow, 4, EXACT, c), x)


def test_zuko_rsample_with_a_tolerance_plan_stays_within_it():
    torch.manual_seed(0)
    flow = zuko.flows.MAF(12, transforms=2, hidden_features=(32,)).to(F64)
    params = list(flow.parameters())
    torch.manual_seed(1)
    expected = loss_gradients(*flow().rsample_and_log_prob((8,)), params)
    torch.manual_seed(1)
    x, log_prob, solution = ours_zuko.rsample_and_log_prob(flow, (8,), Jacobi(tol=1e-10), adjoint_tol=1e-8,
                                                           return_solution=True)
    got = loss_gradients(x, log_prob, params)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(got, expected))
    assert worst <= 1e-6
    assert all(a.iterations is not None and a.iterations <= 12 for a in solution.adjoint)


@pytest.mark.parametrize("context", [None, 3])
def test_nflows_rsample_and_log_prob_match_sample_and_log_prob(context):
    from nflows.distributions import ConditionalDiagonalNormal, StandardNormal
    from nflows.flows import Flow as NflowsFlow
    from nflows.transforms import (CompositeTransform, MaskedAffineAutoregressiveTransform,
                                   MaskedPiecewiseRationalQuadraticAutoregressiveTransform, ReversePermutation)

    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # nflows draws its noise in the default dtype
    try:
        torch.manual_seed(0)
        transforms = [MaskedAffineAutoregressiveTransform(5, 16, context_features=context), ReversePermutation(5),
                      MaskedPiecewiseRationalQuadraticAutoregressiveTransform(5, 16, context_features=context,
                                                                              tails="linear", num_bins=4)]
        base = StandardNormal([5]) if context is None else ConditionalDiagonalNormal(
            [5], context_encoder=torch.nn.Linear(context, 10))
        flow = NflowsFlow(CompositeTransform(transforms), base).eval()
        c = None if context is None else torch.randn(2, context)
        params = list(flow.parameters())
        torch.manual_seed(1)
        x, log_prob = flow.sample_and_log_prob(4, context=c)
        expected = loss_gradients(x, log_prob, params)
        torch.manual_seed(1)
        ours_x, ours_log_prob = ours_nflows.rsample_and_log_prob(flow, 4, EXACT, c)
        torch.manual_seed(1)
        plain = ours_nflows.rsample(flow, 4, EXACT, c)
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(ours_x, x) and torch.equal(plain, x)
    assert ours_log_prob.shape == log_prob.shape and (ours_log_prob - log_prob).abs().max() <= 1e-10
    assert_close(loss_gradients(ours_x, ours_log_prob, params), expected)


def test_made_maf_rsample_and_log_prob():
    flow = maf(6, 3, [12], 3, context=2)
    cond = torch.randn(5, 2, dtype=F64, requires_grad=True)
    inputs = [cond, *flow.parameters()]
    torch.manual_seed(2)
    z = torch.randn(5, 6, 1, dtype=F64)
    x = serial_with_graph(flow.as_flow(), z, cond).squeeze(-1)
    expected = loss_gradients(x, flow.log_prob(x, cond), inputs)
    torch.manual_seed(2)
    ours_x, log_prob = flow.rsample_and_log_prob(5, EXACT, cond)
    assert torch.allclose(ours_x, x, atol=1e-12)
    assert_close(loss_gradients(ours_x, log_prob, inputs), expected)
    torch.manual_seed(2)
    assert torch.allclose(flow.rsample(5, EXACT, cond), x, atol=1e-12)
    assert not flow.sample(5, EXACT, cond.detach()).requires_grad
