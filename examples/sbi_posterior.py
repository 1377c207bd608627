"""Train NPE (sbi) on a 20-dimensional simulator and sample its posterior with sbi and with our solvers.

    python examples/sbi_posterior.py                      # nflows MAF, 20 parameters, a few CPU minutes
    python examples/sbi_posterior.py --estimator zuko_nsf --dim 30

The simulator needs no download: `theta ~ Uniform(-1, 1)^D`, and each observation mixes the
parameters before it (a scaled running sum) with a nonlinearity and noise, so the posterior
has correlations along the flow's autoregressive order. NPE is trained with sbi's defaults
(z-scored inputs, early stopping, at most `--epochs` epochs). Then the same observation's
posterior is sampled three times from the same seed: `posterior.sample((n,), x=x_o)`, our
exact mode (`Jacobi(tol=0.0)`: the same samples, bit for bit) and a tolerance plan; the
script prints one JSON object with the times, the equality and the errors, and writes it
to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arflow_solvers import Jacobi  # noqa: E402
from arflow_solvers.adapters.sbi import sample  # noqa: E402


def simulate(theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x_i = sum_{j <= i} theta_j / sqrt(i + 1) + 0.3 sin(3 theta_i) + 0.05 noise`."""
    scale = torch.arange(1, theta.shape[-1] + 1, dtype=theta.dtype).sqrt()
    noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
    return theta.cumsum(-1) / scale + 0.3 * torch.sin(3 * theta) + 0.05 * noise


class Untracked:
    """An sbi tracker that logs nothing (sbi's default writes TensorBoard logs into ./sbi-logs)."""

    log_dir = None

    def log_metric(self, name, value, step=None): ...

    def log_metrics(self, metrics, step=None): ...

    def log_params(self, params): ...

    def add_figure(self, name, figure, step=None): ...

    def flush(self): ...


def timed(fn):
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


def main(argv: list[str] | None = None) -> dict:
    """Train, sample three ways, print and write the comparison."""
    from sbi.inference import NPE
    from sbi.utils import BoxUniform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=20, help="parameters (10 to 50 train in a few CPU minutes)")
    parser.add_argument("--simulations", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=40, help="at most this many training epochs")
    parser.add_argument("--estimator", default="maf", help="sbi density estimator: maf, maf_rqs, zuko_maf, zuko_nsf")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--tol", type=float, default=1e-6, help="tolerance of the tolerance plan")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/sbi_posterior/results.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    prior = BoxUniform(-torch.ones(args.dim), torch.ones(args.dim))
    theta = prior.sample((args.simulations,))
    x = simulate(theta, generator)
    inference = NPE(prior=prior, density_estimator=args.estimator, show_progress_bars=False, tracker=Untracked())
    train_s, estimator = timed(lambda: inference.append_simulations(theta, x).train(
        max_num_epochs=args.epochs, show_train_summary=False))
    posterior = inference.build_posterior(estimator)
    theta_o = prior.sample()
    x_o = simulate(theta_o.unsqueeze(0), generator)

    def draw(method):
        torch.manual_seed(args.seed + 1)
        return timed(method)

    sbi_s, reference = draw(lambda: posterior.sample((args.samples,), x=x_o, show_progress_bars=False))
    exact_s, exact = draw(lambda: sample(posterior, (args.samples,), x=x_o, plan=Jacobi(tol=0.0)))
    tol_s, tolerant = draw(lambda: sample(posterior, (args.samples,), x=x_o, plan=Jacobi(tol=args.tol)))
    error = (tolerant - reference).abs()
    result = {
        "example": "sbi_posterior",
        "settings": vars(args) | {"out": str(args.out)},
        "train_s": train_s,
        "epochs_trained": inference._summary["epochs_trained"][-1],
        "posterior_sample_s": sbi_s,
        "exact": {"plan": "Jacobi(tol=0.0)", "s": exact_s, "speedup": sbi_s / exact_s,
                  "equal": bool(torch.equal(exact, reference))},
        "tolerance": {"plan": f"Jacobi(tol={args.tol:g})", "s": tol_s, "speedup": sbi_s / tol_s,
                      "max_error": float(error.max()), "mean_error": float(error.mean())},
        "posterior_mean_error": float((reference.mean(0) - theta_o).abs().mean()),
        "posterior_std": float(reference.std(0).mean()),
    }
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
