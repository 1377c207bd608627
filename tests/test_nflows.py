"""arflow_solvers.adapters.nflows: wrapped nflows flows sample exactly what nflows samples, much faster."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nflows")

from nflows.distributions import StandardNormal  # noqa: E402
from nflows.flows import Flow as NFlow  # noqa: E402
from nflows.flows.autoregressive import MaskedAutoregressiveFlow  # noqa: E402
from nflows.transforms import (  # noqa: E402
    CompositeTransform,
    MaskedAffineAutoregressiveTransform,
    MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
    MultiscaleCompositeTransform,
    RandomPermutation,
    ReversePermutation,
)

from arflow_solvers.adapters.nflows import NflowsAffineBlock, NflowsARBlock, NflowsStep, sample, wrap  # noqa: E402
from arflow_solvers import (  # noqa: E402
    AffineARBlock,
    CausalMapBlock,
    GSJacobi,
    Jacobi,
    Serial,
    solve,
    solve_inverse,
)

D = 8


def _condition(flow: torch.nn.Module, seed: int = 0) -> None:
    """Random but well-conditioned MADE outputs: scales near 1, moderate shifts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in flow.modules():
            if isinstance(module, MaskedAffineAutoregressiveTransform):
                final = module.autoregressive_net.final_layer
                final.weight.copy_(0.1 * torch.randn(final.weight.shape, generator=gen))
                final.bias.copy_(0.3 * torch.randn(final.bias.shape, generator=gen))
                final.bias[0::2] += 0.5413  # softplus(0.5413) = 1: scales near 1
                for block in module.autoregressive_net.blocks:
                    for layer in block.linear_layers:
                        layer.weight.add_(0.2 * torch.randn(layer.weight.shape, generator=gen))


def _maf(layers: int = 3, dtype=torch.float32, seed: int = 0) -> NFlow:
    torch.manual_seed(seed)
    flow = MaskedAutoregressiveFlow(D, hidden_features=16, num_layers=layers, num_blocks_per_layer=1)
    _condition(flow, seed)
    return flow.to(dtype).eval()


def _inverse(flow: NFlow, z: torch.Tensor, context=None) -> torch.Tensor:
    with torch.no_grad():
        return flow._transform.inverse(z, context)[0]


def test_wrap_lists_blocks_in_sampling_order():
    flow = _maf(3)
    wrapped = wrap(flow)
    ar = [t for t in flow._transform._transforms if isinstance(t, MaskedAffineAutoregressiveTransform)]
    assert wrapped.num_blocks == 3
    assert [b.transform for b in wrapped.blocks] == ar[::-1]
    assert all(isinstance(b, NflowsAffineBlock) for b in wrapped.blocks)
    assert isinstance(wrapped.steps[1], NflowsStep) and isinstance(wrapped.steps[-1], NflowsStep)
    assert isinstance(wrapped.blocks[0], AffineARBlock) and isinstance(wrapped.blocks[0], CausalMapBlock)
    assert wrap(flow._transform).num_blocks == 3


def test_wrapping_leaves_the_density_unchanged():
    """The wrapper shares the modules: log_prob before and after wrapping (and solving) agree."""
    flow = _maf(2)
    x = torch.randn(5, D)
    with torch.no_grad():
        before = flow.log_prob(x)
        solve(wrap(flow), torch.randn(5, D, 1), Jacobi())
        after = flow.log_prob(x)
    assert torch.equal(before, after)


def test_affine_is_nflows_parameterisation():
    """`affine` is the inverse of nflows' forward: x = exp(log_sigma) * z + mu, sum log_sigma = -logdet."""
    flow = _maf(1, torch.float64)
    transform = flow._transform._transforms[1]
    block = NflowsAffineBlock(transform)
    x = torch.randn(4, D, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = transform(x)
        mu, log_sigma = block.affine(x.unsqueeze(-1))
    torch.testing.assert_close(torch.exp(log_sigma) * z.unsqueeze(-1) + mu, x.unsqueeze(-1))
    torch.testing.assert_close(log_sigma.sum((1, 2)), -logdet)
    w_shift, w_scale = block.output_projection()
    assert w_shift.shape == w_scale.shape == (D, 16)


@pytest.mark.parametrize("plan", [Jacobi(tol=1e-6), GSJacobi(segments=3, tol=1e-6), "[2-4-8-6]"])
def test_inverse_matches_nflows_to_float_tolerance(plan):
    flow = _maf(3)
    z = torch.randn(32, D)
    x = solve_inverse(wrap(flow), z.unsqueeze(-1), plan).squeeze(-1)
    torch.testing.assert_close(x, _inverse(flow, z), rtol=1e-4, atol=1e-4)


def test_exact_mode_and_serial_are_bit_identical_to_flow_sample():
    flow = _maf(3)
    torch.manual_seed(7)
    with torch.no_grad():
        reference = flow.sample(40)
    for plan in (Jacobi(tol=0.0), Serial(), GSJacobi(segments=4, tol=0.0)):
        torch.manual_seed(7)
        x, solution = sample(flow, 40, plan, return_solution=True)
        assert torch.equal(x, reference), plan
        assert solution.status.name == "CONVERGED"
    torch.manual_seed(7)
    capped = sample(flow, 40, Jacobi(tol=0.0, max_iters=2))
    assert not torch.equal(capped, reference)  # the equality above is not vacuous


def test_masked_weights_are_computed_once_and_follow_weight_updates():
    flow = _maf(2)
    block = wrap(flow).blocks[0]
    x, z = torch.randn(5, D, 1), torch.randn(5, D, 1)
    with torch.no_grad():
        cached = block.inverse_map(x, z)
        again = block.inverse_map(x, z)
    assert torch.equal(cached, block.inverse_map(x, z))  # with autograd: nflows' own path
    assert torch.equal(again, cached)
    layer = block.transform.autoregressive_net.final_layer
    assert "forward" not in vars(layer)  # the layer is left as it was
    with torch.no_grad():
        layer.weight.mul_(1.5)  # an in-place update (an optimiser step) must be seen
        updated = block.inverse_map(x, z)
    assert not torch.equal(updated, cached)
    assert torch.equal(updated, block.inverse_map(x, z))


def test_exactness_at_the_bound_in_float64():
    """Jacobi run to its bound (tol=0, no cap) equals nflows' float64 inverse bit for bit."""
    flow = _maf(4, torch.float64)
    z = torch.randn(16, D, dtype=torch.float64)
    solution = solve(wrap(flow), z.unsqueeze(-1), Jacobi(tol=0.0))
    assert torch.equal(solution.x.squeeze(-1), _inverse(flow, z))
    assert all(b.passes <= D for b in solution.blocks)


def _conditional_flow(seed: int = 0) -> NFlow:
    torch.manual_seed(seed)
    transforms = []
    for _ in range(2):
        transforms += [
            MaskedAffineAutoregressiveTransform(D, 16, context_features=4, num_blocks=1),
            RandomPermutation(D),
        ]
    flow = NFlow(CompositeTransform(transforms), StandardNormal([D]), embedding_net=torch.nn.Linear(3, 4))
    _condition(flow, seed)
    return flow.eval()


def test_context_and_embedding_net_match_flow_sample():
    flow = _conditional_flow()
    context = torch.randn(3, 3)
    torch.manual_seed(11)
    with torch.no_grad():
        reference = flow.sample(5, context)
    torch.manual_seed(11)
    x = sample(flow, 5, Jacobi(tol=0.0), context)
    assert x.shape == reference.shape == (3, 5, D)
    assert torch.equal(x, reference)
    torch.manual_seed(11)
    other = sample(flow, 5, Jacobi(tol=0.0), context + 1.0)
    assert not torch.allclose(other, reference)


def test_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    flow = MaskedAutoregressiveFlow(D, 16, num_layers=2, num_blocks_per_layer=1,
                                    batch_norm_between_layers=True)
    _condition(flow)
    flow.train()
    with torch.no_grad():  # move the running statistics away from their defaults
        for _ in range(3):
            flow.log_prob(torch.randn(64, D) * 2 + 1)
    with pytest.raises(ValueError, match="eval"):
        wrap(flow)
    flow.eval()
    z = torch.randn(20, D)
    x = solve_inverse(wrap(flow), z.unsqueeze(-1), Jacobi(tol=0.0)).squeeze(-1)
    assert torch.equal(x, _inverse(flow, z))


def test_rational_quadratic_spline_blocks_via_inverse_map():
    """Non-affine AR transforms are solved through nflows' own elementwise inverse."""
    torch.manual_seed(0)
    transforms = [
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
            D, 16, num_bins=4, tails="linear", tail_bound=4.0, num_blocks=1),
        ReversePermutation(D),
        MaskedAffineAutoregressiveTransform(D, 16, num_blocks=1),
    ]
    flow = NFlow(CompositeTransform(transforms), StandardNormal([D])).eval()
    _condition(flow)
    wrapped = wrap(flow)
    assert type(wrapped.blocks[1]) is NflowsARBlock
    assert not isinstance(wrapped.blocks[1], AffineARBlock)
    z = torch.randn(24, D)
    x = solve_inverse(wrapped, z.unsqueeze(-1), Jacobi(tol=0.0)).squeeze(-1)
    assert torch.equal(x, _inverse(flow, z))
    with torch.no_grad():
        torch.testing.assert_close(flow._transform(x)[0], z, rtol=1e-4, atol=1e-4)


def test_unsupported_inputs_are_rejected_by_name():
    class CustomInverse(MaskedAffineAutoregressiveTransform):
        def inverse(self, inputs, context=None):
            return super().inverse(inputs, context)

    with pytest.raises(TypeError, match="CustomInverse"):
        wrap(CompositeTransform([CustomInverse(D, 8)]))
    multiscale = MultiscaleCompositeTransform(num_transforms=1)
    multiscale.add_transform(MaskedAffineAutoregressiveTransform(D, 8), [D])
    with pytest.raises(TypeError, match="MultiscaleCompositeTransform"):
        wrap(multiscale)
    with pytest.raises(TypeError, match="nflows Flow or Transform"):
        wrap(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_samples"):
        sample(_maf(1), 0, Jacobi())
    with pytest.raises(ValueError, match=r"\(B, 8, 1\)"):
        wrap(_maf(1)).blocks[0].inverse_map(torch.zeros(2, D), torch.zeros(2, D))


def test_jacobi_needs_far_fewer_passes_than_nflows():
    flow = _maf(3)
    solution = solve(wrap(flow), torch.randn(16, D, 1), Jacobi(tol=1e-5))
    assert sum(b.passes for b in solution.blocks) < 3 * D


def test_load_for_planning_rebuilds_an_example_checkpoint(tmp_path):
    from arflow_solvers.adapters.nflows import build_maf, load_for_planning
    from arflow_solvers.__main__ import main

    torch.manual_seed(0)
    maf = build_maf(12, 16, 2, 1)
    path = tmp_path / "maf.pt"
    torch.save({"state_dict": maf.state_dict(), "args": {"hidden": 16, "layers": 2, "blocks": 1}}, path)
    flow, z, cond = load_for_planning(str(path), 5, 3, "cpu")
    assert z.shape == (5, 12, 1) and cond is None and flow.num_blocks == 2
    again = load_for_planning(str(path), 5, 3, "cpu")[1]
    assert torch.equal(z, again)
    x = solve_inverse(flow, z, Jacobi(tol=0.0)).squeeze(-1)
    assert torch.equal(x, maf._transform.inverse(z.squeeze(-1))[0].detach())
    assert main(["plan", str(path), "--model", "nflows", "--batch", "4", "--planner", "calibrated",
                 "--max-error", "1e-4"]) == 0


@pytest.mark.parametrize("bitwise", [True, False])
def test_weights_updated_through_p_data_are_always_seen(bitwise):
    # The EMA pattern: `p.data` updates bump no version counter, so no cache may trust one.
    flow, ema = _maf(2), _maf(2, seed=1)
    wrapped = wrap(ema, bitwise=bitwise)
    z = torch.randn(6, D, 1)
    before = solve_inverse(wrapped, z, Jacobi(tol=0.0))
    for p, q in zip(ema.parameters(), flow.parameters()):
        p.data.mul_(0.5).add_(0.5 * q.data)
    after = solve_inverse(wrapped, z, Jacobi(tol=0.0))
    expected = _inverse(ema, z.squeeze(-1)).unsqueeze(-1)
    assert not torch.allclose(before, after)
    if bitwise:
        assert torch.equal(after, expected)
    else:
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def test_sampling_never_modifies_the_model_so_threads_can_share_it():
    import threading

    flow = _maf(3)
    z = torch.randn(32, D)
    expected = _inverse(flow, z)
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    results, errors = {}, []

    def worker(name):
        try:
            for _ in range(5):
                results[name] = solve_inverse(wrap(flow), z.unsqueeze(-1), Jacobi(tol=0.0)).squeeze(-1)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(torch.equal(x, expected) for x in results.values())
    assert all(torch.equal(v, state[k]) for k, v in flow.state_dict().items())
    assert not any("forward" in vars(m) for m in flow.modules())


def test_a_model_in_training_mode_with_dropout_or_batch_norm_is_refused_by_name():
    z = torch.randn(4, D, 1)
    dropout = NFlow(MaskedAffineAutoregressiveTransform(D, 8, dropout_probability=0.2), StandardNormal([D]))
    with pytest.raises(ValueError, match="dropout in training mode.*eval"):
        solve(wrap(dropout.train()), z, Jacobi())
    solve(wrap(dropout.eval()), z, Jacobi())
    batch_norm = NFlow(MaskedAffineAutoregressiveTransform(D, 8, use_batch_norm=True), StandardNormal([D]))
    running = batch_norm._transform.autoregressive_net.blocks[0].batch_norm_layers[0].running_mean.clone()
    with pytest.raises(ValueError, match="batch norm in training mode"):
        solve(wrap(batch_norm.train()), z, Jacobi())
    assert torch.equal(running, batch_norm._transform.autoregressive_net.blocks[0]
                       .batch_norm_layers[0].running_mean)
