"""TarFlow adapter: public compatibility, causality, cached evaluation, guidance, solvers."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from toys import tiny_tarflow  # noqa: E402
from arflow_solvers.adapters.tarflow import TarFlow, TarFlowARBlock, as_flow, denoise, sample
from arflow_solvers import (
    CachedARBlock,
    GSJacobi,
    HasOutputProjection,
    Plan,
    Jacobi,
    Serial,
    Status,
    solve,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tarflow_public_tiny.pt"
T, D = 16, 4  # 8x8 single-channel images, 2x2 patches



@pytest.fixture(scope="module")
def public():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def model(public):
    m = TarFlow(**public["config"])
    m.load_state_dict(public["state_dict"], strict=True)
    return m.eval()


def tiny(dtype=torch.float64, num_classes=3, nvp=True, seed=0, layers=2) -> TarFlow:
    return tiny_tarflow(dtype, num_classes, nvp, seed, layers)


# ------------------------------------------------------------------ public fixture


def test_fixture_forward_matches_public(model, public):
    with torch.no_grad():
        z, outputs, logdets = model(public["x"], public["y"])
    torch.testing.assert_close(z, public["z"], rtol=0, atol=1e-5)
    assert len(outputs) == len(public["block_outputs"]) == 2
    for ours, theirs in zip(outputs, public["block_outputs"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(logdets, public["logdets"], rtol=0, atol=1e-5)


REVERSE_CASES = ["reverse", "reverse_uncond", "reverse_cfg", "reverse_cfg_a"]
SOLVERS = [Serial(), Jacobi(tol=0.0), GSJacobi(segments=4, tol=0.0)]


def _reverse_args(public, case):
    """Keyword arguments of the public call that produced `case`, and its output."""
    y = public["y_sample"]
    if case == "reverse":
        return dict(y=y), public[case]
    if case == "reverse_uncond":
        return dict(y=None), public[case]
    stored = public[case]
    kwargs = {k: stored[k] for k in ("guidance", "guide_what", "attn_temp", "annealed_guidance")}
    return dict(y=y, **kwargs), stored["out"]


@pytest.mark.parametrize("case", REVERSE_CASES)
@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_fixture_reverse_matches_public(model, public, case, solver):
    # sample 0 of the fixture overflows in the public sampler itself (NaN); compare 1..3
    kwargs, expected = _reverse_args(public, case)
    assert not torch.isfinite(expected[0]).all() and torch.isfinite(expected[1:]).all()
    if kwargs["y"] is not None:
        kwargs["y"] = kwargs["y"][1:]
    x = model.reverse(public["noise"][1:].clone(), plan=solver, **kwargs)
    torch.testing.assert_close(x, expected[1:], rtol=0, atol=2e-5)


def test_fixture_overflowing_sample_is_reported(model, public):
    sol = solve(as_flow(model), public["noise"], Serial(), cond=public["y_sample"], throw=False)
    assert sol.status is Status.NONFINITE
    finite = torch.isfinite(sol.x.flatten(1)).all(1)
    assert finite.tolist() == [False, True, True, True]


def test_reverse_does_not_modify_noise(model, public):
    noise = public["noise"][1:].clone()
    model.reverse(noise, public["y_sample"][1:])
    assert torch.equal(noise, public["noise"][1:])


# ------------------------------------------------------------------ state dict


class _PublicAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)


class _PublicMLP(nn.Module):
    def __init__(self, c, e):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.main = nn.Sequential(nn.Linear(c, c * e), nn.GELU(), nn.Linear(c * e, c))


class _PublicAttentionBlock(nn.Module):
    def __init__(self, c, e):
        super().__init__()
        self.attention, self.mlp = _PublicAttention(c), _PublicMLP(c, e)


class _PublicMetaBlock(nn.Module):
    def __init__(self, d, c, t, layers, nvp, classes):
        super().__init__()
        self.proj_in = nn.Linear(d, c)
        self.pos_embed = nn.Parameter(torch.randn(t, c))
        self.class_embed = nn.Parameter(torch.randn(classes, 1, c)) if classes else None
        self.attn_blocks = nn.ModuleList(_PublicAttentionBlock(c, 4) for _ in range(layers))
        self.proj_out = nn.Linear(c, 2 * d if nvp else d)
        self.register_buffer("attn_mask", torch.tril(torch.ones(t, t)))


class _PublicModel(nn.Module):
    """The public `Model`'s module tree (names and shapes only)."""

    def __init__(self, in_channels, img_size, patch_size, channels, num_blocks, layers_per_block,
                 nvp=True, num_classes=0):
        super().__init__()
        t, d = (img_size // patch_size) ** 2, in_channels * patch_size**2
        self.blocks = nn.ModuleList(
            _PublicMetaBlock(d, channels, t, layers_per_block, nvp, num_classes) for _ in range(num_blocks)
        )
        self.register_buffer("var", torch.rand(t, d) + 0.5)


@pytest.mark.parametrize("nvp,num_classes", [(True, 3), (True, 0), (False, 0), (False, 5)])
def test_state_dict_round_trips_with_public_names(nvp, num_classes):
    config = dict(in_channels=3, img_size=8, patch_size=4, channels=128, num_blocks=3,
                  layers_per_block=2, nvp=nvp, num_classes=num_classes)
    theirs = _PublicModel(**config)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = TarFlow(**config)
    ours.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(ours.var, theirs.var)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    theirs.load_state_dict(ours_sd, strict=True)


# ------------------------------------------------------------------ block properties


def test_blocks_satisfy_protocols():
    m = tiny()
    flow = as_flow(m)
    assert flow.num_blocks == 2
    for block in flow.blocks:
        assert isinstance(block, CachedARBlock) and isinstance(block, HasOutputProjection)
    # sampling order: flow block 0 is the model's last block (flipped), between two flips
    assert flow.blocks[0].block is m.blocks[1] and flow.blocks[1].block is m.blocks[0]
    assert [type(s).__name__ for s in flow] == [
        "_ScaleByStd", "Permute", "TarFlowARBlock", "Permute", "TarFlowARBlock", "_Unpatchify"]


def test_output_projection_splits_proj_out():
    m = tiny()
    block = as_flow(m).blocks[1]  # model block 0
    w_mu, w_log_sigma = block.output_projection()
    w = m.blocks[0].proj_out.weight
    assert torch.equal(w_log_sigma, w[:D]) and torch.equal(w_mu, w[D:])
    m_vp = tiny(nvp=False)
    w_mu, w_log_sigma = as_flow(m_vp).blocks[0].output_projection()
    assert torch.equal(w_mu, m_vp.blocks[1].proj_out.weight) and not w_log_sigma.any()


GUIDES = [
    dict(),
    dict(guidance=1.5, guide_what="ab", attn_temp=0.7, annealed_guidance=True),
    dict(guidance=0.5, guide_what="a", attn_temp=1.0, annealed_guidance=False),
]


def _block(m, index, **guide):
    return as_flow(m, **guide).blocks[index]


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, 1), j=st.integers(0, T - 1), guide=st.sampled_from(GUIDES),
       seed=st.integers(0, 2**16))
def test_affine_is_causal(index, j, guide, seed):
    m = tiny()
    block = _block(m, index, **guide)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, T, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, -1])
    mu, log_sigma = block.affine(x, y)
    x2 = x.clone()
    x2[:, j] += torch.randn(3, D, generator=g, dtype=torch.float64)
    mu2, log_sigma2 = block.affine(x2, y)
    assert torch.equal(mu[:, : j + 1], mu2[:, : j + 1])
    assert torch.equal(log_sigma[:, : j + 1], log_sigma2[:, : j + 1])
    assert not mu[:, 0].any() and not log_sigma[:, 0].any()
    if j + 1 < T:  # and the next row does see it
        assert not torch.equal(mu[:, j + 1], mu2[:, j + 1])


@st.composite
def range_calls(draw):
    """A committed prefix, then several `(start, stop, rows)` calls respecting the contract."""
    committed = draw(st.integers(0, T - 1))
    calls = []
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.one_of(st.just(committed), st.integers(committed, T - 1)))
        stop = draw(st.integers(start + 1, T))
        rows = draw(st.one_of(st.none(), st.lists(st.integers(0, 4), min_size=1, max_size=5, unique=True)))
        calls.append((start, stop, None if rows is None else sorted(rows)))
        committed = draw(st.integers(committed, start))
        calls.append(("commit", committed, None))
    return calls


@settings(max_examples=30, deadline=None)
@given(index=st.integers(0, 1), calls=range_calls(), guide=st.sampled_from(GUIDES), seed=st.integers(0, 2**16))
def test_cached_range_equals_full_pass(index, calls, guide, seed):
    m = tiny()
    block = _block(m, index, **guide)
    g = torch.Generator().manual_seed(seed)
    batch = 5
    y = torch.tensor([0, 1, 2, -1, 1])
    z = torch.randn(batch, T, D, generator=g, dtype=torch.float64)
    x = torch.randn(batch, T, D, generator=g, dtype=torch.float64)
    cache = block.init_cache(z, y)
    for start, stop, rows in calls:
        if start == "commit":
            block.commit(cache, x, stop, y)
            # the solver may change anything after the committed prefix
            x[:, stop:] = torch.randn(batch, T - stop, D, generator=g, dtype=torch.float64)
            continue
        idx = None if rows is None else torch.tensor(rows)
        xs = x if idx is None else x[idx]
        mu, log_sigma = block.affine_range(cache, xs, start, stop, None if idx is None else y[idx], idx)
        mu_full, log_sigma_full = block.affine(xs, y if idx is None else y[idx])
        torch.testing.assert_close(mu, mu_full[:, start:stop], rtol=0, atol=1e-12)
        torch.testing.assert_close(log_sigma, log_sigma_full[:, start:stop], rtol=0, atol=1e-12)


def test_subset_rows_read_their_own_cached_prefix():
    """After a committed prefix, a subset of samples starting at it reads its own cache rows."""
    block = _block(tiny(), 1, guidance=1.0, attn_temp=0.8, annealed_guidance=True)
    z = torch.randn(4, T, D, dtype=torch.float64)
    x = torch.randn(4, T, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -1])
    cache = block.init_cache(z, y)
    block.affine_range(cache, x, 0, 6)
    block.commit(cache, x, 6)
    block.affine_range(cache, x, 6, 9)  # writes the committed tokens
    rows = torch.tensor([1, 3])
    mu, log_sigma = block.affine_range(cache, x[rows], 6, 9, y[rows], rows)
    mu_full, log_sigma_full = block.affine(x, y)
    torch.testing.assert_close(mu, mu_full[rows, 6:9], rtol=0, atol=1e-12)
    torch.testing.assert_close(log_sigma, log_sigma_full[rows, 6:9], rtol=0, atol=1e-12)


def test_serial_feeds_one_token_per_step():
    """The preallocated cache is never reallocated and each step runs one token."""
    m = tiny()
    block = _block(m, 0, guidance=1.0)
    z = torch.randn(2, T, D, dtype=torch.float64)
    cache = block.init_cache(z, None)
    pointers = [k.data_ptr() for k in cache.keys]
    fed = []
    original = block._tokens

    def spy(x_tok, start, *args):
        fed.append((start, x_tok.shape[1]))
        return original(x_tok, start, *args)

    block._tokens = spy
    x = torch.zeros_like(z)
    for t in range(T):
        mu, log_sigma = block.affine_range(cache, x, t, t + 1)
        x[:, t : t + 1] = log_sigma.exp() * z[:, t : t + 1] + mu
        block.commit(cache, x, t + 1)
    assert fed == [(t, 1) for t in range(T - 1)]
    assert [k.data_ptr() for k in cache.keys] == pointers
    assert cache.keys[0].shape == (4, 2, T, 16)  # (2B for guidance, heads, T, head_dim)


# ------------------------------------------------------------------ guidance


def _reference_rows(block, x, label, temp):
    """`proj_out` rows of one sample, with attention temperature `temp`, no batching or cache."""
    net = block.block
    x_perm = x.unsqueeze(0)
    h = net.proj_in(x_perm) + net.permute(net.pos_embed, dim=0)
    if net.class_embed is not None:
        h = h + (net.class_embed.mean(0) if label is None or label < 0 else net.class_embed[label])
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer in net.attn_blocks:
        attn = layer.attention
        hn = attn.norm(h)
        q, k, v = attn.qkv(hn).reshape(1, T, 3 * attn.num_heads, -1).transpose(1, 2).chunk(3, dim=1)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim) / temp
        weights = logits.masked_fill(~mask, -math.inf).softmax(-1)
        h = h + attn.proj((weights @ v).transpose(1, 2).reshape(1, T, -1))
        h = h + layer.mlp(h)
    out = net.proj_out(h)[0]
    shifted = torch.zeros_like(out)
    shifted[1:] = out[:-1]
    return shifted[:, D:], shifted[:, :D]  # mu, log_sigma


@pytest.mark.parametrize("guide", GUIDES[1:], ids=["annealed-ab", "plain-a"])
def test_guidance_equals_two_pass_reference(guide):
    m = tiny()
    block = _block(m, 0, **guide)
    x = torch.randn(3, T, D, dtype=torch.float64)
    y = torch.tensor([2, 0, -1])
    mu, log_sigma = block.affine(x, y)
    cache = block.init_cache(x, y)
    mu_r, log_sigma_r = block.affine_range(cache, x[[0, 2]], 3, T, y[[0, 2]], torch.tensor([0, 2]))
    for i in range(3):
        mu_c, ls_c = _reference_rows(block, x[i], int(y[i]), 1.0)
        mu_u, ls_u = _reference_rows(block, x[i], None, guide["attn_temp"])
        rows = torch.arange(T, dtype=torch.float64).unsqueeze(1)
        w = guide["guidance"] * (rows / (T - 1) if guide["annealed_guidance"] else 1.0)
        exp_ls = ls_c + w * (ls_c - ls_u) if "a" in guide["guide_what"] else ls_c
        exp_mu = mu_c + w * (mu_c - mu_u) if "b" in guide["guide_what"] else mu_c
        torch.testing.assert_close(mu[i], exp_mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(log_sigma[i], exp_ls, rtol=0, atol=1e-12)
        if y[i] >= 0:  # the unconditional pass really differs
            assert not torch.allclose(mu_c, mu_u)
    torch.testing.assert_close(mu_r, mu[[0, 2], 3:], rtol=0, atol=1e-12)
    torch.testing.assert_close(log_sigma_r, log_sigma[[0, 2], 3:], rtol=0, atol=1e-12)


# ------------------------------------------------------------------ solvers on the whole flow


@pytest.mark.parametrize("guide", GUIDES, ids=["none", "annealed-ab", "plain-a"])
def test_gs_jacobi_at_the_bound_equals_serial_float64(guide):
    m = tiny()
    z = torch.randn(4, T, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -1])
    flow = as_flow(m, **guide)
    serial = solve(flow, z, Serial(), cond=y)
    for plan in (GSJacobi(segments=4, tol=0.0), Jacobi(tol=0.0), GSJacobi(segments=(3, 9, 4), tol=0.0),
                 Plan.parse("[0-4-*-*]", tol=0.0)):
        sol = solve(flow, z, plan, cond=y)
        torch.testing.assert_close(sol.x, serial.x, rtol=0, atol=1e-10)
        assert all(b.passes <= T for b in sol.blocks)
    if not guide:  # unguided sampling inverts the density direction
        zz, _, _ = m(serial.x, y)
        torch.testing.assert_close(zz, z, rtol=0, atol=1e-10)


def test_serial_cache_equals_uncached_full_passes():
    m = tiny()
    z = torch.randn(3, T, D, dtype=torch.float64)
    x = solve(as_flow(m), z, Serial()).x

    class Uncached:  # the same block without its cache
        def __init__(self, b):
            self.b, self.seq_len = b, b.seq_len

        def affine(self, x, cond=None):
            return self.b.affine(x, cond)

    from arflow_solvers import Flow

    flow = Flow([Uncached(s) if isinstance(s, TarFlowARBlock) else s for s in as_flow(m)])
    torch.testing.assert_close(solve(flow, z, Serial()).x, x, rtol=0, atol=1e-12)


def test_label_minus_one_is_mean_embedding():
    m = tiny()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    z_mean, _, ld_mean = m(x, None)
    z_neg, _, ld_neg = m(x, torch.tensor([-1, -1]))
    z_cls, _, _ = m(x, torch.tensor([1, 1]))
    assert torch.equal(z_mean, z_neg) and torch.equal(ld_mean, ld_neg)
    assert not torch.allclose(z_cls, z_mean)
    noise = torch.randn(2, T, D, dtype=torch.float64)
    torch.testing.assert_close(m.reverse(noise, torch.tensor([-1, -1])), m.reverse(noise, None), rtol=0, atol=0)


def test_denoise_is_the_public_score_step():
    m = tiny(num_classes=0)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = 0.1
    # the public notebook: x - lr * grad(loss), lr = batch * pixels * sigma^2
    xg = x.clone().requires_grad_(True)
    z, _, logdets = m(xg)
    (grad,) = torch.autograd.grad(m.get_loss(z, logdets), [xg])
    expected = x - 3 * 64 * sigma**2 * grad
    torch.testing.assert_close(denoise(m, x, None, sigma), expected, rtol=0, atol=1e-12)
    assert torch.equal(denoise(m, x, None, 0.0), x)
    noise = torch.randn(3, T, D, dtype=torch.float64)
    raw = sample(m, noise, Serial(), denoise=False)
    torch.testing.assert_close(sample(m, noise, Jacobi(tol=0.0), noise_std=sigma), denoise(m, raw, None, sigma))


def test_bad_arguments_are_named():
    m = tiny()
    with pytest.raises(ValueError, match="guide_what"):
        as_flow(m, guidance=1.0, guide_what="c")
    with pytest.raises(ValueError, match="attn_temp"):
        as_flow(m, attn_temp=0.0)
    block = as_flow(m).blocks[0]
    with pytest.raises(ValueError, match=r"z must be \(B, 16, 4\)"):
        block.init_cache(torch.zeros(2, 15, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        block.affine(torch.zeros(2, T, D, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"y must hold labels"):
        m(torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="img_size"):
        TarFlow(1, 10, 4, 32, 2, 1)
    with pytest.raises(TypeError, match="model must be a TarFlow"):
        as_flow(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="noise_std"):  # checked before the solve
        sample(m, torch.zeros(2, T, D, dtype=torch.float64), noise_std=-1.0)


def test_package_keeps_its_public_names():
    import arflow_solvers.adapters.tarflow as tarflow
    from arflow_solvers.adapters.tarflow import Guidance, TarFlowCache  # noqa: F401  importable as before

    assert sorted(tarflow.__all__) == sorted([
        "TarFlow", "TarFlowBlock", "TarFlowARBlock", "Attention", "MLP", "AttentionBlock", "as_flow",
        "load_for_planning", "sample", "denoise", "patchify", "unpatchify"])
    assert all(callable(getattr(tarflow, name)) for name in tarflow.__all__)


# ------------------------------------------------------------------ loading for the planner


def _train_example():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "train_tarflow.py"
    spec = importlib.util.spec_from_file_location("train_tarflow_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_for_planning_reads_a_train_example_checkpoint(tmp_path):
    from arflow_solvers.adapters.tarflow import load_for_planning
    from arflow_solvers.__main__ import main as cli

    example = _train_example()
    args = example.parse_args(["--out", str(tmp_path), "--patch-size", "4", "--channels", "32", "--blocks", "2",
                               "--layers", "1", "--head-dim", "16", "--steps", "2", "--batch-size", "4",
                               "--synthetic-size", "8", "--warmup", "1"])
    path = example.train(args)
    flow, z, cond = load_for_planning(str(path), 3, 7, "cpu")
    assert flow.num_blocks == 2 and z.shape == (3, 49, 16) and z.dtype == torch.float32
    assert cond is not None and cond.shape == (3,) and bool(((cond >= 0) & (cond < 10)).all())
    flow2, z2, cond2 = load_for_planning(str(path), 3, 7, "cpu")
    assert torch.equal(z, z2) and torch.equal(cond, cond2)
    assert not torch.equal(z, load_for_planning(str(path), 3, 8, "cpu")[1])
    x = solve(flow, z, Serial(), cond=cond).x
    assert x.shape == (3, 1, 28, 28) and bool(torch.isfinite(x).all())
    model, _ = example.load_checkpoint(path)
    assert torch.equal(x, model.reverse(z, cond))
    out = tmp_path / "plan.json"
    assert cli(["plan", str(path), "--model", "tarflow", "--planner", "metric", "--batch", "2",
                "--json", str(out)]) == 0
    assert out.exists()
    with pytest.raises(ValueError, match="batch"):
        load_for_planning(str(path), 0, 0, "cpu")
    torch.save({"w": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="config"):
        load_for_planning(str(tmp_path / "bad.pt"), 2, 0, "cpu")


def test_an_unconditional_tarflow_refuses_labels_and_guidance():
    model = tiny(num_classes=0)
    z = torch.randn(2, model.num_patches, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unconditional"):
        sample(model, z, y=torch.tensor([0, 1]), denoise=False)
    with pytest.raises(ValueError, match="guidance=1.5 given, but the TarFlow is unconditional"):
        sample(model, z, guidance=1.5, denoise=False)
    with pytest.raises(ValueError, match="unconditional"):
        model.reverse(z, guidance=2.0)


def test_image_shaped_noise_gets_an_error_naming_the_patch_shape():
    model = tiny()
    with pytest.raises(ValueError, match=r"patch noise \(B, T=16, D=4\); got an image-shaped \(2, 1, 8, 8\)"):
        sample(model, torch.randn(2, 1, 8, 8, dtype=torch.float64), denoise=False)


def test_sampling_can_return_failed_samples_instead_of_raising():
    from arflow_solvers import SolveError

    model = tiny()
    z = torch.randn(3, model.num_patches, 4, dtype=torch.float64)
    z[1, 5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"samples \[1\]"):
        model.reverse(z)
    x = model.reverse(z, throw=False)
    assert torch.isnan(x[1]).any() and torch.isfinite(x[[0, 2]]).all()
    assert issubclass(SolveError, RuntimeError)


# ------------------------------------------------------------------ bfloat16 autocast (the public sampler's precision)

BF16_RTOL = 3e-2
"""Stated tolerance of `autocast=torch.bfloat16`: per sample, max abs error / max abs value vs float32."""


def _relative_err(x, reference):
    """Largest per-sample `max |x - reference| / max |reference|`."""
    return float(((x - reference).abs().flatten(1).amax(1) / reference.abs().flatten(1).amax(1)).max())


@pytest.mark.parametrize("case", REVERSE_CASES)
@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_bfloat16_autocast_reproduces_the_public_fixture_on_cpu(model, public, case, solver):
    # measured on this fixture: 0.4-1.9% (the public-style loop under the same autocast: 0.5-1.7%)
    kwargs, expected = _reverse_args(public, case)
    if kwargs["y"] is not None:
        kwargs["y"] = kwargs["y"][1:]
    x = model.reverse(public["noise"][1:].clone(), plan=solver, autocast=torch.bfloat16, **kwargs)
    assert x.dtype == torch.float32
    assert 1e-4 < _relative_err(x, expected[1:]) <= BF16_RTOL  # it did run in bfloat16, within the tolerance


@pytest.mark.parametrize("guide", GUIDES, ids=["none", "annealed-ab", "plain-a"])
def test_bfloat16_autocast_caches_in_bfloat16_and_updates_in_float32(guide):
    m = tiny(torch.float32)
    block = as_flow(m, autocast=torch.bfloat16, **guide).blocks[0]
    z = torch.randn(3, T, D)
    y = torch.tensor([0, 2, -1])
    cache = block.init_cache(z, y)
    assert all(buf.dtype == torch.bfloat16 for buf in cache.keys + cache.values)
    assert cache.outputs.dtype == torch.float32
    with torch.no_grad():
        mu, log_sigma = block.affine_range(cache, z, 0, 9)
        mu_full, log_sigma_full = block.affine(z, y)
        mu_32, _ = as_flow(m, **guide).blocks[0].affine(z, y)
    assert mu.dtype == log_sigma.dtype == mu_full.dtype == torch.float32  # guidance, exp, update in float32
    torch.testing.assert_close(mu, mu_full[:, :9], rtol=0, atol=1e-2)  # cached range vs full pass
    torch.testing.assert_close(log_sigma, log_sigma_full[:, :9], rtol=0, atol=1e-2)
    assert 0 < float((mu_full - mu_32).abs().max()) < 5e-2  # bfloat16 rounding, no more
    assert "autocast=torch.bfloat16" in repr(block)


def test_bfloat16_autocast_solvers_agree_with_float32_sampling():
    m = tiny(torch.float32)
    z = torch.randn(4, T, D)
    y = torch.tensor([0, 1, 2, -1])
    reference = solve(as_flow(m, guidance=1.0), z, Serial(), cond=y).x
    for plan in (Serial(), Jacobi(tol=0.0), GSJacobi(segments=4, tol=0.0), Plan.parse("[0-4-*-*]", tol=1e-4)):
        x = sample(m, z, plan, y=y, guidance=1.0, denoise=False, autocast=torch.bfloat16)
        assert _relative_err(x, reference) <= BF16_RTOL, plan


def test_an_autocast_context_of_the_callers_own_equals_the_option():
    m = tiny(torch.float32)
    z = torch.randn(2, T, D)
    y = torch.tensor([1, 2])
    own = m.reverse(z, y, guidance=1.0, autocast=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ambient = m.reverse(z, y, guidance=1.0)
        cache = as_flow(m).blocks[0].init_cache(z, y)
    assert torch.equal(own, ambient) and ambient.dtype == torch.float32
    assert cache.keys[0].dtype == torch.bfloat16


def test_autocast_option_is_checked():
    m = tiny()  # float64
    with pytest.raises(ValueError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        as_flow(m, autocast=torch.float32)
    with pytest.raises(TypeError, match="needs a float32 model"):
        m.reverse(torch.randn(2, T, D, dtype=torch.float64), autocast=torch.bfloat16)
