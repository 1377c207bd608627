"""Train an nflows MAF on MNIST, then sample it with nflows and with Jacobi / GS-Jacobi plans.

The MAF paper's MNIST setup (arXiv 1705.07057): pixels dequantised with uniform noise and
mapped to logit space, a `MaskedAutoregressiveFlow` of MADE layers with reversals between
them, trained by maximum likelihood. Sampling it with nflows (`flow.sample`) costs `784`
network passes per layer; the solvers of GS-Jacobi (arXiv 2505.12849) need a few dozen.

    python examples/mnist_maf.py                              # tiny generated digits, < 1 min
    python examples/mnist_maf.py --data .cache/mnist/mnist.pkl.gz --minutes 20

The checkpoint is cached under `runs/` (keyed by the model and data flags); a second run
only samples. Writes `results.json` and `samples.png` beside it and prints a table: wall
time, speedup vs nflows and vs our serial solver, network passes, and the error vs serial.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from mnist_data import LAMBDA, dequantize_logit, load_mnist, logit_to_pixels, synthetic_digits  # noqa: E402

from arflow_solvers.adapters.nflows import build_maf, sample as solver_sample, wrap  # noqa: E402
from arflow_solvers import GSJacobi, Jacobi, Plan, Serial, solve  # noqa: E402

__all__ = ["Packed", "build_flow", "methods", "compare", "format_table", "save_grid", "main"]


class Packed(NamedTuple):
    """A method that runs `plan` on packed MADEs (`wrap(flow, bitwise=False)`)."""

    plan: Any

    def __str__(self) -> str:
        return f"{self.plan}, packed"


def build_flow(features: int, hidden: int, layers: int, blocks: int) -> Any:
    """nflows' `MaskedAutoregressiveFlow` as the MAF paper uses it (reversals, residual MADEs)."""
    return build_maf(features, hidden, layers, blocks)


def methods(num_blocks: int) -> dict[str, Any]:
    """The sampling methods compared: name -> plan (`None` is nflows' own `flow.sample`).

    `J-10/20/30` are the paper's fixed caps (tolerance 0: they stop early only when the
    iterate stops changing); `exact` iterates to the fixed point, which equals nflows' answer
    bit for bit. `give up` rows abandon a diverging sample (NaN) instead of re-solving it.
    `packed` rows evaluate MAF's blocks on packed MADEs (the masked zeros skipped), equal to
    nflows' to float rounding.
    """
    return {
        "nflows": None,
        "serial": Serial(),
        "J-10": Plan.parse("[10]", num_blocks, tol=0.0),
        "J-20": Plan.parse("[20]", num_blocks, tol=0.0),
        "J-30": Plan.parse("[30]", num_blocks, tol=0.0),
        "Jacobi tol=1e-4": Jacobi(tol=1e-4),
        "Jacobi tol=1e-5": Jacobi(tol=1e-5),
        "Jacobi tol=1e-6": Jacobi(tol=1e-6),
        "GS-Jacobi M=8 tol=1e-5": GSJacobi(segments=8, tol=1e-5),
        "exact (tol=0)": Jacobi(tol=0.0),
        "Jacobi tol=1e-6, give up": Jacobi(tol=1e-6, on_divergence="give_up"),
        "exact, give up": Jacobi(tol=0.0, on_divergence="give_up"),
        "packed Jacobi tol=1e-6": Packed(Jacobi(tol=1e-6)),
        "packed Jacobi tol=1e-6, give up": Packed(Jacobi(tol=1e-6, on_divergence="give_up")),
    }


def _sampler(flow: Any, num_samples: int, plan: Any, seed: int) -> Any:
    """A function drawing the seeded noise and sampling it with `plan` (`None`: nflows)."""
    def run() -> tuple[torch.Tensor, Any]:
        torch.manual_seed(seed)
        if plan is None:
            with torch.no_grad():
                return flow.sample(num_samples), None
        packed = isinstance(plan, Packed)
        return solver_sample(flow, num_samples, plan.plan if packed else plan,
                             return_solution=True, throw=False, bitwise=not packed)
    return run


def float64_reference(flow: Any, num_samples: int, seed: int) -> torch.Tensor:
    """The same samples from a float64 copy of `flow` (exact mode): the float32 results' truth.

    Measures how far float32 serial sampling itself is from the exact answer, the floor
    under which an error "vs serial" is only rounding noise amplified by the flow.
    """
    flow64 = copy.deepcopy(flow).double()
    torch.manual_seed(seed)
    with torch.no_grad():
        noise = flow._distribution.sample(num_samples).double()
    x = solve(wrap(flow64), noise.reshape(num_samples, -1, 1), Jacobi(tol=0.0), throw=False).x
    return x.reshape(noise.shape)


def compare(
    flow: Any,
    num_samples: int,
    plans: dict[str, Any],
    *,
    seed: int = 0,
    repeats: int = 1,
    progress: bool = True,
    float64: bool = False,
    slot_seconds: float = 0.0,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Sample `flow` with every method from the same noise; time it and measure the error.

    Methods are timed round-robin, `repeats` rounds, keeping each one's fastest: a machine
    whose load drifts slows all of them alike. In each turn a method runs again until it has
    used `slot_seconds`, so a 0.4 s method gets as many chances to dodge a load burst as a
    20 s baseline averages over. Returns one row per method (wall time,
    speedups, passes, errors vs our serial solver over the samples serial finds finite, how
    many samples are non-finite, whether it equals nflows bit for bit; with `float64`, also
    the errors vs a float64 exact solve) and the samples per method. `plans` must hold
    `"nflows"` (`None`) and `"serial"`.
    """
    flow.eval()
    runs = {name: _sampler(flow, num_samples, plan, seed) for name, plan in plans.items()}
    walls: dict[str, float] = {name: math.inf for name in plans}
    outputs: dict[str, Any] = {}
    bar = tqdm(total=repeats * len(runs), desc="sampling", disable=not progress)
    for _ in range(repeats):
        for name, run in runs.items():
            bar.set_postfix_str(name)
            spent = 0.0
            while spent < slot_seconds or spent == 0.0:  # short methods: several runs per turn
                began = time.perf_counter()
                outputs[name] = run()
                took = time.perf_counter() - began
                walls[name] = min(walls[name], took)
                spent += took
            bar.update()
    bar.close()
    rows, samples = [], {}
    for name, plan in plans.items():
        x, solution = outputs[name]
        samples[name] = x
        row: dict[str, Any] = {"method": name, "plan": "nflows flow.sample" if plan is None
                               else str(plan), "wall_s": walls[name]}
        if solution is None:
            row["passes"] = _nflows_passes(flow)
            row["passes_per_block"] = None
        else:
            row["passes"] = sum(b.passes for b in solution.blocks)
            row["passes_per_block"] = [b.passes for b in solution.blocks]
            row["status"] = solution.status.name
        rows.append(row)
    reference, nflows_x = samples["serial"], samples["nflows"]
    finite = torch.isfinite(reference).all(dim=1)  # the model itself may overflow on some noise
    truth = float64_reference(flow, num_samples, seed) if float64 else None
    for row in rows:
        x = samples[row["method"]]
        error = (x[finite] - reference[finite]).abs()
        row["nonfinite_samples"] = int((~torch.isfinite(x).all(dim=1)).sum())
        row["speedup_vs_nflows"] = rows[0]["wall_s"] / row["wall_s"]
        row["speedup_vs_serial"] = next(r for r in rows if r["method"] == "serial")["wall_s"] / row["wall_s"]
        row["mae_vs_serial"] = float(error.mean())
        row["max_abs_err_vs_serial"] = float(error.max())
        row["samples_over_1e-4_vs_serial"] = int((error.amax(dim=1) > 1e-4).sum())
        if truth is not None:
            error64 = (x[finite].double() - truth[finite]).abs()
            row["mae_vs_float64"] = float(error64.mean())
            row["max_abs_err_vs_float64"] = float(error64.max())
        row["bit_identical_to_nflows"] = _same(x, nflows_x)
    return rows, samples


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, counting nan == nan (a sample the model overflows on)."""
    return bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def _nflows_passes(flow: Any) -> int:
    """Network passes of nflows' inverse: `features` per autoregressive transform."""
    from nflows.transforms.autoregressive import AutoregressiveTransform

    return sum(int(t.autoregressive_net.initial_layer.in_features)
               for t in flow._transform.modules() if isinstance(t, AutoregressiveTransform))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of `compare`'s rows."""
    width = max(24, *(len(r["method"]) + 2 for r in rows))
    head = (f"{'method':<{width}}{'wall s':>9}{'x nflows':>10}{'x serial':>10}{'passes':>8}"
            f"{'MAE':>11}{'max err':>11}{'nan':>5}  ==nflows")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<{width}}{r['wall_s']:>9.3f}{r['speedup_vs_nflows']:>10.1f}"
            f"{r['speedup_vs_serial']:>10.1f}{r['passes']:>8}{r['mae_vs_serial']:>11.2e}"
            f"{r['max_abs_err_vs_serial']:>11.2e}{r['nonfinite_samples']:>5}"
            f"  {'yes' if r['bit_identical_to_nflows'] else 'no'}"
        )
    return "\n".join(lines)


def save_grid(samples: dict[str, torch.Tensor], path: Path, columns: int = 10, rows: int = 1) -> bool:
    """`rows` rows of digits per method (logit space mapped to pixels); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    count = len(next(iter(samples.values())))
    columns = min(columns, count)
    rows = max(1, min(rows, count // columns))
    fig, axes = plt.subplots(len(samples) * rows, columns, squeeze=False,
                             figsize=(columns * 0.9, len(samples) * rows * 1.0))
    for i, (name, x) in enumerate(samples.items()):
        images = logit_to_pixels(x[: rows * columns]).reshape(-1, 28, 28)
        for k, image in enumerate(images):
            ax = axes[i * rows + k // columns, k % columns]
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i * rows, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def bits_per_pixel(flow: Any, pixels: torch.Tensor, batch: int = 500) -> float:
    """Test bits/pixel in pixel space `[0, 256)`, undoing the logit's Jacobian (as the MAF paper)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in pixels.split(batch):
            y = dequantize_logit(chunk)
            s = torch.sigmoid(y)
            # log |dy/dx| for y = logit(lambda + (1 - 2 lambda) x), x = pixel / 256
            log_jac = (math.log(1 - 2 * LAMBDA) - torch.log(s) - torch.log1p(-s)).sum(1)
            log_px = flow.log_prob(y) + log_jac - y.shape[1] * math.log(256.0)
            total += float(log_px.sum())
            count += len(chunk)
    return -total / count / (pixels.shape[1] * math.log(2))


def train(flow: Any, pixels: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Maximum likelihood with Adam; stops after `--steps` or `--minutes`, whichever first."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    began = time.perf_counter()
    flow.train()
    bar = tqdm(range(args.steps), desc="training")
    for step in bar:
        index = torch.randint(len(pixels), (args.batch_size,), generator=generator)
        y = dequantize_logit(pixels[index], generator)
        loss = -flow.log_prob(y).mean() / y.shape[1]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(nats_per_dim=f"{losses[-1]:.3f}")
        if args.minutes and time.perf_counter() - began > 60 * args.minutes:
            break
    flow.eval()
    return losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; model and run-size defaults depend on whether real data is given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="MNIST: IDX folder, mnist.npz or mnist.pkl.gz (default: generated digits)")
    p.add_argument("--hidden", type=int, help="MADE width (default 512 with --data, else 64)")
    p.add_argument("--layers", type=int, help="MADE layers (default 5 with --data, else 2)")
    p.add_argument("--blocks", type=int, default=1, help="residual blocks per MADE")
    p.add_argument("--steps", type=int, help="training steps (default 5000 with --data, else 100)")
    p.add_argument("--minutes", type=float, default=0.0, help="stop training after this long (0: no limit)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, help="images per method (default 64 with --data, else 16)")
    p.add_argument("--repeats", type=int, default=1, help="time each method this many times, keep the best")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/mnist_maf", help="folder for checkpoint, JSON and PNG")
    p.add_argument("--retrain", action="store_true", help="ignore a cached checkpoint")
    args = p.parse_args(argv)
    real = args.data is not None
    for name, with_data, without in (("hidden", 512, 64), ("layers", 5, 2),
                                     ("steps", 5000, 100), ("samples", 64, 16)):
        if getattr(args, name) is None:
            setattr(args, name, with_data if real else without)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or load) the MAF, compare the samplers, print the table, write JSON and PNG."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.data:
        pixels, _ = load_mnist(args.data, "train")
        test_pixels, _ = load_mnist(args.data, "test")
        dataset = Path(args.data).name
    else:
        pixels, _ = synthetic_digits(2000, seed=args.seed)
        test_pixels, _ = synthetic_digits(500, seed=args.seed + 1)
        dataset = "generated"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{dataset}-h{args.hidden}-l{args.layers}-b{args.blocks}-s{args.steps}-seed{args.seed}"
    checkpoint = out / f"maf-{tag}.pt"
    flow = build_flow(784, args.hidden, args.layers, args.blocks)
    if checkpoint.exists() and not args.retrain:
        saved = torch.load(checkpoint, map_location="cpu")
        flow.load_state_dict(saved["state_dict"])
        losses, trained_s = saved["losses"], saved["trained_s"]
        print(f"loaded {checkpoint} ({len(losses)} steps)")
    else:
        began = time.perf_counter()
        losses = train(flow, pixels, args)
        trained_s = time.perf_counter() - began
        torch.save({"state_dict": flow.state_dict(), "losses": losses, "trained_s": trained_s,
                    "args": vars(args)}, checkpoint)
    flow.eval()
    bpp = bits_per_pixel(flow, test_pixels[:1000])
    print(f"model: {dataset}, hidden {args.hidden}, {args.layers} layers, {len(losses)} steps "
          f"({trained_s:.0f} s), test {bpp:.3f} bits/pixel")
    num_blocks = args.layers
    rows, samples = compare(flow, args.samples, methods(num_blocks), seed=args.seed,
                            repeats=args.repeats)
    print(format_table(rows))
    result = {
        "dataset": dataset,
        "model": {"features": 784, "hidden": args.hidden, "layers": args.layers,
                  "blocks_per_layer": args.blocks, "train_steps": len(losses),
                  "test_bits_per_pixel": bpp},
        "num_samples": args.samples,
        "threads": torch.get_num_threads(),
        "methods": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    if save_grid(samples, out / "samples.png"):
        for name, x in samples.items():  # and one grid per method
            save_grid({name: x}, out / f"samples-{_slug(name)}.png", columns=8, rows=4)
        save_frontier(rows, out / "frontier.png")
        print(f"wrote {out / 'results.json'}, {out / 'samples.png'} (all methods), "
              f"samples-<method>.png and {out / 'frontier.png'}")
    return result


def _slug(name: str) -> str:
    """A file-name-safe version of a method name: `Jacobi tol=1e-5` -> `jacobi-tol-1e-5`."""
    return "-".join("".join(c if c.isalnum() or c in ".-" else " " for c in name.lower()).split())


def save_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    """Speedup vs nflows against max error vs serial, with the paper's Table 5 points."""
    from arflow_solvers.plot import speed_error_frontier

    points = {r["method"]: r for r in rows if r["method"] not in ("nflows", "serial")}
    fig = speed_error_frontier(points, speed_key="speedup_vs_nflows", error_key="mae_vs_serial")
    axis = fig.axes[0]
    for name, speedup, mae in (("paper J-10", 8.73, 0.043), ("paper J-30", 4.40, 0.007)):
        axis.scatter(mae, speedup, marker="x", color="black")
        axis.annotate(name, (mae, speedup), fontsize="x-small")
    fig.savefig(path, bbox_inches="tight", dpi=100)


if __name__ == "__main__":
    main()
