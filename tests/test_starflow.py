"""STARFlow adapter: the public fixture reproduced, public names, causality, the text-prefix cache, solvers.

The fixture holds a tiny STARFlow made by the public code (apple/ml-starflow, e565a46) and its outputs:
forward, serial sampling without and with guidance 2.5 (and attention temperature 0.8, annealed), and its
block-wise Jacobi sampler at several settings.
"""

from __future__ import annotations

import functools
import io
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from arflow_solvers import CachedARBlock, GSJacobi, HasOutputProjection, Jacobi, Newton, Plan, Serial, solve
from arflow_solvers.adapters.starflow import StarFlow, StarFlowARBlock, as_flow, load_for_planning, sample
from arflow_solvers.adapters.starflow import layers as starflow_layers

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "starflow_public_tiny.pt"
sys.path.insert(0, str(ROOT / "benchmarks"))
F32 = dict(rtol=0, atol=2e-5)  # float32 agreement with the public code (values up to ~40)


@pytest.fixture(scope="module")
def public():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def model(public):
    m = StarFlow(**public["config"])
    m.load_state_dict(public["state_dict"], strict=True)
    return m.eval()


# ------------------------------------------------------------------ tiny random models (float64)

BASE = dict(in_channels=2, img_size=4, patch_size=1, channels=32, num_blocks=3, layers_per_block=[1, 0, 2],
            head_dim=16, rope=True, sos=True, txt_size=3, txt_dim=8, cond_top_only=True, use_softplus=True,
            use_final_norm=True, soft_clip=4.0, seq_order="L2R")
OPTIONS = {
    "fixture-like": {},
    "no-sos-learnt-positions-exp": dict(sos=False, rope=False, use_softplus=False, soft_clip=0.0,
                                        use_final_norm=False, seq_order="R2L", layers_per_block=[1, 1, 1]),
    "gqa-rms-swiglu-qk-post": dict(norm_type="rms_norm", use_swiglu=True, use_qk_norm=True, use_post_norm=True,
                                   num_heads=4, num_kv_heads=2, use_bias=False, hf_style_rope=True,
                                   top_block_channels=48, pt_seq_len=8),
    "text-in-every-block": dict(cond_top_only=False, layers_per_block=[1, 1, 1], norm_type="none"),
    "unconditional": dict(txt_size=0, txt_dim=0, cond_top_only=False, layers_per_block=[1]),
}
T, D, L = 16, 2, 3


@functools.lru_cache(maxsize=None)
def tiny_starflow(name: str = "fixture-like", seed: int = 0, dtype: torch.dtype = torch.float64) -> StarFlow:
    """A small STARFlow (T=16 tokens of 2 channels, float64 by default) whose blocks all do something."""
    torch.manual_seed(seed)
    model = StarFlow(**{**BASE, **OPTIONS[name]})
    with torch.no_grad():  # the public init zeroes proj_out and the RMS norms' weights (unit scale)
        for key, p in model.named_parameters():
            rms = key.endswith("norm.weight") and not key.endswith(("attention.norm.weight", "mlp.norm.weight"))
            if "proj_out.weight" in key or rms or key.endswith("pos_embed"):
                p.normal_(0, 0.3 / p.shape[1] ** 0.5 if "proj_out.weight" in key else 0.1 if rms else 0.3)
    return model.to(dtype).eval()


def text(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption embeddings `(batch, L, 8)` and one null caption `(1, L, 8)` for all."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, L, 8, generator=g, dtype=torch.float64)
    return y.to(dtype), torch.randn(1, L, 8, generator=g, dtype=torch.float64).to(dtype)


def cond_of(name: str, y: torch.Tensor, y_null: torch.Tensor, guided: bool):
    return None if name == "unconditional" else (y, y_null) if guided else y


# ------------------------------------------------------------------ the public fixture


def test_fixture_forward_matches_public(model, public):
    assert list(model.state_dict()) == list(public["state_dict"])  # loaded strictly, in the public key order
    with torch.no_grad():
        z, _, outputs, logdets = model(public["x_data"], public["y"])
    torch.testing.assert_close(z, public["forward_z"], **F32)
    assert len(outputs) == len(public["forward_outputs"]) == 4
    for ours, theirs in zip(outputs, public["forward_outputs"]):
        torch.testing.assert_close(ours, theirs, **F32)
    for ours, theirs in zip(logdets, public["forward_logdets"]):
        torch.testing.assert_close(ours, theirs, **F32)


CASES = {"reverse_serial": {}, "reverse_serial_cfg2.5": dict(guidance=2.5),
         "reverse_serial_cfg2.5_temp0.8_annealed": dict(guidance=2.5, attn_temp=0.8, annealed_guidance=True)}
RUNS = [(case, Serial()) for case in CASES] + [
    ("reverse_serial_cfg2.5", Jacobi(tol=0.0)), ("reverse_serial_cfg2.5", GSJacobi(segments=4, tol=0.0)),
    ("reverse_serial", GSJacobi(segments=(8, 24, 32), tol=0.0))]


@pytest.mark.parametrize("case,solver", RUNS, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_fixture_reverse_matches_public_serial_and_exact_solvers(model, public, case, solver):
    kwargs, expected = CASES[case], public[case]
    y = torch.cat([public["y"], public["y_null"]]) if kwargs else public["y"]
    with torch.no_grad():
        seq = model.reverse(public["z"], y, plan=solver, return_sequence=True, **kwargs)
    expected = expected if isinstance(expected, list) else [expected]  # the noise, after each block, or the last
    seq = seq[-len(expected):]
    for ours, theirs in zip(seq, expected):
        torch.testing.assert_close(ours, theirs, **F32)


def test_newton_makes_fewer_calls_than_the_public_jacobi_at_its_fastest_setting_and_stays_near_serial(model, public):
    """The public `jacobi` at th 0.005, block 64 makes 17 calls on the fixture and ends 1.02 from serial."""
    flow, z, y = as_flow(model), public["z"][:1], public["y"][:1]
    with torch.no_grad():
        serial = solve(flow, z, Serial(), cond=y).x
        newton = solve(flow, z, Newton(tol=1e-3), cond=y)
    assert sum(b.passes for b in newton.blocks) <= 17
    assert (newton.x - serial).abs().max() <= 1e-3


def test_annealing_changes_nothing_under_the_public_rule_and_inputs_are_not_modified(model, public):
    z, y = public["z"].clone(), torch.cat([public["y"], public["y_null"]])
    with torch.no_grad():
        plain = model.reverse(z, y, guidance=2.5, attn_temp=0.8, plan=Jacobi(tol=1e-4))
        annealed = model.reverse(z, y, guidance=2.5, attn_temp=0.8, annealed_guidance=True, plan=Jacobi(tol=1e-4))
    assert torch.equal(plain, annealed)
    assert torch.equal(z, public["z"]) and torch.equal(y[:3], public["y"])


def test_benchmark_reimplementation_of_the_public_samplers_reproduces_the_fixture(model, public):
    from _starflow_public import public_jacobi, public_reverse

    y2 = torch.cat([public["y"], public["y_null"]])
    for th, bs, guided in [(0.001, 16, False), (0.005, 64, False), (0.0, 16, False), (0.001, 16, True)]:
        name = f"reverse_jacobi_th{th}_bs{bs}" + ("_cfg2.5" if guided else "")
        x, calls, _ = public_jacobi(model, public["z"], y2 if guided else public["y"], 2.5 * guided, th, bs, 32)
        assert torch.equal(x, public[name]), name
        assert len(calls) == 3 and all(c >= 64 // bs for c in calls)
    x, calls, _ = public_reverse(model, public["z"], y2, 2.5, 0.8)
    torch.testing.assert_close(x, public["reverse_serial_cfg2.5_temp0.8_annealed"], **F32)
    assert calls == [64, 64, 64]


# ------------------------------------------------------------------ public names and shapes


def _module(**children) -> nn.Module:
    module = nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def _norm(kind: str, dim: int) -> nn.Module:
    return {"layer_norm": nn.LayerNorm(dim), "rms_norm": _module(weight=nn.Parameter(torch.zeros(dim)))}.get(
        kind, nn.Identity())


def _public_layer(c, heads, o) -> nn.Module:
    """The public `AttentionBlock` module tree (names and shapes only), written from its source."""
    hd, bias, kind = o["head_dim"], o.get("use_bias", True), o.get("norm_type", "layer_norm")
    heads = heads or c // hd
    kv_heads, post = o.get("num_kv_heads") or heads, o.get("use_post_norm")
    attn = _module(norm=_norm(kind, c), qkv=nn.Linear(c, (heads + 2 * kv_heads) * hd, bias=bias),
                   proj=nn.Linear(heads * hd, c, bias=bias))
    if o.get("use_qk_norm"):
        attn.query_norm, attn.key_norm = _norm("rms_norm", hd), _norm("rms_norm", hd)
    mlp = _module(norm=_norm(kind, c))
    if post:
        attn.post_norm, mlp.post_norm = _norm("rms_norm", c), _norm("rms_norm", c)
    if o.get("use_swiglu"):
        mlp.gate_proj, mlp.up_proj = nn.Linear(c, 4 * c, bias=bias), nn.Linear(c, 4 * c, bias=bias)
        mlp.down_proj = nn.Linear(4 * c, c, bias=bias)
    else:
        mlp.main = nn.Sequential(nn.Linear(c, 4 * c, bias=bias), nn.GELU(), nn.Linear(4 * c, c, bias=bias))
    return _module(attention=attn, mlp=mlp)


def _public_block(c, n_layers, txt_dim, heads, o, pt, d) -> nn.Module:
    block = _module(proj_in=nn.Linear(d, c), proj_out=nn.Linear(c, 2 * d))
    if o.get("sos"):
        block.sos_embed = nn.Parameter(torch.randn(1, 1, d))
    if not o.get("rope"):
        block.pos_embed = nn.Parameter(torch.randn((o["img_size"] // o["patch_size"]) ** 2, c))
    if txt_dim:
        block.proj_txt = nn.Linear(txt_dim, c)
    block.attn_blocks = nn.ModuleList(_public_layer(c, heads, o) for _ in range(n_layers))
    if o.get("use_final_norm"):
        block.final_norm = _norm("rms_norm", c)
    block.register_buffer("attn_mask", torch.ones(pt**2 + o["txt_size"], pt**2 + o["txt_size"]))
    return block


def _public_model(o: dict) -> nn.Module:
    """The public `Model`'s module tree for the configuration `o`."""
    layers = o["layers_per_block"] * (o["num_blocks"] if len(o["layers_per_block"]) == 1 else 1)
    pt, d = o.get("pt_seq_len") or o["img_size"] // o["patch_size"], o["in_channels"] * o["patch_size"] ** 2
    c, top, shallow_txt = o["channels"], o.get("top_block_channels") or o["channels"], 0 if o["cond_top_only"] else o["txt_dim"]
    blocks = [_public_block(c, n, shallow_txt, o.get("num_heads"), o, pt, d) if n else nn.Module() for n in layers[:-1]]
    heads = o.get("num_heads") or (top // o["head_dim"] if top != c else None)
    m = _module(blocks=nn.ModuleList(blocks + [_public_block(top, layers[-1], o["txt_dim"], heads, o, pt, d)]))
    m.register_buffer("var", torch.rand(pt**2, d))
    if o.get("rope"):
        m.feat_rope = nn.Module()
        placeholder = torch.zeros(o["txt_size"] + pt**2, o["head_dim"])
        m.feat_rope.register_buffer("freqs_cos", placeholder)
        m.feat_rope.register_buffer("freqs_sin", placeholder)
    return m


@pytest.mark.parametrize("name", list(OPTIONS))
def test_state_dict_round_trips_with_public_names(name):
    config = {**BASE, **OPTIONS[name]}
    theirs = _public_model(config)
    torch.save(theirs.state_dict(), buffer := io.BytesIO())
    ours = StarFlow(**config)
    ours.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), strict=True)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    theirs.load_state_dict(ours_sd, strict=True)
    assert torch.equal(ours.var, theirs.var)


# ------------------------------------------------------------------ blocks: protocols, causality, cache


def test_flow_in_sampling_order_leaves_identity_blocks_out():
    m = tiny_starflow()
    flow = as_flow(m, guidance=1.5)
    assert flow.num_blocks == 2 and flow.blocks[0].block is m.blocks[2] and flow.blocks[1].block is m.blocks[0]
    assert [type(s).__name__ for s in flow] == ["_Tokens", "Permute", "StarFlowARBlock", "Permute", "Permute",
                                                "StarFlowARBlock", "Permute", "_Latents"]
    assert flow.blocks[0].guidance.active and not flow.blocks[1].guidance.active  # cond_top_only
    assert all(isinstance(b, CachedARBlock) and isinstance(b, HasOutputProjection) for b in flow.blocks)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(list(OPTIONS)), index=st.integers(0, 2), j=st.integers(0, T - 1),
       guided=st.booleans(), seed=st.integers(0, 2**16))
def test_every_block_is_causal(name, index, j, guided, seed):
    guided = guided and name != "unconditional"
    flow = as_flow(tiny_starflow(name), guidance=1.5 if guided else 0.0, attn_temp=0.9)
    block, g = flow.blocks[index % flow.num_blocks], torch.Generator().manual_seed(seed)
    x, cond = torch.randn(2, T, D, generator=g, dtype=torch.float64), cond_of(name, *text(2, seed), guided)
    mu, log_sigma = block.affine(x, cond)
    x2 = x.clone()
    x2[:, j] += torch.randn(2, D, generator=g, dtype=torch.float64)
    mu2, log_sigma2 = block.affine(x2, cond)
    assert torch.equal(mu[:, : j + 1], mu2[:, : j + 1]) and torch.equal(log_sigma[:, : j + 1], log_sigma2[:, : j + 1])
    if j + 1 < T:  # and the next row does see it
        assert not torch.equal(mu[:, j + 1], mu2[:, j + 1])
    if not block.block.use_sos:
        assert not mu[:, 0].any() and not log_sigma[:, 0].any()


@st.composite
def range_calls(draw):
    """A committed prefix, then several `(start, stop, rows)` calls respecting the contract."""
    committed, calls = draw(st.integers(0, T - 1)), []
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(committed, T - 1))
        stop = draw(st.integers(start + 1, T))
        rows = draw(st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True)))
        calls.append((start, stop, None if rows is None else sorted(rows)))
        committed = draw(st.integers(committed, start))
        calls.append(("commit", committed, None))
    return calls


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(list(OPTIONS)), calls=range_calls(), guided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_cached_range_equals_full_pass(name, calls, guided, seed):
    guided, (y, y_null) = guided and name != "unconditional", text(4, seed)
    block = as_flow(tiny_starflow(name), guidance=2.0 if guided else 0.0, attn_temp=0.8).blocks[0]
    g = torch.Generator().manual_seed(seed)
    z, x = (torch.randn(4, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    cache = block.init_cache(z, cond_of(name, y, y_null, guided))
    for start, stop, rows in calls:
        if start == "commit":
            block.commit(cache, x, stop)
            x[:, stop:] = torch.randn(4, T - stop, D, generator=g, dtype=torch.float64)
            continue
        idx = None if rows is None else torch.tensor(rows)
        xs = x if idx is None else x[idx]
        sub = cond_of(name, y if idx is None else y[idx], y_null, guided)
        mu, log_sigma = block.affine_range(cache, xs, start, stop, sub, idx)
        mu_full, log_sigma_full = block.affine(xs, sub)
        torch.testing.assert_close(mu, mu_full[:, start:stop], rtol=0, atol=1e-12)
        torch.testing.assert_close(log_sigma, log_sigma_full[:, start:stop], rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", [Serial(), Jacobi(tol=1e-6), GSJacobi(4, tol=0.0)], ids=repr)
def test_the_text_prefix_is_encoded_once_per_solve_into_one_preallocated_cache(solver, monkeypatch):
    m, calls, caches = tiny_starflow(), [], []
    flow = as_flow(m, guidance=1.5)
    original_transformer, original_init = type(m.blocks[2]).transformer, StarFlowARBlock.init_cache

    def transformer(self, h, ctx, kv=None):
        calls.append((self is m.blocks[2], ctx.start, h.shape[0], None if kv is None else kv[0][0].data_ptr()))
        return original_transformer(self, h, ctx, kv)

    monkeypatch.setattr(type(m.blocks[2]), "transformer", transformer)
    monkeypatch.setattr(StarFlowARBlock, "init_cache", lambda *a: caches.append(original_init(*a)) or caches[-1])
    sol = solve(flow, torch.randn(3, 2, 4, 4, dtype=torch.float64), solver, cond=text(3))
    deep_calls = [c for c in calls if c[0]]
    prefix = L + 1  # text, then the start-of-sequence token
    assert deep_calls[0][1] == 0 and all(start >= prefix for _, start, _, _ in deep_calls[1:])  # text fed once
    assert len(deep_calls) <= 1 + sol.blocks[0].passes  # guidance: one pass of 2b samples per call, never two
    assert deep_calls[0][2] == 6 and all(batch % 2 == 0 for _, _, batch, _ in deep_calls)
    if isinstance(solver, Serial):  # a preallocated cache written in place, the full batch every step
        assert {ptr for _, _, _, ptr in deep_calls} == {caches[0].keys[0].data_ptr()}
    assert len(caches) == 2 and caches[0].keys[0].shape == (6, 2, prefix + T - 1, 16)  # one cache per block
    assert flow.blocks[0].guidance.active and caches[1].groups == 1


def test_the_causality_test_fails_when_a_token_sees_the_next_one(monkeypatch):
    """The causality property can fail: a mask that lets each token see its successor is caught."""
    def leaky(self, n, device):
        return torch.ones(n, self.start + n, dtype=torch.bool, device=device).tril(diagonal=self.start + 1)

    monkeypatch.setattr(starflow_layers.Context, "mask", leaky)
    with pytest.raises(AssertionError):
        test_every_block_is_causal.hypothesis.inner_test(name="fixture-like", index=0, j=5, guided=False, seed=1)


# ------------------------------------------------------------------ solvers on the whole flow


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("guided", [False, True])
def test_solvers_at_the_bound_equal_serial_float64(name, guided):
    if guided and name == "unconditional":
        pytest.skip("no text to guide")
    m, z, (y, y_null) = tiny_starflow(name), torch.randn(3, 2, 4, 4, dtype=torch.float64), text(3)
    flow, cond = as_flow(m, guidance=2.0 if guided else 0.0), cond_of(name, y, y_null, guided)
    serial = solve(flow, z, Serial(), cond=cond)
    for plan in (Jacobi(tol=0.0), GSJacobi(segments=4, tol=0.0), GSJacobi(segments=(3, 9, 4), tol=0.0),
                 Plan.parse("[0-4-*-*]", tol=0.0)):
        sol = solve(flow, z, plan, cond=cond)
        torch.testing.assert_close(sol.x, serial.x, rtol=0, atol=1e-10)
        assert all(b.passes <= T for b in sol.blocks)
    if not guided:  # unguided sampling inverts the density direction
        zz, _, _, _ = m(serial.x, None if name == "unconditional" else y)
        torch.testing.assert_close(zz, z, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ bfloat16 autocast (mixed precision)

BF16_RTOL = 3e-2  # stated: per sample, max |x - float32 serial| / max |float32 serial| (measured: 0.3-1.6%)


@pytest.mark.parametrize("guided", [False, True])
def test_bfloat16_autocast_agrees_with_float32_serial_as_option_and_as_callers_context(guided):
    m, (y, y_null) = tiny_starflow(dtype=torch.float32), text(3, dtype=torch.float32)
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, g = ((y, y_null), 2.0) if guided else (y, 0.0)
    with torch.no_grad():
        ref = solve(as_flow(m, guidance=g), z, Serial(), cond=cond).x
        for plan in (Serial(), Jacobi(tol=0.0), Jacobi(tol=1e-3)):  # tol > 0: converged samples leave the batch
            own = sample(m, z, plan, y, y_null, guidance=g, autocast=torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ambient = solve(as_flow(m, guidance=g), z, plan, cond=cond).x
            err = float(((own - ref).abs().flatten(1).amax(1) / ref.abs().flatten(1).amax(1)).max())
            assert own.dtype == torch.float32 and torch.equal(own, ambient) and 1e-4 < err <= BF16_RTOL, (plan, err)
        block, x = as_flow(m, guidance=g, autocast=torch.bfloat16).blocks[0], m.patchify(z).flatten(1, 2)
        cache = block.init_cache(x, cond)  # the text prefix and the tokens' keys and values in bfloat16
        rows, full = block.affine_range(cache, x, 0, T), block.affine(x, cond)
    assert {b.dtype for b in cache.keys + cache.values} == {torch.bfloat16} and cache.outputs.dtype == torch.float32
    for ours, theirs in zip(rows, full):  # (mu, log_sigma) in float32; the cached range as the full pass, to
        assert ours.dtype == torch.float32 and float((ours - theirs).abs().max()) < 2e-2  # bf16 rounding x guidance
    assert "autocast=torch.bfloat16" in repr(block)


# ------------------------------------------------------------------ refused options and bad arguments


def test_video_options_the_self_denoiser_and_bad_arguments_are_refused_by_name():
    for option, value in [("temporal_causal", 1), ("shallow_block_local", True), ("local_attn_window", 4),
                          ("denoiser_window", 2)]:
        with pytest.raises(NotImplementedError, match=f"{option}=.*video"):
            StarFlow(**{**BASE, option: value})
    with pytest.raises(NotImplementedError, match="learnable_self_denoiser"):
        StarFlow(**BASE, learnable_self_denoiser=True)
    with pytest.raises(NotImplementedError, match="use_pretrained_lm"):
        StarFlow(**BASE, use_pretrained_lm="gemma3_1b")
    for change, match in [(dict(seq_order="up"), "seq_order"), (dict(norm_type="batch"), "norm_type"),
                          (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"), (dict(head_dim=12), "head_dim"),
                          (dict(txt_size=0), "cond_top_only"), (dict(layers_per_block=[1, 2]), "layers_per_block")]:
        with pytest.raises(ValueError, match=match):
            StarFlow(**{**BASE, **change})
    m, z, (y, _) = tiny_starflow(), torch.randn(2, 2, 4, 4, dtype=torch.float64), text(2)
    for call, match in [(lambda: sample(m, z.unsqueeze(2), y=y), "video"), (lambda: m(z.unsqueeze(2), y), "video"),
                        (lambda: sample(m, z, y=y, guidance=2.0), "y_null"), (lambda: sample(m, z), "text embeddings"),
                        (lambda: as_flow(tiny_starflow("unconditional"), guidance=1.0), "unconditional"),
                        (lambda: as_flow(m, autocast=torch.float32), "autocast must be None, torch.bfloat16 or "
                         "torch.float16; got torch.float32")]:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="model must be a StarFlow"):
        as_flow(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="autocast=torch.bfloat16 needs a float32 model"):  # m is float64
        sample(m, z, y=y, autocast=torch.bfloat16)


# ------------------------------------------------------------------ loading for the planner, the benchmark


def test_load_for_planning_reads_the_fixture_and_the_entry_point_is_declared(model, public):
    from arflow_solvers.__main__ import main as cli

    flow, z, cond = load_for_planning(str(FIXTURE), 2, 7, "cpu")
    assert flow.num_blocks == 3 and z.shape == (2, 4, 8, 8) and cond.shape == (2, 4, 16)
    assert torch.equal(z, load_for_planning(str(FIXTURE), 2, 7, "cpu")[1])
    with torch.no_grad():
        x = solve(flow, z, Serial(), cond=cond).x
        torch.testing.assert_close(x, model.reverse(z, cond), rtol=0, atol=0)
    loader = "arflow_solvers.adapters.starflow:load_for_planning"
    assert f'starflow = "{loader}"' in (ROOT / "pyproject.toml").read_text()  # the `--model starflow` entry point
    assert cli(["plan", str(FIXTURE), "--model", loader, "--planner", "metric", "--batch", "2"]) == 0


def test_benchmark_tiny_mode_writes_every_sampler(tmp_path):
    import starflow as bench

    result = bench.main(["--tiny", "--json", str(tmp_path / "starflow.json")])
    rows = result["models"]["fixture"]["guidance_0"]["samplers"]
    assert {"public_serial", "public_jacobi_th0.001_bs16", "public_jacobi_th0.005_bs64", "jacobi_exact"} <= set(rows)
    assert rows["public_jacobi_th0.005_bs64"]["max_abs_err_vs_serial"] > 0.5  # the public sampler's error, as stored
    assert rows["jacobi_exact"]["max_abs_err_vs_serial"] < 2e-5 and rows["serial"]["calls_per_block"] == [64] * 3
    assert (tmp_path / "starflow.json").exists()
