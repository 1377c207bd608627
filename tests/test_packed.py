"""Packed MADEs (`bitwise=False`): the same function as nflows' MADE, to float rounding, for less work."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("nflows")

from nflows.distributions import StandardNormal  # noqa: E402
from nflows.flows import Flow as NFlow  # noqa: E402
from nflows.transforms import (  # noqa: E402
    CompositeTransform,
    MaskedAffineAutoregressiveTransform,
    RandomPermutation,
)

from arflow_solvers.adapters._masked import PackedLinear, degree_order  # noqa: E402
from toys import randomise  # noqa: E402
from arflow_solvers.adapters.nflows import NflowsAffineBlock, sample, wrap  # noqa: E402
from arflow_solvers import Jacobi, solve_inverse  # noqa: E402

D = 8
BATCH = 16


@settings(max_examples=40, deadline=None)
@given(
    in_degrees=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    out_degrees=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    strict=st.booleans(),
    group_rows=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_packed_linear_is_the_masked_product_in_degree_order(in_degrees, out_degrees, strict,
                                                             group_rows, seed):
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = torch.tensor(in_degrees), torch.tensor(out_degrees)
    mask = (d_out[:, None] > d_in) if strict else (d_out[:, None] >= d_in)
    weight = torch.randn(len(out_degrees), len(in_degrees), generator=gen, dtype=torch.float64)
    bias = torch.randn(len(out_degrees), generator=gen, dtype=torch.float64)
    h = torch.randn(5, len(in_degrees), generator=gen, dtype=torch.float64)
    rows, cols = degree_order(d_out), degree_order(d_in)
    packed = PackedLinear.pack(weight, mask.double(), bias, rows, cols, group_rows=group_rows)
    dense = h @ (weight * mask).T + bias
    torch.testing.assert_close(packed(h[:, cols].T.contiguous()).T, dense[:, rows], rtol=1e-12, atol=1e-12)


def test_a_mask_that_is_not_triangular_in_degree_order_is_refused():
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="not triangular"):
        PackedLinear.pack(torch.ones(2, 2), mask, None, torch.arange(2), torch.arange(2))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every weight random (residual blocks start near zero in nflows), scales near 1."""
    randomise(module, seed, 0.3)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, MaskedAffineAutoregressiveTransform):
                m.autoregressive_net.final_layer.bias[0::2] += 0.5413


MADES = {
    "residual, 2 blocks": dict(hidden_features=12, num_blocks=2),
    "hidden wider than D (cyclic degrees)": dict(hidden_features=21, num_blocks=1),
    "feed-forward": dict(hidden_features=12, num_blocks=2, use_residual_blocks=False),
    "feed-forward, random masks": dict(hidden_features=12, num_blocks=2, use_residual_blocks=False,
                                       random_mask=True),
    "context": dict(hidden_features=12, num_blocks=2, context_features=3),
}


@pytest.mark.parametrize("batch", [BATCH, 1])
@pytest.mark.parametrize("options", MADES.values(), ids=MADES.keys())
def test_packed_update_equals_nflows_update_to_rounding(options, batch):
    torch.manual_seed(0)
    transform = MaskedAffineAutoregressiveTransform(D, **options).double().eval()
    _randomise(transform, seed=1)
    context = torch.randn(batch, 3, dtype=torch.float64) if "context_features" in options else None
    x, z = torch.randn(2, batch, D, 1, dtype=torch.float64)
    bitwise = NflowsAffineBlock(transform)
    packed = NflowsAffineBlock(transform, bitwise=False)
    with torch.no_grad():
        torch.testing.assert_close(packed.inverse_map(x, z, context), bitwise.inverse_map(x, z, context),
                                   rtol=1e-12, atol=1e-12)


def _flow(seed: int = 0) -> NFlow:
    torch.manual_seed(seed)
    layers = []
    for _ in range(3):
        layers += [MaskedAffineAutoregressiveTransform(D, hidden_features=16), RandomPermutation(D)]
    flow = NFlow(CompositeTransform(layers), StandardNormal([D])).double().eval()
    _randomise(flow, seed)
    with torch.no_grad():
        for m in flow.modules():  # keep the deep flow well conditioned
            if isinstance(m, MaskedAffineAutoregressiveTransform):
                m.autoregressive_net.final_layer.weight.mul_(0.1)
    return flow


def test_packed_flow_in_float64_is_exact_at_the_bound():
    flow = _flow()
    z = torch.randn(BATCH, D, dtype=torch.float64)
    with torch.no_grad():
        expected = flow._transform.inverse(z)[0]
    x = solve_inverse(wrap(flow, bitwise=False), z.unsqueeze(-1), Jacobi(tol=0.0, drop_converged=True))
    torch.testing.assert_close(x.squeeze(-1), expected, rtol=1e-11, atol=1e-11)


def test_sample_with_packed_blocks_matches_flow_sample():
    flow = _flow(seed=2).float()
    torch.manual_seed(5)
    with torch.no_grad():
        expected = flow.sample(BATCH)
    torch.manual_seed(5)
    x = sample(flow, BATCH, Jacobi(tol=1e-7), bitwise=False)
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def test_packed_copy_follows_weight_updates():
    transform = MaskedAffineAutoregressiveTransform(D, hidden_features=12).double().eval()
    _randomise(transform, seed=3)
    packed, bitwise = NflowsAffineBlock(transform, bitwise=False), NflowsAffineBlock(transform)
    x, z = torch.randn(2, BATCH, D, 1, dtype=torch.float64)
    with torch.no_grad():
        before = packed.inverse_map(x, z)
        transform.autoregressive_net.final_layer.weight.mul_(2.0)  # in place: same tensor
        after = packed.inverse_map(x, z)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, bitwise.inverse_map(x, z), rtol=1e-12, atol=1e-12)


def test_what_cannot_be_packed_is_refused_by_name():
    with_batch_norm = MaskedAffineAutoregressiveTransform(D, hidden_features=12, use_batch_norm=True)
    with pytest.raises(ValueError, match="batch norm"):
        NflowsAffineBlock(with_batch_norm.eval(), bitwise=False)
    dropout = MaskedAffineAutoregressiveTransform(D, hidden_features=12, dropout_probability=0.1)
    with pytest.raises(ValueError, match="eval"):
        NflowsAffineBlock(dropout.train(), bitwise=False)
    with pytest.raises(TypeError, match="bitwise"):
        NflowsAffineBlock(dropout, bitwise="no")
