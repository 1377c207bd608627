"""arflow_solvers.adapters.zuko: the exact mode is zuko's result bit for bit, the tolerance mode within it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

zuko = pytest.importorskip("zuko")

from zuko.flows import MAF, NSF, MaskedAutoregressiveTransform  # noqa: E402
from zuko.lazy import Flow as ZFlow  # noqa: E402
from zuko.lazy import LazyTransform, UnconditionalDistribution, UnconditionalTransform  # noqa: E402
from zuko.distributions import DiagNormal  # noqa: E402
from zuko.transforms import PermutationTransform  # noqa: E402

from arflow_solvers import (  # noqa: E402
    AffineARBlock, CausalMapBlock, GSJacobi, Jacobi, Serial, init, solve_inverse,
)
from arflow_solvers.adapters.zuko import ZukoAffineBlock, ZukoARBlock, ar_block, inverse, sample, wrap  # noqa: E402
from arflow_solvers.testing import check_block  # noqa: E402
from toys import randomise  # noqa: E402

F64 = torch.float64
EXACT = Jacobi(tol=0.0)


def _zuko_inverse(flow, z, c=None):
    """zuko's own inverse: `flow(c).transform.inv(z)`, or `transform(c).inv(z)` for a lazy transform."""
    with torch.no_grad():
        return (flow(c).transform if isinstance(flow, ZFlow) else flow(c)).inv(z)


@settings(max_examples=14, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    spline=st.booleans(),
    features=st.integers(2, 6),
    transforms=st.integers(1, 3),
    context=st.integers(0, 3),
    hidden=st.lists(st.integers(2, 12), min_size=1, max_size=2),
    residual=st.booleans(),
    passes=st.one_of(st.none(), st.integers(2, 6)),
    randperm=st.booleans(),
    batch=st.lists(st.integers(1, 4), min_size=1, max_size=2),
)
def test_exact_mode_is_zukos_inverse_bit_for_bit(seed, spline, features, transforms, context, hidden, residual,
                                                 passes, randperm, batch):
    torch.manual_seed(seed)
    kind = NSF if spline else MAF
    options = dict(bins=4) if spline else {}
    flow = kind(features, context, transforms=transforms, randperm=randperm, passes=passes,
                hidden_features=hidden, residual=residual, **options).double()
    randomise(flow, seed, 0.4)
    c = torch.randn(*batch[-1:], context, dtype=F64) if context else None
    z = torch.randn(*batch, features, dtype=F64)
    expected = _zuko_inverse(flow, z, c)
    x, solution = inverse(flow, z, EXACT, c, return_solution=True)
    assert x.shape == expected.shape
    assert torch.equal(x, expected)
    assert all(b.passes <= features + 1 for b in solution.blocks)
    from_zeros = inverse(flow, z, Jacobi(tol=0.0, init=init.zeros), c)
    assert torch.equal(from_zeros, expected)
    tolerance = inverse(flow, z, Jacobi(tol=1e-9), c, bitwise=False)
    torch.testing.assert_close(tolerance, expected, rtol=1e-7, atol=1e-7)


def test_sample_mirrors_zukos_sample_with_and_without_context():
    torch.manual_seed(0)
    flow = NSF(4, 2, transforms=2, bins=4, hidden_features=[16])
    randomise(flow, 1, 0.3)
    for c, shape in ((torch.randn(2), (7,)), (torch.randn(3, 2), (5,)), (torch.randn(2), (2, 3))):
        torch.manual_seed(3)
        expected = flow(c).sample(shape)
        torch.manual_seed(3)
        ours = sample(flow, shape, EXACT, c)
        assert ours.shape == expected.shape
        assert torch.equal(ours, expected)
    plain = MAF(3, transforms=2)
    torch.manual_seed(4)
    expected = plain().sample((6,))
    torch.manual_seed(4)
    assert torch.equal(sample(plain, 6, EXACT), expected)


def test_wrapped_flow_takes_zukos_and_the_cores_shapes():
    torch.manual_seed(0)
    flow = MAF(5, 3, transforms=3, randperm=True).double()
    c, z = torch.randn(3, dtype=F64), torch.randn(8, 5, dtype=F64)
    expected = _zuko_inverse(flow, z, c)
    wrapped = wrap(flow, c)
    assert torch.equal(solve_inverse(wrapped, z, EXACT), expected)
    assert torch.equal(solve_inverse(wrapped, z.unsqueeze(-1), EXACT), expected)
    for plan in (Serial(), GSJacobi(2, tol=0.0), "[1-2-*-*]@0"):
        assert torch.equal(solve_inverse(wrapped, z, plan), expected), plan
    per_sample = c.expand(8, 3)
    assert torch.equal(solve_inverse(wrap(flow), z, EXACT, cond=per_sample), expected)
    with pytest.raises(ValueError, match="do not also pass cond"):
        solve_inverse(wrapped, z, EXACT, cond=per_sample)
    with pytest.raises(ValueError, match="one context vector"):
        wrap(flow, per_sample)


def test_grouped_orders_and_adjacency_graphs():
    torch.manual_seed(0)
    grouped = MaskedAutoregressiveTransform(7, passes=3, order=torch.randperm(7)).double()
    block = ar_block(grouped)
    assert isinstance(block, ZukoAffineBlock) and isinstance(block, AffineARBlock)
    z = torch.randn(9, 7, dtype=F64)
    x, solution = inverse(grouped, z, EXACT, return_solution=True)
    assert torch.equal(x, _zuko_inverse(grouped, z))
    assert solution.blocks[0].passes <= grouped.passes + 1  # groups do not read each other
    adjacency = torch.eye(5, dtype=torch.bool)
    adjacency[3, 0] = adjacency[1, 3] = adjacency[4, 1] = adjacency[2, 0] = True  # 0 -> 3 -> 1 -> 4, 0 -> 2
    dag = MaskedAutoregressiveTransform(5, adjacency=adjacency).double()
    randomise(dag, 2, 0.4)
    z = torch.randn(6, 5, dtype=F64)
    assert ar_block(dag).order.tolist() == [0, 2, 3, 1, 4]
    assert torch.equal(inverse(dag, z, EXACT), _zuko_inverse(dag, z))
    with pytest.raises(ValueError, match="cannot pack MaskedAutoregressiveTransform.*not nested"):
        ar_block(dag, bitwise=False)  # a DAG's masks are not triangular in any order of the units


def test_other_univariates_and_transforms_in_between():
    torch.manual_seed(0)
    naf = zuko.flows.NAF(3, transforms=1, signal=4, network={"hidden_features": [8]}).double()
    z = 0.5 * torch.randn(4, 3, dtype=F64)
    block = wrap(naf).blocks[0]
    assert type(block) is ZukoARBlock and isinstance(block, CausalMapBlock)
    assert torch.equal(inverse(naf, z, EXACT), _zuko_inverse(naf, z))
    first, second = MaskedAutoregressiveTransform(4, 2), MaskedAutoregressiveTransform(4, 2, order=[3, 1, 0, 2])
    mixed = ZFlow(
        [first, UnconditionalTransform(PermutationTransform, torch.tensor([2, 0, 3, 1]), buffer=True),
         second.inv, second, zuko.flows.ElementWiseTransform(4, 2)],
        UnconditionalDistribution(DiagNormal, torch.zeros(4), torch.ones(4), buffer=True),
    ).double()
    randomise(mixed, 3, 0.3)
    c, z = torch.randn(5, 2, dtype=F64), torch.randn(5, 4, dtype=F64)
    assert wrap(mixed).num_blocks == 2
    assert torch.equal(inverse(mixed, z, EXACT, c), _zuko_inverse(mixed, z, c))


def test_unsupported_transforms_are_refused_by_name():
    class Hidden(LazyTransform):
        def __init__(self):
            super().__init__()
            self.inner = MaskedAutoregressiveTransform(3)

        def forward(self, c=None):
            return self.inner(c)

    class OwnMeta(MaskedAutoregressiveTransform):
        def meta(self, c, x):
            return super().meta(c, x)

    base = UnconditionalDistribution(DiagNormal, torch.zeros(3), torch.ones(3), buffer=True)
    with pytest.raises(TypeError, match="Hidden contains a MaskedAutoregressiveTransform.*solves zuko"):
        wrap(ZFlow([Hidden()], base))
    with pytest.raises(TypeError, match="OwnMeta overrides.*solves zuko"):
        wrap(ZFlow([OwnMeta(3)], base))
    with pytest.raises(TypeError, match="zuko Flow or LazyTransform"):
        wrap(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="no MaskedAutoregressiveTransform"):
        wrap(ZFlow([zuko.flows.ElementWiseTransform(3)], base))
    layer_norm = MaskedAutoregressiveTransform(3)
    layer_norm.hyper.insert(1, torch.nn.LayerNorm(64))
    with pytest.raises(TypeError, match="LayerNorm, which is not a pointwise activation"):
        ar_block(layer_norm)


def test_training_mode_dropout_or_batch_norm_is_refused_by_name():
    torch.manual_seed(0)
    transform = MaskedAutoregressiveTransform(4, hidden_features=[16, 16])
    transform.hyper.insert(2, torch.nn.Dropout(0.3))
    z = torch.randn(5, 4)
    with pytest.raises(ValueError, match="MaskedAutoregressiveTransform uses dropout in training mode"):
        inverse(transform.train(), z, EXACT)
    assert torch.equal(inverse(transform.eval(), z, EXACT), _zuko_inverse(transform, z))

    class Normalise(LazyTransform):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(4)

        def forward(self, c=None):
            return zuko.transforms.IdentityTransform()

    flow = ZFlow([MaskedAutoregressiveTransform(4), Normalise()],
                 UnconditionalDistribution(DiagNormal, torch.zeros(4), torch.ones(4), buffer=True))
    with pytest.raises(ValueError, match="Normalise has batch norm in training mode"):
        inverse(flow.train(), z, EXACT)
    inverse(flow.eval(), z, EXACT)


@pytest.mark.parametrize("bitwise", [True, False])
def test_weight_updates_are_always_seen(bitwise):
    torch.manual_seed(0)
    flow = MAF(4, 2, transforms=2).double()
    randomise(flow, 0, 0.3)
    c, z = torch.randn(2, dtype=F64), torch.randn(6, 4, dtype=F64)
    plan = EXACT if bitwise else Jacobi(tol=1e-10)
    wrapped = wrap(flow, c, bitwise=bitwise)

    def check(before):
        after = solve_inverse(wrapped, z, plan)
        assert not torch.equal(after, before)
        if bitwise:
            assert torch.equal(after, _zuko_inverse(flow, z, c))
        else:
            torch.testing.assert_close(after, _zuko_inverse(flow, z, c), rtol=1e-8, atol=1e-8)
        return after

    x = solve_inverse(wrapped, z, plan)
    optimiser = torch.optim.SGD(flow.parameters(), lr=0.1)
    flow(c).log_prob(torch.randn(16, 4, dtype=F64)).mean().neg().backward()
    optimiser.step()  # in place: an optimiser step
    x = check(x)
    ema = MAF(4, 2, transforms=2).double()
    for p, q in zip(flow.parameters(), ema.parameters()):
        p.data.mul_(0.5).add_(0.5 * q.data)  # through .data: no version bump (the EMA pattern)
    check(x)


def test_blocks_pass_the_conformance_checks_in_float64():
    torch.manual_seed(0)
    for transform, bitwise in ((MaskedAutoregressiveTransform(5, 3, order=[4, 0, 3, 1, 2]), True),
                               (MaskedAutoregressiveTransform(5, 3, passes=2), False),
                               (NSF(5, 3, transforms=1, bins=4).transform.transforms[0], True)):
        transform = transform.double()
        randomise(transform, 1, 0.3)
        block = ar_block(transform, bitwise=bitwise)
        z = torch.randn(3, 5, 1, dtype=F64)
        check_block(block, z, cond=torch.randn(3, 3, dtype=F64))


def test_affine_blocks_expose_mu_log_sigma_and_the_output_projection():
    torch.manual_seed(0)
    transform = MaskedAutoregressiveTransform(4, order=[3, 2, 1, 0], hidden_features=[16]).double()
    randomise(transform, 0, 0.3)
    block = ar_block(transform)
    x = torch.randn(5, 4, dtype=F64)
    with torch.no_grad():
        y = transform()(x)  # density direction, library order
        mu, log_sigma = block.affine(x[:, block.order].unsqueeze(-1))
    recovered = torch.exp(log_sigma) * y[:, block.order].unsqueeze(-1) + mu
    torch.testing.assert_close(recovered.squeeze(-1), x[:, block.order])
    w_shift, w_scale = block.output_projection()
    assert w_shift.shape == w_scale.shape == (4, 16)
    assert torch.count_nonzero(w_shift[0]) == 0  # the first position (feature 3) reads nothing
