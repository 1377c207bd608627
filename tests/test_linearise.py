"""A masked block's own linearisation pulls exactly what autograd through its update pulls.

The adjoint reads a masked block's univariate partial derivatives once
(`TailLinearisation`) instead of differentiating the univariate every iteration; these
tests hold it to the autograd linearisation of the same block, for every pull the adjoint
makes, in float64.
"""

import torch
import zuko
from hypothesis import given, settings, strategies as st

from arflow_solvers.adapters.zuko import ar_block
from arflow_solvers.adjoint import AutogradLinearisation, update_and_log_det

F64 = torch.float64


def zuko_block(spline: bool, order: torch.Tensor, passes: int | None, context: int, seed: int):
    torch.manual_seed(seed)
    univariate = {} if not spline else {"univariate": zuko.transforms.MonotonicRQSTransform, "shapes": [(8,), (8,), (7,)]}
    transform = zuko.flows.MaskedAutoregressiveTransform(len(order), context, order=order, passes=passes,
                                                         hidden_features=(12, 12), **univariate).to(F64)
    with torch.no_grad():
        for p in transform.parameters():
            p.mul_(1.3)
    return ar_block(transform)


def leaves(block, batch, context, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, block.seq_len, 1, dtype=F64, generator=generator).requires_grad_()
    z = torch.randn(batch, block.seq_len, 1, dtype=F64, generator=generator).requires_grad_()
    cond = torch.randn(batch, context, dtype=F64, generator=generator).requires_grad_() if context else None
    return x, z, cond


@settings(max_examples=15, deadline=None)
@given(features=st.integers(2, 6), spline=st.booleans(), reverse=st.booleans(), grouped=st.booleans(),
       context=st.sampled_from([0, 2]), seed=st.integers(0, 1000))
def test_the_tail_linearisation_pulls_what_autograd_pulls(features, spline, reverse, grouped, context, seed):
    order = torch.randperm(features, generator=torch.Generator().manual_seed(seed))
    order = order.flip(0) if reverse else order
    block = zuko_block(spline, order, 2 if grouped and features > 2 else None, context, seed)
    x, z, cond = leaves(block, 3, context, seed)
    params = [*block.parameters()]
    targets = [z, *([cond] if cond is not None else []), *params]
    lam = torch.randn_like(x)
    for g_log_det in (None, torch.randn(x.shape[0], dtype=F64)):
        with torch.enable_grad():  # a final pull frees the graph: one linearisation per seed
            ours = block.linearise(x, z, cond, True)
            reference = AutogradLinearisation(x, *update_and_log_det(block, x, z, cond, 0))
        assert (ours.log_det - reference.log_det).abs().max() <= 1e-12
        assert_same(ours.pull_x(lam, g_log_det), reference.pull_x(lam, g_log_det))
        for got, expected in zip(ours.pull(lam, g_log_det, targets), reference.pull(lam, g_log_det, targets)):
            assert_same(got, expected)


def assert_same(got, expected):
    if expected is None:
        assert got is None or not bool(got.any())
        return
    assert got is not None and got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-10 * (1 + expected.abs().max())


def test_a_univariate_that_is_not_elementwise_is_differentiated_by_autograd():
    from arflow_solvers.adapters._masked.block import ELEMENTWISE
    from arflow_solvers.adapters.zuko import ZukoARBlock

    class Mixing(ZukoARBlock):  # each output also reads the next feature's noise
        def univariate_inverse(self, params, z):
            return super().univariate_inverse(params, z) + 0.1 * z.roll(-1, dims=1)

    torch.manual_seed(0)
    transform = zuko.flows.MaskedAutoregressiveTransform(4, hidden_features=(8,)).to(F64)
    block = Mixing(transform)
    x, z, _ = leaves(block, 3, 0, 0)
    with torch.enable_grad():
        assert block.linearise(x, z, None, False) is None
    assert ELEMENTWISE[transform] is False


@settings(max_examples=10, deadline=None)
@given(features=st.integers(2, 6), slope=st.sampled_from([1e-3, 1e-2, 0.5]), with_log_det=st.booleans(),
       seed=st.integers(0, 1000))
def test_closed_form_partials_equal_autograds(features, slope, with_log_det, seed):
    """An adapter's `univariate_partials` (zuko's affine) is autograd's partials of its own inverse."""
    import functools

    from arflow_solvers.adapters._masked.linearise import autograd_partials

    torch.manual_seed(seed)
    univariate = functools.partial(zuko.transforms.MonotonicAffineTransform, slope=slope)
    transform = zuko.flows.MaskedAutoregressiveTransform(features, univariate=univariate,
                                                         hidden_features=(8,)).to(F64)
    block = ar_block(transform)
    grouped = 3 * torch.randn(5, 2, features, dtype=F64)  # (B, P, F): shift and raw scale
    z, x = torch.randn(2, 5, features, dtype=F64)
    rows = block.network.param_rows.T.reshape(-1)

    def tail(p, z, x):
        params = p.flatten(1)[:, torch.argsort(rows)]  # the library's layout
        return block.univariate_inverse_and_log_det(params, z, x) if with_log_det else (block.univariate_inverse(params, z), None)

    ours = block.univariate_partials(grouped, z, x, with_log_det)
    reference = autograd_partials(tail, grouped, z, x, with_log_det)
    for name in ("du_dp", "du_dz", "log_det", "dl_dp", "dl_dz", "dl_dx"):
        assert_same(getattr(ours, name), getattr(reference, name))
