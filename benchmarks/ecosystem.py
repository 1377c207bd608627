"""Benchmark: each library's own autoregressive inverse vs our exact mode vs tolerance plans; one JSON.

For every row (library and model) the same noise is inverted by the library's own call
(zuko's `flow().transform.inv(z)`, nflows' `transform.inverse(z)`, ...), by our exact mode
(`Jacobi(tol=0.0)`, bit for bit the library's result; `exact_segmented`: `GSJacobi(3, tol=0.0)`,
also bit for bit) and by tolerance plans, on the
library's own network evaluation and on packed networks (`bitwise=False`). Methods are timed round-robin in one process (`--rounds`
rounds): each ratio is the library's best time over ours, and `speedup_spread` gives the
smallest and largest per-round ratio; `cpu_speedup` is the same on this thread's CPU time,
which other jobs on a shared machine disturb less. Errors are max-abs against the library's result.

Models are trained briefly (`--steps` Adam steps) on a synthetic dataset with strong
correlations (a random nonlinear map of a low-dimensional latent), so their autoregressive
dependencies are those of a fitted model, not of an initialisation.

    python benchmarks/ecosystem.py --out benchmarks/results/ecosystem.json
    python benchmarks/ecosystem.py --rows zuko-maf-20 --rounds 1 --steps 20   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arflow_solvers import GSJacobi, Jacobi  # noqa: E402

__all__ = ["ROWS", "main"]

ZUKO_HIDDEN = (128, 128)  # the setting of issue #14's measurements: 3 transforms, hidden (128, 128)
EXACT = ("Jacobi(tol=0.0)", Jacobi(tol=0.0), True)
SEGMENTED = ("GSJacobi(3, tol=0.0)", GSJacobi(3, tol=0.0), True)
"""Also exact (each segment stops when unchanged): cheaper where a block computes a segment's rows alone."""
TOLERANCES = [("Jacobi(tol=1e-6)", Jacobi(tol=1e-6), True), ("Jacobi(tol=1e-5)", Jacobi(tol=1e-5), True),
              ("Jacobi(tol=3e-5)", Jacobi(tol=3e-5), True), ("Jacobi(tol=1e-4)", Jacobi(tol=1e-4), True),
              ("Jacobi(tol=1e-5), packed", Jacobi(tol=1e-5), False)]
ZUKO_SETTING = ("issue #14's setting: 3 transforms, hidden (128, 128), trained 300 steps on a tanh-mixed "
                "Gaussian; 10,000 samples at 20 features, 1,000 (MAF) and 64 (NSF) at 200")


def dataset(features: int, count: int, seed: int = 0) -> torch.Tensor:
    """`(count, features)` standardised samples of `W2 tanh(W1 u) + 0.1 e`, `u` of dimension `features // 4`."""
    gen = torch.Generator().manual_seed(seed)
    latent = max(1, features // 4)
    w1 = torch.randn(latent, latent, generator=gen) * 1.5
    w2 = torch.randn(features, latent, generator=gen) / latent**0.5
    u = torch.randn(count, latent, generator=gen)
    x = torch.tanh(u @ w1.T) @ w2.T + 0.1 * torch.randn(count, features, generator=gen)
    return (x - x.mean(0)) / x.std(0)


def train(log_prob: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module, features: int,
          steps: int, batch: int = 256) -> list[float]:
    """`steps` Adam steps of maximum likelihood on `dataset(features)`; returns the losses."""
    data = dataset(features, 8192)
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    module.train()
    for _ in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = -log_prob(x).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    module.eval()
    return losses


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall-clock and CPU (this thread) seconds of `fn()`, and its result."""
    began, began_cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return time.perf_counter() - began, time.thread_time() - began_cpu, out


def measure(name: str, reference: Callable[[], torch.Tensor], ours: Callable[[Any, bool], Any],
            rounds: int, info: dict[str, Any]) -> dict[str, Any]:
    """Time the library's call and each plan round-robin; `ours(plan, bitwise) -> (x, solution)`."""
    methods = [EXACT, SEGMENTED, *TOLERANCES]
    times: dict[str, list[float]] = {"library": []}
    cpu: dict[str, list[float]] = {"library": []}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        with torch.no_grad():
            elapsed, used, expected = _timed(reference)
        times["library"].append(elapsed)
        cpu["library"].append(used)
        for label, plan, bitwise in methods:
            elapsed, used, results[label] = _timed(lambda: ours(plan, bitwise))
            times.setdefault(label, []).append(elapsed)
            cpu.setdefault(label, []).append(used)
    library = times["library"]
    row: dict[str, Any] = {"name": name, **info, "library_s": {"best": min(library), "rounds": library},
                           "library_cpu_s": {"best": min(cpu["library"]), "rounds": cpu["library"]}}
    for label, plan, bitwise in methods:
        x, solution = results[label]
        ratios = [lib / t for lib, t in zip(library, times[label])]
        cpu_ratios = [lib / t for lib, t in zip(cpu["library"], cpu[label])]
        entry = {
            "plan": label, "bitwise": bitwise,
            "best_s": min(times[label]), "rounds_s": times[label],
            "speedup": min(library) / min(times[label]), "speedup_spread": [min(ratios), max(ratios)],
            "cpu_speedup": min(cpu["library"]) / min(cpu[label]),
            "cpu_speedup_spread": [min(cpu_ratios), max(cpu_ratios)],
            "passes_per_layer": [b.passes for b in solution.blocks],
            "max_error": float((x - expected).abs().max().detach()),
            "equal": bool(torch.equal(x, expected)),
        }
        row[{EXACT[0]: "exact", SEGMENTED[0]: "exact_segmented"}.get(label, label)] = entry
    row["tolerance"] = [row.pop(label) for label, _, _ in TOLERANCES]
    return row


# ---------------------------------------------------------------------------------- rows


def zuko_row(kind: str, features: int, samples: int) -> Callable[[argparse.Namespace], dict[str, Any]]:
    def run(args: argparse.Namespace) -> dict[str, Any]:
        import zuko

        from arflow_solvers.adapters.zuko import inverse

        torch.manual_seed(args.seed)
        flow = (zuko.flows.MAF if kind == "MAF" else zuko.flows.NSF)(features, transforms=3,
                                                                     hidden_features=ZUKO_HIDDEN)
        losses = train(lambda x: flow().log_prob(x), flow, features, args.steps)
        z = torch.randn(samples, features)
        info = {"library": "zuko", "model": kind, "features": features, "samples": samples, "layers": 3,
                "hidden": list(ZUKO_HIDDEN), "setting": ZUKO_SETTING, "train_steps": args.steps,
                "final_loss": losses[-1] if losses else None}
        return measure(f"zuko-{kind.lower()}-{features}", lambda: flow().transform.inv(z),
                       lambda plan, bitwise: inverse(flow, z, plan, bitwise=bitwise, return_solution=True),
                       args.rounds, info)
    return run


def nflows_row(features: int, samples: int) -> Callable[[argparse.Namespace], dict[str, Any]]:
    def run(args: argparse.Namespace) -> dict[str, Any]:
        from nflows.flows.autoregressive import MaskedAutoregressiveFlow

        from arflow_solvers import solve
        from arflow_solvers.adapters.nflows import wrap

        torch.manual_seed(args.seed)
        flow = MaskedAutoregressiveFlow(features, hidden_features=128, num_layers=3, num_blocks_per_layer=1)
        losses = train(flow.log_prob, flow, features, args.steps)
        z = torch.randn(samples, features)
        info = {"library": "nflows", "model": "MaskedAutoregressiveFlow", "features": features,
                "samples": samples, "layers": 3, "hidden": [128, "1 residual block"],
                "train_steps": args.steps, "final_loss": losses[-1] if losses else None}

        def ours(plan: Any, bitwise: bool) -> Any:
            solution = solve(wrap(flow, bitwise=bitwise), z.unsqueeze(-1), plan)
            return solution.x.squeeze(-1), solution

        return measure(f"nflows-maf-{features}", lambda: flow._transform.inverse(z)[0], ours, args.rounds, info)
    return run


def normflows_row(features: int, samples: int) -> Callable[[argparse.Namespace], dict[str, Any]]:
    def run(args: argparse.Namespace) -> dict[str, Any]:
        import normflows as nf

        from arflow_solvers.adapters.normflows import forward

        torch.manual_seed(args.seed)
        layers = []
        for _ in range(3):
            layers += [nf.flows.AutoregressiveRationalQuadraticSpline(features, 1, 64, num_bins=8),
                       nf.flows.Permute(features, mode="swap")]
        model = nf.NormalizingFlow(nf.distributions.DiagGaussian(features, trainable=False), layers)
        losses = train(model.log_prob, model, features, args.steps)
        z = torch.randn(samples, features)
        info = {"library": "normflows", "model": "AutoregressiveRationalQuadraticSpline x 3 (sampling)",
                "features": features, "samples": samples, "layers": 3, "hidden": [64, "1 residual block"],
                "train_steps": args.steps, "final_loss": losses[-1] if losses else None}

        def ours(plan: Any, bitwise: bool) -> Any:
            (x, _), solution = forward(model, z, plan, bitwise=bitwise, return_solution=True)
            return x, solution

        return measure(f"normflows-spline-{features}", lambda: model.forward(z), ours, args.rounds, info)
    return run


def pyro_row(features: int, samples: int) -> Callable[[argparse.Namespace], dict[str, Any]]:
    def run(args: argparse.Namespace) -> dict[str, Any]:
        import pyro.distributions as dist
        import pyro.distributions.transforms as T

        from arflow_solvers import solve
        from arflow_solvers.adapters.pyro import wrap

        torch.manual_seed(args.seed)
        transforms: list = []
        for _ in range(3):
            transforms += [T.affine_autoregressive(features, hidden_dims=[2 * features]).inv,
                           T.Permute(torch.randperm(features))]
        base = dist.Normal(torch.zeros(features), torch.ones(features)).to_event(1)
        flow = dist.TransformedDistribution(base, transforms)  # a MAF: sampling runs pyro's inverse loops
        modules = torch.nn.ModuleList(t._inv for t in transforms[0::2])
        losses = train(flow.log_prob, modules, features, args.steps)
        z = torch.randn(samples, features)
        info = {"library": "pyro", "model": "AffineAutoregressive.inv x 3 (sampling)", "features": features,
                "samples": samples, "layers": 3, "hidden": [2 * features], "train_steps": args.steps,
                "final_loss": losses[-1] if losses else None}

        def reference() -> torch.Tensor:
            x = z.clone()  # a new tensor: pyro's one-entry caches must not answer
            for t in transforms:
                x = t(x)
            return x

        def ours(plan: Any, bitwise: bool) -> Any:
            solution = solve(wrap(transforms, direction="forward", bitwise=bitwise), z, plan)
            return solution.x, solution

        return measure(f"pyro-affine-{features}", reference, ours, args.rounds, info)
    return run


def sbi_row(features: int, samples: int) -> Callable[[argparse.Namespace], dict[str, Any]]:
    def run(args: argparse.Namespace) -> dict[str, Any]:
        from sbi.inference import NPE
        from sbi.utils import BoxUniform

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from sbi_posterior import Untracked, simulate

        from arflow_solvers.adapters.sbi import sample

        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        prior = BoxUniform(-torch.ones(features), torch.ones(features))
        theta = prior.sample((5000,))
        inference = NPE(prior=prior, density_estimator="maf", show_progress_bars=False, tracker=Untracked())
        estimator = inference.append_simulations(theta, simulate(theta, generator)).train(
            max_num_epochs=max(5, args.steps // 10), show_train_summary=False)
        posterior = inference.build_posterior(estimator)
        x_o = simulate(prior.sample().unsqueeze(0), generator)
        info = {"library": "sbi", "model": "NPE posterior, nflows MAF (5 transforms, 50 hidden)",
                "features": features, "samples": samples, "layers": 5, "hidden": [50, 50],
                "train_epochs": inference._summary["epochs_trained"][-1], "simulations": 5000}

        def seeded(fn: Callable[[], Any]) -> Any:
            torch.manual_seed(args.seed + 1)
            return fn()

        def ours(plan: Any, bitwise: bool) -> Any:
            x = seeded(lambda: sample(posterior, (samples,), x=x_o, plan=plan, bitwise=bitwise))
            return x, _NoStats()

        return measure(f"sbi-maf-{features}", lambda: seeded(lambda: posterior.sample(
            (samples,), x=x_o, show_progress_bars=False)), ours, args.rounds, info)
    return run


class _NoStats:
    """sbi's rejection loop hides the solutions; passes are not reported for the sbi row."""

    blocks: tuple = ()


ROWS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "zuko-maf-20": zuko_row("MAF", 20, 10_000),
    "zuko-maf-200": zuko_row("MAF", 200, 1_000),
    "zuko-nsf-20": zuko_row("NSF", 20, 10_000),
    "zuko-nsf-200": zuko_row("NSF", 200, 64),
    "nflows-maf-100": nflows_row(100, 1_000),
    "normflows-spline-50": normflows_row(50, 1_000),
    "pyro-affine-50": pyro_row(50, 1_000),
    "sbi-maf-20": sbi_row(20, 10_000),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen rows and print (and optionally write) one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    rows = []
    for name in args.rows:
        rows.append(ROWS[name](args))
        exact, segmented = rows[-1]["exact"], rows[-1]["exact_segmented"]
        print(f"{name}: library {rows[-1]['library_s']['best']:.3f}s, exact {exact['speedup']:.1f}x "
              f"(equal {exact['equal']}), segmented exact {segmented['speedup']:.1f}x (equal {segmented['equal']}), "
              "tolerance "
              + ", ".join(f"{t['speedup']:.1f}x @ {t['max_error']:.1e}" for t in rows[-1]["tolerance"]),
              file=sys.stderr)
    result = {
        "benchmark": "ecosystem",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "torch": torch.__version__},
        "settings": {"rounds": args.rounds, "train_steps": args.steps, "seed": args.seed, "zuko": ZUKO_SETTING,
                     "clocks": "speedup: wall clock (perf_counter); cpu_speedup: this thread's CPU time "
                               "(thread_time), less sensitive to other jobs on the machine"},
        "wall_time_s": None,
        "rows": rows,
    }
    result["wall_time_s"] = time.perf_counter() - began
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
