"""TarFlow sampling: wall time of solver plans vs the public serial loop and our cached Serial.

Prints ONE JSON object. Baselines, measured in the same run on the same weights and noise:

- `public_loop`: a re-implementation (written here from the public semantics) of the public
  TarFlow sampler: one token per step with a key/value cache grown by `torch.cat`, and the
  unconditional guidance pass run separately with its own cache.
- `serial`: this library's `Serial()` on the TarFlow adapter (preallocated KV cache, cond and
  uncond in one batch), timed twice per round (after the public loop and last); the faster
  of the two minima is the baseline.

For each plan: wall time, speedup vs both baselines, network passes and full-pass
equivalents, max abs error vs `serial` and the fraction of 8-bit pixels equal to `serial`
(images in `[-1, 1]` quantised as `round((x + 1) * 127.5)`, the raw samples before denoising),
over the samples whose serial answer is finite (their count is reported), per-block passes,
work and Jacobi iterations. Plans take suffixes `@TOL` and `:z0` (see `parse_plan`) and
`file:PATH` loads a saved plan, so one run compares tolerances, initial guesses and planners.

References:
    Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
    https://arxiv.org/abs/2412.06329;
    Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
    https://arxiv.org/abs/2505.12849

Example:
    python benchmarks/tarflow.py --checkpoint runs/tarflow_mnist_4_128_4_2_0.05.pt --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arflow_solvers.adapters.tarflow import TarFlow, as_flow  # noqa: E402
from arflow_solvers import Serial, solve  # noqa: E402
from _plans import parse_plan  # noqa: E402

__all__ = ["public_loop_reverse", "build_model", "parse_plan", "main"]

SHAPES = {
    "mnist": dict(in_channels=1, img_size=28, patch_size=4, channels=128, num_blocks=4, layers_per_block=2,
                  num_classes=10),
    "img64": dict(in_channels=3, img_size=64, patch_size=4, channels=256, num_blocks=4, layers_per_block=4,
                  num_classes=10),
}

DEFAULT_PLANS = [
    "jacobi",
    "[0-4-*-*]",
    "[0-8-*-*]",
    "[0-16-*-*]",
]


# ----------------------------------------------------------------------------- public baseline


def _public_block_reverse(block, x: torch.Tensor, y, guidance: float, guide_what: str, attn_temp: float,
                          annealed: bool) -> torch.Tensor:
    """One block of the public sampler: serial, `torch.cat`-grown KV cache, separate uncond pass."""
    x = block.permute(x).clone()
    pos = block.permute(block.pos_embed, dim=0)
    seq_len = x.shape[1]
    guided = guidance > 0 and bool(guide_what)
    caches = {name: ([[] for _ in block.attn_blocks], [[] for _ in block.attn_blocks]) for name in ("c", "u")}

    def step(i: int, labels, temp: float, name: str):
        h = block.proj_in(x[:, i : i + 1]) + pos[i : i + 1]
        if block.class_embed is not None:
            h = h + (block.class_embed[labels] if labels is not None else block.class_embed.mean(dim=0))
        keys, values = caches[name]
        for j, layer in enumerate(block.attn_blocks):
            attn = layer.attention
            b = h.shape[0]
            hn = attn.norm(h.float()).type(h.dtype)
            q, k, v = attn.qkv(hn).reshape(b, 1, 3 * attn.num_heads, -1).transpose(1, 2).chunk(3, dim=1)
            keys[j].append(k)
            values[j].append(v)
            k = torch.cat(keys[j], dim=2)
            v = torch.cat(values[j], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale / temp)
            h = h + attn.proj(out.transpose(1, 2).reshape(b, 1, -1))
            h = h + layer.mlp(h)
        out = block.proj_out(h)
        if block.nvp:
            return out.chunk(2, dim=-1)
        return torch.zeros_like(out), out

    for i in range(seq_len - 1):
        za, zb = step(i, y, 1.0, "c")
        if guided:
            za_u, zb_u = step(i, None, attn_temp, "u")
            g = (i + 1) / (seq_len - 1) * guidance if annealed else guidance
            if "a" in guide_what:
                za = za + g * (za - za_u)
            if "b" in guide_what:
                zb = zb + g * (zb - zb_u)
        x[:, i + 1] = x[:, i + 1] * za[:, 0].float().exp().type(za.dtype) + zb[:, 0]
    return block.permute(x)


def public_loop_reverse(model: TarFlow, z: torch.Tensor, y=None, guidance: float = 0.0, guide_what: str = "ab",
                        attn_temp: float = 1.0, annealed: bool = False) -> torch.Tensor:
    """The public `Model.reverse` algorithm on our module: `(B, T, D)` noise to images."""
    with torch.no_grad():
        x = z * model.var.sqrt()
        for block in reversed(model.blocks):
            x = _public_block_reverse(block, x, y, guidance, guide_what, attn_temp, annealed)
        return model.unpatchify(x)


# ----------------------------------------------------------------------------- setup


def build_model(args: argparse.Namespace) -> tuple[TarFlow, str]:
    """The checkpoint's model, or a random one of the chosen shape with non-zero `proj_out`."""
    if args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model = TarFlow(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"], strict=True)
        return model.eval(), str(args.checkpoint)
    torch.manual_seed(args.seed)
    model = TarFlow(**SHAPES[args.shape])
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, args.init_scale / block.proj_out.in_features**0.5)
            if block.class_embed is not None:
                block.class_embed.normal_(0, 0.3)
    return model.eval(), f"random:{args.shape}"


def _timed_all(fns: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, tuple]:
    """Warm up every function, then time them round-robin `repeats` times.

    Returns name -> (min seconds, median seconds, last output). Round-robin and the minimum
    keep the ratios fair on a machine whose load changes during the run.
    """
    outputs = {name: fn() for name, fn in fns.items()}
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            began = time.perf_counter()
            outputs[name] = fn()
            sync()
            times[name].append(time.perf_counter() - began)
    return {name: (min(t), statistics.median(t), outputs[name]) for name, t in times.items()}


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _compare(x: torch.Tensor, reference: torch.Tensor, finite: torch.Tensor) -> dict[str, Any]:
    """Max abs error and fraction of equal 8-bit pixels vs `reference`, over the `finite` samples."""
    x, reference = x[finite], reference[finite]
    if not x.numel():
        return {"max_abs_err_vs_serial": float("nan"), "frac_pixels_equal": float("nan")}
    return {"max_abs_err_vs_serial": float((x - reference).abs().max()),
            "frac_pixels_equal": float((_pixels(x) == _pixels(reference)).float().mean()),
            "nonfinite_samples": int((~torch.isfinite(x.flatten(1)).all(1)).sum())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--shape", default="mnist", choices=sorted(SHAPES))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--plans", nargs="*", default=DEFAULT_PLANS,
                   help="serial | jacobi | gs<M> | paper notation like '[0-8-*-*]' (blocks in sampling order)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--attn-temp", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--init-scale", type=float, default=0.1, help="proj_out std x sqrt(width) for random init")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    model, source = build_model(args)
    model = model.to(device)
    torch.manual_seed(args.seed + 1)
    dim = model.blocks[0].in_channels
    z = torch.randn(args.batch_size, model.num_patches, dim, device=device)
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=device) if model.num_classes else None
    guide = dict(guidance=args.guidance, attn_temp=args.attn_temp)
    flow = as_flow(model, **guide)

    plans = {text: parse_plan(text, len(model.blocks), args.tol) for text in args.plans}
    fns: dict[str, Callable[[], Any]] = {
        "public_loop": lambda: public_loop_reverse(model, z, y, args.guidance, "ab", args.attn_temp),
        "serial": lambda: solve(flow, z, Serial(), cond=y),
    }
    for text, plan in plans.items():
        fns[text] = (lambda plan=plan: solve(flow, z, plan, cond=y))
    # our Serial is timed twice per round, right after the public loop and last: the run
    # right after the public loop (many freed torch.cat buffers) measured up to ~20% slower
    fns["serial_again"] = lambda: solve(flow, z, Serial(), cond=y)
    load_start = _loadavg()
    timed = _timed_all(fns, args.repeats, sync)
    t_public, t_public_med, x_public = timed["public_loop"]
    t_serial, t_serial_med, sol_serial = timed["serial"]
    t_serial_first = t_serial
    t_serial, t_serial_med = min(t_serial, timed["serial_again"][0]), min(t_serial_med, timed["serial_again"][1])
    x_serial = sol_serial.x
    # samples whose serial answer is non-finite (a weakly trained flow can overflow) are
    # counted and left out of the error and pixel comparisons
    finite = torch.isfinite(x_serial.flatten(1)).all(1)
    result: dict[str, Any] = {
        "model": source,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": model.num_patches,
        "num_blocks": len(model.blocks),
        "guidance": args.guidance,
        "tol": args.tol,
        "repeats": args.repeats,
        "serial_nonfinite_samples": int((~finite).sum()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": load_start,
        "timing": "min over round-robin repeats after one warmup (median alongside)",
        "baselines": {
            "public_loop": {"time_s": t_public, "median_s": t_public_med,
                            **_compare(x_public, x_serial, finite)},
            "serial": {"time_s": t_serial, "median_s": t_serial_med, "speedup_vs_public": t_public / t_serial,
                       "time_s_after_public": t_serial_first, "time_s_last": timed["serial_again"][0],
                       "passes": sum(b.passes for b in sol_serial.blocks),
                       "block_time_s": [round(b.wall_time, 4) for b in sol_serial.blocks]},
        },
        "plans": {},
    }
    for text, plan in plans.items():
        t_plan, t_plan_med, sol = timed[text]
        result["plans"][text] = {
            "plan": str(plan),
            "time_s": t_plan,
            "median_s": t_plan_med,
            "speedup_vs_public": t_public / t_plan,
            "speedup_vs_serial": t_serial / t_plan,
            "passes": [b.passes for b in sol.blocks],
            "work_full_pass_equiv": [round(b.work, 2) for b in sol.blocks],
            "block_time_s": [round(b.wall_time, 4) for b in sol.blocks],
            "iterations_mean": [round(float(b.iterations.sum(1).double().mean()), 1) for b in sol.blocks],
            "iterations_max": [int(b.iterations.sum(1).max()) for b in sol.blocks],
            **_compare(sol.x, x_serial, finite),
            "status": sol.status.name,
        }
    result["loadavg_end"] = _loadavg()
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


if __name__ == "__main__":
    main()
