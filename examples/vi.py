"""Variational inference with a MAF in the sampling direction: zuko's own gradients vs the implicit adjoint.

    python examples/vi.py                        # Bayesian logistic regression, 200 weights
    python examples/vi.py --features 50 --steps 300 --png elbo.png

The posterior is that of a Bayesian logistic regression on a generated data set (no
download): weights `w ~ N(0, I)`, inputs `a_i ~ N(0, I / D)`, labels
`y_i ~ Bernoulli(sigmoid(a_i . w_true))`. The variational family is a zuko MAF; the loss is
the negative ELBO `E_q[log q(w) - log p(w, y)]`, estimated from `--batch` reparameterised
samples per step. The same flow (same initial weights, same noise each step, same Adam) is
trained twice: once through zuko's `rsample_and_log_prob` (autograd through its `features`
network passes per transform), once through ours (each inverse solved by a plan and
differentiated by its implicit adjoint). The script prints one JSON object (ELBO per step,
wall time per step, final ELBOs estimated on fresh samples, the speedup) and, with `--png`,
draws ELBO against wall time for both.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arflow_solvers import Jacobi  # noqa: E402
from arflow_solvers.adapters.zuko import rsample_and_log_prob  # noqa: E402


def logistic_regression(features: int, points: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`log p(w, y)` for `(S, D)` weights, up to a constant, on a generated data set."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(points, features, generator=gen) / features**0.5
    truth = torch.randn(features, generator=gen)
    labels = torch.bernoulli(torch.sigmoid(inputs @ truth), generator=gen)
    signs = 2 * labels - 1

    def log_joint(w: torch.Tensor) -> torch.Tensor:
        log_likelihood = torch.nn.functional.logsigmoid(signs * (w @ inputs.T)).sum(-1)
        return log_likelihood - 0.5 * w.square().sum(-1)

    return log_joint


def draw(method: str, flow: torch.nn.Module, batch: int, plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "zuko":
        return flow().rsample_and_log_prob((batch,))
    return rsample_and_log_prob(flow, (batch,), plan, adjoint_tol=1e-6)


def train(method: str, flow: torch.nn.Module, log_joint: Callable, args: argparse.Namespace) -> dict[str, Any]:
    """`--steps` Adam steps on the negative ELBO; the noise of step `k` is seeded by `k`."""
    optimiser = torch.optim.Adam(flow.parameters(), lr=args.lr)
    plan = Jacobi(tol=args.tol)
    elbos, seconds = [], []
    for step in range(args.steps):
        began = time.perf_counter()
        torch.manual_seed(args.seed + step)
        w, log_q = draw(method, flow, args.batch, plan)
        loss = (log_q - log_joint(w)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        seconds.append(time.perf_counter() - began)
        elbos.append(-float(loss.detach()))
        if args.progress and (step + 1) % max(1, args.steps // 10) == 0:
            print(f"{method}: step {step + 1}/{args.steps}, ELBO {elbos[-1]:.2f}, "
                  f"{sum(seconds):.1f} s", file=sys.stderr, flush=True)
    return {"elbo": elbos, "seconds": seconds, "final_elbo": final_elbo(flow, log_joint, args)}


def final_elbo(flow: torch.nn.Module, log_joint: Callable, args: argparse.Namespace) -> dict[str, float]:
    """The ELBO on `--eval-samples` fresh samples (zuko's sampler, no gradient): mean and its standard error."""
    torch.manual_seed(args.seed + 10**6)
    with torch.no_grad():
        w, log_q = flow().rsample_and_log_prob((args.eval_samples,))
        values = log_joint(w) - log_q
    return {"mean": float(values.mean()), "stderr": float(values.std() / len(values) ** 0.5)}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, result in results.items():
        elapsed = torch.tensor(result["seconds"]).cumsum(0)
        ax.plot(elapsed, result["elbo"], label=method)
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("ELBO (one batch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import zuko

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=200, help="number of regression weights")
    parser.add_argument("--points", type=int, default=500, help="data points")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64, help="samples per ELBO estimate")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tol", type=float, default=1e-6, help="our forward solves' tolerance")
    parser.add_argument("--transforms", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--eval-samples", type=int, default=4096)
    parser.add_argument("--methods", nargs="+", default=["zuko", "ours"], choices=["zuko", "ours"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--progress", action="store_true", help="a line every tenth of the steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log_joint = logistic_regression(args.features, args.points, args.seed)
    torch.manual_seed(args.seed)
    initial = zuko.flows.MAF(args.features, transforms=args.transforms, hidden_features=tuple(args.hidden))
    results = {method: train(method, copy.deepcopy(initial), log_joint, args) for method in args.methods}
    summary: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "methods": results}
    if len(results) == 2:
        zuko_s, ours_s = sum(results["zuko"]["seconds"]), sum(results["ours"]["seconds"])
        summary["speedup"] = zuko_s / ours_s
        gap = results["ours"]["final_elbo"]["mean"] - results["zuko"]["final_elbo"]["mean"]
        noise = (results["ours"]["final_elbo"]["stderr"] ** 2 + results["zuko"]["final_elbo"]["stderr"] ** 2) ** 0.5
        summary["final_elbo_gap"] = {"ours_minus_zuko": gap, "in_standard_errors": gap / noise}
    if args.png:
        plot(results, args.png)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"speedup": summary.get("speedup"), "final_elbo_gap": summary.get("final_elbo_gap"),
                      **{method: result["final_elbo"] for method, result in results.items()}}))
    return summary


if __name__ == "__main__":
    main()
