"""GPU suite, STARFlow at the 3B text-to-image shapes: the public samplers vs ours, calls, time and error per block.

Random weights at the shapes of the public 3B text-to-image model (apple/ml-starflow, commit
e565a46; `SOURCE` says which file and line gives each), in float32 as the public `sample.py`
samples, guided as its sample script. Per method, on the same weights, noise and text: the
sequential network calls per block (the cost that decides GPU wall time), the work in
full-pass equivalents, the wall time (best of the rounds run) and the max abs error vs our
`Serial()`. The public samplers are `benchmarks/_starflow_public.py`'s re-implementations.

The time is bounded by a probe: our `Serial()` on the deep block and on one shallow block
predicts a serial run of the whole flow. If a round of every method is not predicted to fit,
every method runs on the deep block alone (`scope`), and a method whose first run is not
predicted to fit is left out and listed in `not_run`.

References:
    STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
    (Gu et al., 2025), https://arxiv.org/abs/2506.06276;
    Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
    https://arxiv.org/abs/2505.12849
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from _common import time_summary, timed_rounds
from _gpu_tarflow import block_rows
from _starflow_public import _jacobi_block, _reverse_block, _run
from starflow import PUBLIC_SETTINGS, _compare, _targets

from arflow_solvers import GSJacobi, Jacobi, Serial, solve
from arflow_solvers.adapters.starflow import StarFlow, as_flow

__all__ = ["SMOKE_SHAPE", "SOURCE", "T2I_3B", "starflow_part"]

T2I_3B = dict(in_channels=4, img_size=32, patch_size=1, channels=3072, num_blocks=6,
              layers_per_block=[2, 2, 2, 2, 2, 24], head_dim=64, rope=True, sos=True, txt_size=128, txt_dim=2048,
              cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R")
SMOKE_SHAPE = {**T2I_3B, "img_size": 4, "channels": 32, "layers_per_block": [1, 1, 1, 1, 1, 2], "head_dim": 16,
               "txt_size": 4, "txt_dim": 16}
SOURCE = {  # apple/ml-starflow at e565a46: where each number of T2I_3B and of the samplers comes from
    "configs/starflow_3B_t2i_256x256.yaml": "lines 5-11: img_size 256, txt_size 128, channel_size 4, patch_size 1, "
    "channels 3072, blocks 6, layers_per_block 2 2 2 2 2 24; lines 17-24: rope, sos, seq_order L2R, use_softplus, "
    "cond_top_only, use_final_norm; line 26: vae sd-vae-ft-ema (8x down: 32 x 32 latents, T = 1024); line 27: "
    "text google/flan-t5-xl (hidden size 2048); line 31: soft_clip 4",
    "sample.py": "line 69: img_size // vae downsample factor; line 76: txt_dim = the text encoder's hidden size; "
    "line 238: sampling under torch.autocast(dtype=torch.float32); lines 359-362: jacobi_th 0.005, "
    "jacobi_block_size 64, jacobi_max_iter 32 (defaults)",
    "train.py": "lines 486-494: head_dim 64, num_heads and num_kv_heads None (48 heads), use_swiglu 0, "
    "use_qk_norm 0, use_post_norm 0, use_bias 1, norm_type layer_norm (defaults)",
    "scripts/test_sample_image.sh": "line 18: cfg 3.6, jacobi_th 0.001, jacobi_block_size 16",
}
GUIDANCE = 3.6
MAX_ITER = 32  # the public jacobi_max_iter
EXACT_CAP = 16  # iterations per block of the exact mode (tol=0) run to a cap
MAX_ERROR = 1e-3  # the target: within this of serial
INIT_SCALE = 0.5  # proj_out std x sqrt(width), as benchmarks/starflow.py's larger model
ROUND_FACTOR = 4.0
"""Predicted round / serial run: the public and our serial runs, plus the iterative methods (about two more)."""
NO_BFLOAT16 = ("not measured: the public sample.py samples in float32, as this part does. The adapter does sample "
               "under bfloat16 autocast (as_flow(..., autocast=torch.bfloat16) or a caller's torch.autocast; "
               "tests/test_starflow.py, CPU), but there a Jacobi tolerance of 1e-4 lies below bfloat16's "
               "rounding of the map, so it runs nearly to T iterations (tiny CPU model: 13-16 of 16 per block "
               "vs 6-7 in float32): a bfloat16 method needs a tolerance of its own")


def _our_plans() -> dict[str, Any]:
    """Our methods: the reference, a tolerance Jacobi, a GS-Jacobi, the exact mode run to a cap."""
    return {"serial": Serial(), "jacobi_tol1e-4": Jacobi(tol=1e-4), "gs4_tol1e-4": GSJacobi(4, tol=1e-4),
            f"jacobi_exact_cap{EXACT_CAP}": Jacobi(tol=0.0, max_iters=EXACT_CAP)}


def random_starflow(shape: dict, device: torch.device, seed: int) -> StarFlow:
    """A STARFlow built on `device`, random weights, `proj_out` ~ N(0, (INIT_SCALE / sqrt(width))^2)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = StarFlow(**shape)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, INIT_SCALE / block.proj_out.in_features**0.5)
    return model.requires_grad_(False).eval()


def _inputs(model: StarFlow, batch: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Noise `z`, stand-in caption embeddings `y` ~ N(0, 1) and null captions `y_null` ~ N(0, 0.1^2)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    text = (model.txt_size, model.txt_dim)
    data = {"z": torch.randn(batch, model.in_channels, model.img_size, model.img_size, generator=gen),
            "y": torch.randn(batch, *text, generator=gen), "y_null": torch.randn(1, *text, generator=gen) * 0.1}
    return {k: v.to(device) for k, v in data.items()}


# ----------------------------------------------------------------------------- the methods


def _public(model: StarFlow, z: torch.Tensor, text: torch.Tensor, sampler: Callable, deep_only: bool,
            sync: Callable[[], None], guidance: float = GUIDANCE) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """A public sampler over the flow (or over the deep block's tokens): the output and per-block rows."""
    rows: list[dict[str, Any]] = []

    def solve_block(index: int, x: torch.Tensor, y: Any, guidance: float) -> tuple:
        sync()
        began = time.perf_counter()
        x, calls, work = sampler(index, x, y, guidance)
        sync()
        rows.append({"block": len(rows), "calls": calls, "full_pass_equiv": round(work, 3),
                     "wall_s": round(time.perf_counter() - began, 5)})
        return x, calls, work

    with torch.no_grad():
        if deep_only:
            return solve_block(len(model.blocks) - 1, z, text, guidance)[0], rows
        return _run(model, z, text, guidance, solve_block)[0], rows


def _public_samplers(model: StarFlow) -> dict[str, Callable]:
    """Per public method, `sampler(index, tokens, text, guidance) -> (tokens, calls, full passes)` of one block."""
    def serial(index: int, x: torch.Tensor, y: Any, guidance: float) -> tuple:
        x, steps = _reverse_block(model, index, x, y, guidance, 1.0)
        return x, steps, steps / x.shape[1]

    samplers = {"public_serial": serial}
    for th, bs in PUBLIC_SETTINGS:
        samplers[f"public_jacobi_th{th:g}_bs{bs}"] = (
            lambda index, x, y, guidance, th=th, bs=bs: _jacobi_block(model, index, x, y, guidance, th, bs, MAX_ITER))
    return samplers


def _methods(model: StarFlow, data: dict[str, torch.Tensor], deep_only: bool,
             sync: Callable[[], None]) -> dict[str, Callable[[], tuple]]:
    """Every method as a function returning `(output, per-block rows, solution or None)`, in the order they run."""
    flow = as_flow(model, guidance=GUIDANCE)
    cond = (data["y"], data["y_null"])
    text = torch.cat([data["y"], data["y_null"].expand_as(data["y"])])
    z, target = data["z"], flow
    if deep_only:
        if model.blocks[-1].flip:
            raise ValueError("the deep block alone is measured in the model's token order: it must not be flipped")
        z, target = model.patchify(data["z"]).flatten(1, 2), flow.blocks[0]

    def public(sampler: Callable) -> Callable[[], tuple]:
        return lambda: (*_public(model, z, text, sampler, deep_only, sync), None)

    fns = {**{k: _ours(target, z, cond, p) for k, p in _our_plans().items()},
           **{k: public(s) for k, s in _public_samplers(model).items()}}
    # our serial first (the reference), then the public Jacobi settings (the anchor), ours, the public serial loop
    first, last = ["serial", *(k for k in fns if k.startswith("public_jacobi"))], ["public_serial"]
    return {k: fns[k] for k in first + [k for k in fns if k not in first + last] + last}


def _ours(target: Any, z: torch.Tensor, cond: Any, plan: Any) -> Callable[[], tuple]:
    """Our solve of `target` as a method: `(output, per-block rows, solution)`."""
    def run() -> tuple:
        with torch.no_grad():
            sol = solve(target, z, plan, cond=cond, throw=False)
        return sol.x, block_rows(sol), sol
    return run


# ----------------------------------------------------------------------------- probe, scope, rounds


def _probe(model: StarFlow, data: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
    """Our `Serial()` on the deep block and on one shallow block (warms their kernels up): seconds, prediction."""
    flow = as_flow(model, guidance=GUIDANCE)
    tokens, cond = model.patchify(data["z"]).flatten(1, 2), (data["y"], data["y_null"])
    fns = {name: lambda b=b: solve(b, tokens, Serial(), cond=cond, throw=False)
           for name, b in (("deep", flow.blocks[0]), ("shallow", flow.blocks[-1]))}
    with torch.no_grad():
        times, _ = timed_rounds(fns, rounds=1, until=float("inf"), first_round_s=0.0, sync=ctx.sync,
                                log=lambda m: ctx.log(f"probe {m}"))
    deep, shallow = times["deep"][0], times["shallow"][0]
    return {"serial_deep_block_s": deep, "serial_shallow_block_s": shallow,
            "predicted_serial_s": deep + (flow.num_blocks - 1) * shallow}


def _scope(probe: dict[str, float], ctx: Any) -> tuple[bool, str]:
    """`(deep_only, why)`: the whole flow if a round of every method is predicted to fit, else the deep block."""
    choice = ctx.args.starflow_scope
    if choice != "auto":
        return choice == "deep", f"--starflow-scope {choice}"
    left = ctx.until - time.monotonic()
    predicted = ROUND_FACTOR * probe["predicted_serial_s"]
    if predicted <= left:
        return False, f"a round over every block predicted {predicted:.1f} s, {left:.1f} s left"
    return True, (f"a round over every block predicted {predicted:.1f} s, more than the {left:.1f} s left: "
                  "every method on the deep block alone")


def _first_round(fns: dict[str, Callable], predicted: float, ctx: Any) -> tuple[dict, dict, dict[str, str]]:
    """Each method once, in order, if predicted (`predicted` s) to end in time; the others in `not_run`."""
    times, outputs, not_run = {}, {}, {}
    for name, fn in fns.items():
        t, out = timed_rounds({name: fn}, rounds=1, until=ctx.until, first_round_s=predicted, sync=ctx.sync,
                              log=ctx.log)
        if t[name]:
            times[name], outputs[name] = t[name], out[name]
        else:
            not_run[name] = f"predicted {predicted:.1f} s, {max(ctx.until - time.monotonic(), 0):.1f} s left"
    return times, outputs, not_run


def _rounds(fns: dict[str, Callable], predicted: float, ctx: Any) -> tuple[dict, dict, dict[str, str]]:
    """The first round method by method, then further round-robin rounds of those that ran, while they fit."""
    times, outputs, not_run = _first_round(fns, predicted, ctx)
    ran = {name: fns[name] for name in times}
    if ran and ctx.args.rounds > 1:
        more, more_out = timed_rounds(ran, rounds=ctx.args.rounds - 1, until=ctx.until,
                                      first_round_s=sum(t[0] for t in times.values()), sync=ctx.sync,
                                      log=lambda m: ctx.log(f"further {m}"))
        for name in ran:
            times[name] += more[name]
            outputs[name] += more_out[name]
    return times, outputs, not_run


# ----------------------------------------------------------------------------- the part


def _summaries(times: dict, outputs: dict) -> dict[str, Any]:
    """Per method: times, calls and work per block (best round), error vs our `Serial()`."""
    reference = outputs["serial"][-1][0]
    methods = {}
    for name, seconds in times.items():
        summary = time_summary(seconds)
        x, blocks, sol = outputs[name][seconds.index(summary["best_s"])]
        summary.update(calls_per_block=[b["calls"] for b in blocks], calls=sum(b["calls"] for b in blocks),
                       full_pass_equiv=round(sum(b["full_pass_equiv"] for b in blocks), 3), blocks=blocks,
                       **_compare(x, reference))
        if sol is not None:
            summary["status"] = sol.status.name
        methods[name] = summary
    return methods


def _ratios(methods: dict[str, Any]) -> dict[str, float]:
    """Wall-time ratios (> 1: the second is slower): our serial vs the public one, ours vs serial and public Jacobi."""
    t = {name: m["best_s"] for name, m in methods.items()}
    pairs = [("serial", "public_serial")] + [(ours, "serial") for ours in ("jacobi_tol1e-4", "gs4_tol1e-4")]
    pairs += [("jacobi_tol1e-4", f"public_jacobi_th{th:g}_bs{bs}") for th, bs in PUBLIC_SETTINGS]
    return {f"{a}_vs_{b}": t[b] / t[a] for a, b in pairs if a in t and b in t}


def _describe(model: StarFlow, shape: dict, batch: int, smoke: bool) -> dict[str, Any]:
    """What the part measures: the model and where its shapes come from, the inputs, precision, samplers."""
    deep = model.blocks[-1]
    return {
        "model": {**shape, "seq_len": model.num_patches, "token_dim": deep.in_channels,
                  "deep_block_heads": deep.attn_blocks[0].attention.num_heads,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "deep_block_parameters": sum(p.numel() for p in deep.parameters()),
                  "shapes": "tiny (smoke)" if smoke else "the public 3B text-to-image model's",
                  "source": "apple/ml-starflow e565a46", "where": SOURCE,
                  "weights": f"random; proj_out ~ N(0, ({INIT_SCALE} / sqrt(width))^2)"},
        "batch_size": batch, "guidance": GUIDANCE, "guided_blocks": "the deep block only (cond_top_only)",
        "text": {"y": "N(0, 1) stand-ins for the caption embeddings (B, txt_size, txt_dim)",
                 "y_null": "0.1 N(0, 1), one row for every sample"},
        "precision": "float32 (the public sample.py's: torch.autocast(dtype=torch.float32))",
        "bfloat16": NO_BFLOAT16,
        "samplers": {"public": f"benchmarks/_starflow_public.py re-implementations; jacobi_max_iter {MAX_ITER}",
                     "ours": {k: repr(p) for k, p in _our_plans().items()}},
        "work_unit": "full_pass_equiv: positions evaluated per sample / T; cond + uncond count as one pass; the "
                     "text prefix's one encoding per block is not counted",
        "blocks_order": "sampling order: block 0 is the deep block",
    }


def starflow_part(ctx: Any) -> dict[str, Any]:
    """STARFlow at the 3B text-to-image shapes (tiny in smoke mode), every method within `ctx.until`."""
    shape = SMOKE_SHAPE if ctx.smoke else T2I_3B
    batch = ctx.args.batch_smoke if ctx.smoke else ctx.args.batch_starflow
    model = random_starflow(shape, ctx.device, ctx.args.seed)
    data = _inputs(model, batch, ctx.args.seed + 1, ctx.device)
    result = _describe(model, shape, batch, ctx.smoke)
    ctx.checkpoint(result)
    probe = _probe(model, data, ctx)
    deep_only, why = _scope(probe, ctx)
    result.update(probe=probe, scope="deep block" if deep_only else "all blocks", scope_reason=why)
    ctx.checkpoint(result)
    fns = _methods(model, data, deep_only, ctx.sync)
    predicted = probe["serial_deep_block_s"] if deep_only else probe["predicted_serial_s"]
    times, outputs, not_run = _rounds(fns, predicted, ctx)
    result["not_run"] = not_run
    if "serial" not in times:
        return {**result, "status": "partial", "reason": "our Serial(), the reference, did not fit the time left"}
    methods = _summaries(times, outputs)
    result.update(methods=methods, ratios=_ratios(methods), status="ok")
    publics = all(f"public_jacobi_th{th:g}_bs{bs}" in methods for th, bs in PUBLIC_SETTINGS)
    result["targets"] = _targets(methods, MAX_ERROR) if publics else {"reason": "a public Jacobi setting did not run"}
    exact = f"jacobi_exact_cap{EXACT_CAP}"
    if publics and exact in methods:
        result["targets"]["exact_modes_err"] = {exact: methods[exact]["max_abs_err_vs_serial"]}
    return result


# ----------------------------------------------------------------------------- the public fixture, Newton


def fixture_part(ctx: Any) -> dict[str, Any]:
    """The public-code fixture (T = 64): Newton's few, wide calls vs the public block-wise Jacobi, in wall time.

    On a CPU Newton loses (each call is 1 + T * D evaluations); whether its 5 calls per block
    beat the public sampler's 6 narrow ones is a question for a GPU, which this part answers.
    Smoke mode: one sample, Newton capped at one iteration (the plumbing only).
    """
    from starflow import load_fixture

    from arflow_solvers import Newton

    model, data = load_fixture()
    model = model.to(ctx.device)
    batch = 1 if ctx.smoke else data["z"].shape[0]
    z, y = data["z"][:batch].to(ctx.device), data["y"][:batch].to(ctx.device)
    flow = as_flow(model)
    newton = Newton(tol=1e-3, max_iters=1) if ctx.smoke else Newton(tol=1e-3)
    plans = {"serial": Serial(), "jacobi_tol1e-4": Jacobi(tol=1e-4), "newton_tol1e-3": newton}

    def public(sampler: Callable) -> Callable[[], tuple]:
        return lambda: (*_public(model, z, y, sampler, False, ctx.sync, guidance=0.0), None)

    samplers = {k: v for k, v in _public_samplers(model).items() if k.startswith("public_jacobi")}
    fns = {**{k: _ours(flow, z, y, p) for k, p in plans.items()}, **{k: public(s) for k, s in samplers.items()}}
    times, outputs = timed_rounds(fns, rounds=ctx.args.rounds, until=ctx.until, first_round_s=0.0, sync=ctx.sync,
                                  log=ctx.log)
    if not times["serial"]:
        return {"status": "partial", "reason": "no round fitted the time left"}
    methods = _summaries({k: v for k, v in times.items() if v}, outputs)
    t = {name: m["best_s"] for name, m in methods.items()}
    ratios = {f"newton_tol1e-3_vs_{name}": t[name] / t["newton_tol1e-3"] for name in t if name != "newton_tol1e-3"}
    return {"model": "tests/fixtures/starflow_public_tiny.pt (public code, T = 64, 3 blocks)", "batch_size": batch,
            "guidance": 0.0, "plans": {k: repr(p) for k, p in plans.items()}, "methods": methods, "ratios": ratios,
            "targets": _targets(methods, MAX_ERROR), "status": "ok"}
