"""arflow_solvers.adapters.normflows: normflows' autoregressive loops, solved, bit for bit in the exact mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

nf = pytest.importorskip("normflows")

from arflow_solvers import AffineARBlock, Jacobi, init, solve_inverse  # noqa: E402
from arflow_solvers.adapters.normflows import (  # noqa: E402
    NormflowsAffineBlock, NormflowsARBlock, forward, inverse, log_prob, sample, wrap,
)
from arflow_solvers.testing import check_block  # noqa: E402
from toys import randomise  # noqa: E402

F64 = torch.float64
EXACT = Jacobi(tol=0.0)


def _model(features, layers, hidden, blocks, bins, context, permute_mask, seed):
    torch.manual_seed(seed)
    flows = []
    for k in range(layers):
        if k % 2 == 0:
            flows.append(nf.flows.AutoregressiveRationalQuadraticSpline(
                features, blocks, hidden, num_context_channels=context or None, num_bins=bins,
                permute_mask=permute_mask, init_identity=False))
        else:
            flows.append(nf.flows.MaskedAffineAutoregressive(features, hidden, context_features=context or None,
                                                             num_blocks=blocks))
        flows.append(nf.flows.Permute(features, mode="shuffle"))
    if context:
        base = nf.distributions.DiagGaussian(features)
        model = nf.ConditionalNormalizingFlow(base, flows)
    else:
        model = nf.NormalizingFlow(nf.distributions.DiagGaussian(features), flows)
    model = model.double()
    randomise(model, seed, 0.3)
    return model.eval()


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    features=st.integers(2, 5),
    layers=st.integers(1, 3),
    hidden=st.integers(3, 10),
    blocks=st.integers(1, 2),
    bins=st.integers(2, 5),
    context=st.integers(0, 2),
    permute_mask=st.booleans(),
    batch=st.integers(1, 6),
)
def test_exact_mode_is_normflows_result_bit_for_bit(seed, features, layers, hidden, blocks, bins, context,
                                                     permute_mask, batch):
    model = _model(features, layers, hidden, blocks, bins, context, permute_mask, seed)
    c = torch.randn(batch, context, dtype=F64) if context else None
    z, x = torch.randn(2, batch, features, dtype=F64)
    kwargs = {} if c is None else {"context": c}
    with torch.no_grad():
        expected_x, expected_forward = model.forward_and_log_det(z, **kwargs)
        expected_z, expected_inverse = model.inverse_and_log_det(x, **kwargs)
        expected_log_prob = model.log_prob(x, **kwargs)
    ours_x, ours_forward = forward(model, z, EXACT, c)
    assert torch.equal(ours_x, expected_x) and torch.equal(ours_forward, expected_forward)
    ours_z, ours_inverse = inverse(model, x, Jacobi(tol=0.0, init=init.zeros), c)
    assert torch.equal(ours_z, expected_z) and torch.equal(ours_inverse, expected_inverse)
    assert torch.equal(log_prob(model, x, EXACT, c), expected_log_prob)
    packed_x, _ = forward(model, z, Jacobi(tol=1e-10), c, bitwise=False)
    torch.testing.assert_close(packed_x, expected_x, rtol=1e-8, atol=1e-8)


def test_sample_mirrors_normflows_sample():
    model = _model(4, 2, 8, 1, 4, 0, False, 0).float()
    torch.manual_seed(5)
    expected, expected_log_q = model.sample(16)
    torch.manual_seed(5)
    x, log_q = sample(model, 16, EXACT)
    assert torch.equal(x, expected) and torch.equal(log_q, expected_log_q)
    conditional = _model(3, 2, 8, 1, 4, 2, False, 1)
    c = torch.randn(7, 2, dtype=F64)
    torch.manual_seed(6)
    expected, expected_log_q = conditional.sample(7, context=c)
    torch.manual_seed(6)
    x, log_q = sample(conditional, 7, EXACT, c)
    assert torch.equal(x, expected) and torch.equal(log_q, expected_log_q)


def test_wrap_in_both_directions_and_reverse():
    model = _model(4, 2, 8, 1, 4, 0, True, 2)
    z = torch.randn(6, 4, dtype=F64)
    forward_flow, inverse_flow = wrap(model), wrap(model, "inverse")
    assert forward_flow.num_blocks == 1 and inverse_flow.num_blocks == 1
    assert isinstance(inverse_flow.blocks[0], NormflowsAffineBlock) and isinstance(inverse_flow.blocks[0], AffineARBlock)
    assert type(forward_flow.blocks[0]) is NormflowsARBlock
    with torch.no_grad():
        assert torch.equal(solve_inverse(forward_flow, z, EXACT), model.forward(z))
        assert torch.equal(solve_inverse(inverse_flow, z, EXACT), model.inverse(z))
    reversed_model = nf.NormalizingFlow(model.q0, [nf.flows.Reverse(f) for f in model.flows[::-1]])
    assert wrap(reversed_model).num_blocks == 1  # the MAF's loop now runs when sampling
    with torch.no_grad():
        assert torch.equal(solve_inverse(wrap(reversed_model), z, EXACT), reversed_model.forward(z))
    with pytest.raises(ValueError, match="direction"):
        wrap(model, "backward")


def test_unsupported_layers_and_training_mode_are_refused_by_name():
    class Hides(nf.flows.Flow):
        def __init__(self):
            super().__init__()
            self.inner = nf.flows.MaskedAffineAutoregressive(3, 4)

        def forward(self, z):
            return self.inner.inverse(z)

    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(3), [Hides()])
    with pytest.raises(TypeError, match="Hides contains an autoregressive layer.*solves the loops"):
        wrap(model)
    with pytest.raises(TypeError, match="no autoregressive loop"):
        wrap(nf.NormalizingFlow(nf.distributions.DiagGaussian(3), [nf.flows.Permute(3)]))
    dropout = nf.NormalizingFlow(nf.distributions.DiagGaussian(3), [
        nf.flows.AutoregressiveRationalQuadraticSpline(3, 1, 8, dropout_probability=0.3)])
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="dropout in training mode"):
        forward(dropout.train(), z, EXACT)
    with torch.no_grad():
        assert torch.equal(forward(dropout.eval(), z, EXACT)[0], dropout.forward(z))


@pytest.mark.parametrize("bitwise", [True, False])
def test_weight_updates_are_always_seen(bitwise):
    model = _model(4, 1, 8, 1, 4, 0, False, 3)
    flow = wrap(model, bitwise=bitwise)
    z = torch.randn(5, 4, dtype=F64)
    plan = EXACT if bitwise else Jacobi(tol=1e-10)
    before = solve_inverse(flow, z, plan)
    for p in model.parameters():
        p.data.mul_(0.9)  # the EMA pattern: no version bump
    after = solve_inverse(flow, z, plan)
    with torch.no_grad():
        expected = model.forward(z)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, expected, rtol=0 if bitwise else 1e-8, atol=0 if bitwise else 1e-8)


def test_blocks_pass_the_conformance_checks_in_float64():
    model = _model(5, 2, 8, 2, 4, 2, True, 4)
    c = torch.randn(3, 2, dtype=F64)
    for direction in ("forward", "inverse"):
        for bitwise in (True, False):
            for block in wrap(model, direction, bitwise=bitwise).blocks:
                check_block(block, torch.randn(3, 5, 1, dtype=F64), cond=c)
