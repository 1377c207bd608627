"""MADE and MAF (arflow_solvers.adapters.made): causality, density, inversion through the solvers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arflow_solvers.adapters.made import MADE, MAF, hidden_degrees
from arflow_solvers import (
    AffineARBlock,
    Flow,
    GSJacobi,
    HasOutputProjection,
    Jacobi,
    Serial,
    solve,
    solve_inverse,
)


def _made(seed: int, features: int, widths, residual: int, context: int | None, order) -> MADE:
    torch.manual_seed(seed)
    made = MADE(features, widths, order=order, residual_blocks=residual, context_features=context)
    with torch.no_grad():  # make residual branches matter: nflows-style init leaves them ~0
        for p in made.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return made.double()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    features=st.integers(1, 7),
    widths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    residual=st.integers(0, 2),
    use_context=st.booleans(),
    data=st.data(),
)
def test_output_rows_up_to_j_ignore_x_j(seed, features, widths, residual, use_context, data):
    """Perturbing x_j leaves (mu, log_sigma) rows 0..j bit-identical (rows read only x_<t)."""
    order = data.draw(st.permutations(range(features)))
    context = 3 if use_context else None
    made = _made(seed, features, widths, residual, context, order)
    j = data.draw(st.integers(0, features - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, features, 1, generator=gen, dtype=torch.float64)
    cond = torch.randn(4, 3, generator=gen, dtype=torch.float64) if use_context else None
    y = x.clone()
    y[:, j] += torch.randn(4, 1, generator=gen, dtype=torch.float64) * 10 + 1
    mu_x, ls_x = made.affine(x, cond)
    mu_y, ls_y = made.affine(y, cond)
    assert torch.equal(mu_x[:, : j + 1], mu_y[:, : j + 1])
    assert torch.equal(ls_x[:, : j + 1], ls_y[:, : j + 1])


def test_every_earlier_position_is_read():
    """The Jacobian of (mu, log_sigma) is strictly lower triangular and full below the diagonal."""
    made = _made(0, 5, [32, 32], 1, None, None)
    x = torch.randn(1, 5, 1, dtype=torch.float64)
    for k in (0, 1):
        jac = torch.autograd.functional.jacobian(lambda v: made.affine(v)[k], x).reshape(5, 5)
        assert torch.equal(jac.triu() != 0, torch.zeros(5, 5, dtype=torch.bool))
        assert bool((jac.tril(-1).abs() > 0).sum() == 10)


def test_hidden_degrees_cover_1_to_t_minus_1():
    assert hidden_degrees(7, 4).tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert hidden_degrees(3, 1).tolist() == [0, 0, 0]


def test_made_satisfies_the_protocols_and_projection_reproduces_outputs():
    made = _made(1, 6, [20], 0, None, None)
    assert isinstance(made, AffineARBlock) and isinstance(made, HasOutputProjection)
    w_mu, w_ls = made.output_projection()
    assert w_mu.shape == w_ls.shape == (6, 20)
    x = torch.randn(3, 6, 1, dtype=torch.float64)
    h = torch.relu(made.hidden[0](x.squeeze(-1)))
    mu, log_sigma = made.affine(x)
    torch.testing.assert_close(mu.squeeze(-1), h @ w_mu.T + made.output.bias[:6])
    torch.testing.assert_close(log_sigma.squeeze(-1), h @ w_ls.T + made.output.bias[6:])


def test_log_prob_is_the_change_of_variables_formula():
    """MAF.log_prob equals log N(u) + log|det du/dx| with the Jacobian taken by autograd."""
    torch.manual_seed(2)
    maf = MAF(4, num_layers=3, hidden_features=[16, 16], residual_blocks=1).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: maf.transform(v[None])[0][0], x[i])
        u = maf.transform(x[i : i + 1])[0][0]
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum() + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(maf.log_prob(x[i : i + 1])[0], expected)


def test_as_flow_inverts_the_density_direction_exactly():
    """Jacobi at tol=0 and GS-Jacobi reproduce Serial bit for bit, and invert MAF.transform."""
    torch.manual_seed(3)
    maf = MAF(9, num_layers=4, hidden_features=[24], residual_blocks=1,
              orders=[None, list(range(9))[::-1], [2, 0, 3, 1, 4, 8, 5, 7, 6], None]).double()
    flow = maf.as_flow()
    assert isinstance(flow, Flow) and flow.num_blocks == 4
    assert flow.blocks == tuple(reversed(list(maf.layers)))
    z = torch.randn(5, 9, 1, dtype=torch.float64)
    serial = solve_inverse(flow, z, Serial())
    u, _ = maf.transform(serial.squeeze(-1))
    torch.testing.assert_close(u, z.squeeze(-1), rtol=1e-10, atol=1e-10)
    jacobi = solve(flow, z, Jacobi(tol=0.0))
    assert torch.equal(jacobi.x, serial)
    assert all(b.passes <= 9 for b in jacobi.blocks)
    assert torch.equal(solve_inverse(flow, z, GSJacobi(segments=4, tol=0.0)), serial)
    one_iteration = solve_inverse(flow, z, Jacobi(tol=0.0, max_iters=1))
    assert not torch.equal(one_iteration, serial)  # the checks above can fail


def test_conditional_maf_samples_depend_on_cond():
    torch.manual_seed(4)
    maf = MAF(5, num_layers=2, hidden_features=[16], context_features=2).double()
    z = torch.randn(3, 5, 1, dtype=torch.float64)
    cond = torch.randn(3, 2, dtype=torch.float64)
    x = solve_inverse(maf.as_flow(), z, Jacobi(tol=0.0), cond=cond)
    u, _ = maf.transform(x.squeeze(-1), cond)
    torch.testing.assert_close(u, z.squeeze(-1))
    other = solve_inverse(maf.as_flow(), z, Jacobi(tol=0.0), cond=cond + 1)
    assert not torch.allclose(x, other)
    with pytest.raises(ValueError, match="cond"):
        maf.layers[0].affine(z)


def test_training_by_likelihood_improves_the_fit():
    torch.manual_seed(5)
    data = torch.randn(512, 3) @ torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.4, 0.8], [0.0, 0.0, 0.3]])
    maf = MAF(3, num_layers=2, hidden_features=[32])
    before = maf.log_prob(data).mean().item()
    optimizer = torch.optim.Adam(maf.parameters(), lr=1e-2)
    for _ in range(60):
        loss = -maf.log_prob(data).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert maf.log_prob(data).mean().item() > before + 0.5
    samples = maf.sample(2000, Jacobi())
    assert samples.shape == (2000, 3)
    torch.testing.assert_close(torch.cov(samples.T), torch.cov(data.T), atol=0.25, rtol=0.25)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"features": 0}, "features"),
        ({"features": 3, "hidden_features": []}, "hidden_features"),
        ({"features": 3, "order": [0, 0, 1]}, "order"),
        ({"features": 3, "residual_blocks": -1}, "residual_blocks"),
        ({"features": 3, "context_features": 0}, "context_features"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MADE(**kwargs)


def test_bad_shapes_are_named():
    made = MADE(4, 8)
    with pytest.raises(ValueError, match=r"\(B, 4, 1\)"):
        made.affine(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        made(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="num_layers"):
        MAF(4, num_layers=0)
