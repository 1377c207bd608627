"""Benchmark: one variational-inference gradient step, implicit adjoint vs autograd through zuko's loop; one JSON.

The step: draw `x, log q(x)` by `rsample_and_log_prob(batch)`, take the ELBO loss
`mean(log q(x) - log p(x))` against a standard normal target `p`, and its gradient w.r.t.
every parameter of a zuko MAF (3 transforms, hidden (128, 128), trained `--steps` steps of
maximum likelihood on the ecosystem benchmark's data). Methods, timed round-robin in one
process with the same noise, each timed step after an untimed step of the same method (as
steps follow each other in training):

- `zuko`: `flow().rsample_and_log_prob` and `torch.autograd.grad` through zuko's `features`
  network passes per transform (the reference gradient);
- `ours exact`: [`rsample_and_log_prob`][arflow_solvers.adapters.zuko.rsample_and_log_prob]
  with `Jacobi(tol=0.0)` (samples equal to zuko's bit for bit) and adjoints to their bound;
- `ours tol`: `Jacobi(tol=1e-6)` and `adjoint_tol=1e-6`;
- `ours tol 3e-5`: `Jacobi(tol=3e-5)` and `adjoint_tol=1e-3`, a looser pair whose gradient
  still stays well inside the issue's bound (max relative error 1e-5; the JSON gives the
  error). Variational inference needs no more: its Monte Carlo gradient noise is far larger.

Per method: best time and spread, speedup over zuko, the gradient's max relative error
(`max |g - g_zuko| / max |g_zuko|` over all parameters), forward passes and adjoint iterations
per transform, and the peak memory of the step (resident-set growth in a fresh process) as a
multiple of one density evaluation's gradient step (`flow().log_prob(x)` and its backward on
the same batch: the activations of one network evaluation per transform).

    python benchmarks/grad.py --out benchmarks/results/grad.json
    python benchmarks/grad.py --sizes 20:64 --rounds 1 --steps 5   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arflow_solvers import Jacobi  # noqa: E402
from _common import environment, peak_rss_growth_mib, time_summary, timed_rounds, write_json  # noqa: E402
from ecosystem import ZUKO_HIDDEN, train  # noqa: E402

__all__ = ["main", "METHODS"]

METHODS = {"zuko": None, "ours exact": (Jacobi(tol=0.0), 0.0), "ours tol": (Jacobi(tol=1e-6), 1e-6),
           "ours tol 3e-5": (Jacobi(tol=3e-5), 1e-3)}
DEFAULT_SIZES = ["20:512", "100:512", "400:256"]  # features:batch, the table
TRANSFORMS = 3


def build(features: int, steps: int) -> torch.nn.Module:
    import zuko

    torch.manual_seed(0)
    flow = zuko.flows.MAF(features, transforms=TRANSFORMS, hidden_features=ZUKO_HIDDEN)
    if steps:  # a memory probe loads trained weights instead
        train(lambda x: flow().log_prob(x), flow, features, steps)
    return flow.eval()


def gradient_step(flow: torch.nn.Module, method: str, batch: int, seed: int) -> tuple[list[torch.Tensor], Any]:
    """The ELBO loss's gradient w.r.t. every parameter, and the Solution (ours) or `None` (zuko)."""
    from arflow_solvers.adapters.zuko import rsample_and_log_prob

    params = list(flow.parameters())
    torch.manual_seed(seed)
    solution = None
    if METHODS[method] is None:
        x, log_q = flow().rsample_and_log_prob((batch,))
    else:
        plan, adjoint_tol = METHODS[method]
        x, log_q, solution = rsample_and_log_prob(flow, (batch,), plan, adjoint_tol=adjoint_tol,
                                                  return_solution=True)
    loss = (log_q + 0.5 * x.square().sum(-1)).mean()
    return list(torch.autograd.grad(loss, params)), solution


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in expected)
    return max(float((a - b).abs().max()) for a, b in zip(got, expected)) / scale


def peak_memory_mib(state: str, features: int, batch: int, method: str) -> float:
    """Resident-set growth of one step (or of one density evaluation, `method="density"`) in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed large blocks go back at once
    out = subprocess.run([sys.executable, __file__, "--probe", method, "--state", state,
                          "--sizes", f"{features}:{batch}"], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["grew_mib"]


def _probe(args: argparse.Namespace) -> None:
    features, batch = _sizes(args.sizes)[0]
    torch.set_num_threads(1)
    flow = build(features, 0)
    flow.load_state_dict(torch.load(args.state, weights_only=True))

    def step(n: int) -> None:
        if args.probe == "density":
            with torch.no_grad():
                x = flow().sample((n,))
            flow().log_prob(x).mean().backward()
        else:
            gradient_step(flow, args.probe, n, 0)

    step(2)  # imports and first-call allocations
    print(json.dumps({"grew_mib": peak_rss_growth_mib(lambda: step(batch))}))


def measure(features: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    flow = build(features, args.steps)
    fns = {name: (lambda name=name: gradient_step(flow, name, batch, args.seed)) for name in METHODS}
    times, outputs = timed_rounds(fns, rounds=args.rounds, until=time.monotonic() + args.budget,
                                  first_round_s=0.0, sync=lambda: None, log=_log, warm=1)
    reference = outputs["zuko"][0][0]
    with tempfile.TemporaryDirectory() as folder:
        state = str(Path(folder) / "flow.pt")
        torch.save(flow.state_dict(), state)
        density_mib = peak_memory_mib(state, features, batch, "density")
        memory = {name: peak_memory_mib(state, features, batch, name) for name in METHODS}
    row: dict[str, Any] = {"features": features, "batch": batch, "transforms": TRANSFORMS,
                           "hidden": list(ZUKO_HIDDEN), "train_steps": args.steps,
                           "density_step_peak_mib": density_mib, "methods": {}}
    zuko_best = min(times["zuko"])
    for name in METHODS:
        grads, solution = outputs[name][0]
        entry = {**time_summary(times[name]), "speedup": zuko_best / min(times[name]),
                 "speedup_per_round": [round(a / b, 3) for a, b in zip(times["zuko"], times[name])],
                 "gradient_error": relative_error(grads, reference), "peak_mib": memory[name],
                 "peak_vs_density_step": memory[name] / max(density_mib, 1e-9)}
        if solution is not None:
            entry["passes_per_transform"] = [b.passes for b in solution.blocks]
            entry["adjoint_iterations_per_transform"] = [a.iterations for a in solution.adjoint]
        row["methods"][name] = entry
        _log(f"{features}:{batch} {name}: {min(times[name]):.3f} s, x{entry['speedup']:.1f}, "
             f"error {entry['gradient_error']:.1e}, peak {memory[name]:.0f} MiB")
    return row


def _sizes(texts: list[str]) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in text.split(":")) for text in texts]  # type: ignore[misc]
    except ValueError:
        raise SystemExit(f"--sizes takes features:batch pairs such as 100:512; got {texts}") from None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="features:batch pairs")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of timing rounds per size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--state", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        _probe(args)
        return {}
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    rows = [measure(features, batch, args) for features, batch in _sizes(args.sizes)]
    result = {"benchmark": "grad", "environment": environment(torch.device("cpu")),
              "settings": {"rounds": args.rounds, "steps": args.steps, "seed": args.seed,
                           "methods": {k: None if v is None else {"plan": repr(v[0]), "adjoint_tol": v[1]}
                                       for k, v in METHODS.items()}},
              "rows": rows, "wall_time_s": time.perf_counter() - began}
    if args.out:
        write_json(args.out, result)
    print(json.dumps({row["features"]: {k: round(v["speedup"], 2) for k, v in row["methods"].items()}
                      for row in rows}))
    return result


if __name__ == "__main__":
    main()
