"""arflow_solvers.adapters.sbi: posterior.sample with the flow's inverses solved, the same rejection, the same bits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sbi")

from sbi.inference import NPE  # noqa: E402
from sbi.utils import BoxUniform  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from sbi_posterior import Untracked  # noqa: E402  (an sbi tracker that writes no logs)

from arflow_solvers import Jacobi  # noqa: E402
from arflow_solvers.adapters.sbi import proposal, sample  # noqa: E402

D = 3


def _posterior(model: str):
    torch.manual_seed(0)
    prior = BoxUniform(-2 * torch.ones(D), 2 * torch.ones(D))
    theta = prior.sample((400,))
    x = theta + 0.3 * torch.randn_like(theta)
    inference = NPE(prior=prior, density_estimator=model, show_progress_bars=False, tracker=Untracked())
    estimator = inference.append_simulations(theta, x).train(max_num_epochs=8, show_train_summary=False)
    return inference.build_posterior(estimator)


@pytest.fixture(scope="module", params=["maf", "zuko_nsf"])
def posterior(request):
    return _posterior(request.param)


def test_exact_mode_is_posterior_sample_bit_for_bit(posterior):
    x_o = torch.full((1, D), 0.5)
    torch.manual_seed(3)
    expected = posterior.sample((300,), x=x_o, show_progress_bars=False)
    torch.manual_seed(3)
    ours = sample(posterior, (300,), x=x_o, plan=Jacobi(tol=0.0))
    assert ours.shape == expected.shape == (300, D)
    assert torch.equal(ours, expected)
    posterior.set_default_x(x_o)
    torch.manual_seed(4)
    expected = posterior.sample((2, 5), show_progress_bars=False)
    torch.manual_seed(4)
    assert torch.equal(sample(posterior, (2, 5)), expected)


def test_samples_outside_the_prior_are_rejected_as_sbi_does(posterior):
    x_o = torch.full((1, D), 1.9)  # near the box's edge: many proposals fall outside it
    torch.manual_seed(5)
    expected = posterior.sample((200,), x=x_o, show_progress_bars=False, max_sampling_batch_size=64)
    torch.manual_seed(5)
    ours = sample(posterior, (200,), x=x_o, plan=Jacobi(tol=0.0), max_sampling_batch_size=64)
    assert torch.equal(ours, expected)
    assert bool(((ours > -2) & (ours < 2)).all())
    torch.manual_seed(5)
    unfiltered = sample(posterior, (200,), x=x_o, plan=Jacobi(tol=0.0), reject_outside_prior=False)
    torch.manual_seed(5)
    expected = posterior.sample((200,), x=x_o, show_progress_bars=False, reject_outside_prior=False)
    assert torch.equal(unfiltered, expected)


def test_tolerance_plans_are_within_their_tolerance(posterior):
    x_o = torch.zeros(1, D)
    torch.manual_seed(6)
    expected = posterior.sample((200,), x=x_o, show_progress_bars=False, reject_outside_prior=False)
    torch.manual_seed(6)
    ours = sample(posterior, (200,), x=x_o, plan=Jacobi(tol=1e-6), reject_outside_prior=False, bitwise=False)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_what_is_not_supported_is_refused_by_name():
    with pytest.raises(TypeError, match="DirectPosterior"):
        sample(object(), (3,), x=torch.zeros(1, D))
    with pytest.raises(TypeError, match="Linear is not supported.*NFlowsFlow"):
        proposal(torch.nn.Linear(2, 2), Jacobi())
