"""The GPU suite cannot rot while no GPU is around: its CPU smoke mode runs every part here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ["correctness_tarflow", "correctness_nflows", "maf_nflows", "maf_zuko", "tarflow_img64_uncond",
         "tarflow_img64_cond_cfg", "tarflow_afhq", "tarflow_afhq_cfg", "starflow_t2i_3b", "starflow_fixture"]
STARFLOW_METHODS = ["serial", "public_jacobi_th0.001_bs16", "public_jacobi_th0.005_bs64", "jacobi_tol1e-4",
                    "gs4_tol1e-4", "jacobi_exact_cap16", "public_serial"]
ENV_KEYS = {"device", "device_name", "date_utc", "torch", "python", "loadavg"}


def run_suite(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # smoke mode never touches a GPU, even where one exists
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load(path: Path) -> dict:
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text, f"{path.name} is not strict JSON"
    return json.loads(text)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_smoke")
    # a generous deadline: a loaded CI machine must not turn a part into 'partial'
    done = run_suite("--smoke", "--out", str(out), "--deadline", "240")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_smoke_writes_every_part(smoke):
    out, stdout = smoke
    assert sorted(p.name for p in out.glob("*.json")) == sorted([f"{p}.json" for p in PARTS] + ["suite.json"])
    assert not list(out.glob("*.tmp"))
    index = load(out / "suite.json")
    assert index["mode"].startswith("smoke") and list(index["parts"]) == PARTS
    for name in PARTS:
        part = load(out / f"{name}.json")
        assert part["part"] == name and ENV_KEYS <= set(part["env"]), name
        assert part["status"] in ("ok", "skipped"), (name, part.get("error"), part.get("traceback"))
        assert index["parts"][name]["status"] == part["status"]
        assert part["elapsed_s"] <= part["time_limit_s"] + 30
        assert f"{name}: start" in stdout  # progress lines


def test_smoke_correctness_parts_pass(smoke):
    out, _ = smoke
    tarflow = load(out / "correctness_tarflow.json")
    assert tarflow["status"] == "ok" and tarflow["passed"] == tarflow["judged"] == 25
    judged = [c for c in tarflow["checks"] if "passed" in c]
    assert all(c["passed"] for c in judged)
    assert sum("bfloat16" in c["check"] for c in judged) == 12
    nflows = load(out / "correctness_nflows.json")
    assert nflows["status"] == "ok" and all(c["passed"] and c["max_abs_err"] == 0.0 for c in nflows["checks"])


@pytest.mark.parametrize("name", [p for p in PARTS if p.startswith("tarflow_")])
def test_smoke_tarflow_parts_report_blocks_and_ratios(smoke, name):
    out, _ = smoke
    part = load(out / f"{name}.json")
    assert part["status"] == "ok" and part["model"]["num_blocks"] == 8
    assert part["plan"]["numbering"] == "paper" and part["plan"]["tol"] == 0.0
    for method in ("public_loop", "serial", "plan"):
        m = part["methods"][method]
        assert m["rounds"] >= 1 and len(m["times_s"]) == m["rounds"] and m["best_s"] > 0
        assert m["spread"] >= 0 and len(m["blocks"]) == 8
        assert all({"block", "calls", "full_pass_equiv", "wall_s"} <= set(b) for b in m["blocks"])
    assert set(part["ratios"]) == {"serial_vs_public", "plan_vs_public", "plan_vs_serial"}
    assert part["targets"]["serial_vs_public"]["target"] == 2.0
    assert part["targets"]["plan_vs_public"]["target"] == 6.0
    # the published plan runs to its caps: every Jacobi block does exactly its cap
    seq_len = part["model"]["seq_len"]
    for block in part["methods"]["plan"]["blocks"]:
        if block["solver"].startswith("CappedJacobi"):
            cap = int(block["solver"].split("max_iters=")[1].split(",")[0])
            assert block["iterations_mean"] == min(cap, seq_len) == block["calls"]
    groups = 2 if part["guidance"] else 1
    assert part["methods"]["public_loop"]["calls"] == 8 * (seq_len - 1) * groups
    assert part["methods"]["serial"]["calls"] == 8 * seq_len


@pytest.mark.parametrize("name", ["maf_nflows", "maf_zuko"])
def test_smoke_maf_parts(smoke, name):
    out, _ = smoke
    part = load(out / f"{name}.json")
    if part["status"] == "skipped":
        assert name == "maf_zuko" and "no zuko adapter" in part["reason"]
        return
    library = part["methods"][next(iter(part["methods"]))]
    assert library["speedup_vs_library"] == 1.0
    exact = part["methods"]["exact (tol=0)"]
    assert exact["bit_identical_to_library"] and exact["calls"] > 0 and exact["status"] == "CONVERGED"


def check_starflow(part: dict, blocks: int) -> None:
    """Every method ran over `blocks` blocks; serial samplers make T calls per block; exact equals serial."""
    assert part["status"] == "ok" and not part["not_run"], part.get("not_run")
    assert list(part["methods"]) == STARFLOW_METHODS
    seq_len = part["model"]["seq_len"]
    assert seq_len == 16 and part["model"]["num_blocks"] == 6 and part["guidance"] > 0
    for name, m in part["methods"].items():
        assert m["rounds"] >= 1 and m["best_s"] > 0 and len(m["blocks"]) == len(m["calls_per_block"]) == blocks
        assert m["calls"] == sum(m["calls_per_block"]) and all(c >= 1 for c in m["calls_per_block"]), name
    methods = part["methods"]
    # sos: serial sampling is one call per token, for the public loop and ours
    assert methods["serial"]["calls_per_block"] == methods["public_serial"]["calls_per_block"] == [seq_len] * blocks
    assert methods["serial"]["max_abs_err_vs_serial"] == 0.0 and methods["serial"]["frac_8bit_equal"] == 1.0
    assert methods["public_serial"]["max_abs_err_vs_serial"] <= 1e-4
    # the cap (16) reaches T here: the exact mode equals serial to float32 tolerance
    assert methods["jacobi_exact_cap16"]["max_abs_err_vs_serial"] <= 1e-4
    for size in (16, 64):
        name = next(n for n in methods if n.endswith(f"_bs{size}"))
        chunks = -(-seq_len // size)
        assert all(chunks <= c <= 32 * chunks for c in methods[name]["calls_per_block"]), name
        target = part["targets"][name.removeprefix("public_jacobi_")]
        assert target["public_calls"] == methods[name]["calls"]
    assert part["ratios"]["serial_vs_public_serial"] > 0


def test_smoke_starflow_part(smoke):
    out, _ = smoke
    part = load(out / "starflow_t2i_3b.json")
    assert part["scope"] == "all blocks" and part["model"]["layers_per_block"] == [1, 1, 1, 1, 1, 2]
    assert part["precision"].startswith("float32") and "configs/starflow_3B_t2i_256x256.yaml" in part["model"]["where"]
    check_starflow(part, blocks=6)


def test_smoke_starflow_fixture_part_times_newton_against_the_public_sampler(smoke):
    out, _ = smoke
    part = load(out / "starflow_fixture.json")
    assert set(part["methods"]) == {"serial", "jacobi_tol1e-4", "newton_tol1e-3", "public_jacobi_th0.001_bs16",
                                    "public_jacobi_th0.005_bs64"}
    assert part["methods"]["newton_tol1e-3"]["calls_per_block"] == [1, 1, 1]  # smoke: one iteration per block
    assert part["ratios"]["newton_tol1e-3_vs_public_jacobi_th0.005_bs64"] > 0
    assert part["targets"]["th0.005_bs64"]["public_calls"] == part["methods"]["public_jacobi_th0.005_bs64"]["calls"]


def suite_module():
    """benchmarks/gpu_suite.py imported in this process (the refusal and the deadline need no subprocess)."""
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_without_cuda_the_full_suite_refuses(tmp_path, monkeypatch, capsys):
    suite = suite_module()
    monkeypatch.setattr(suite.torch.cuda, "is_available", lambda: False)
    assert suite.main(["--out", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--smoke" in err
    assert not (tmp_path / "gpu").exists()


def test_starflow_on_the_deep_block_alone(tmp_path):
    suite = suite_module()
    assert suite.main(["--smoke", "--out", str(tmp_path), "--parts", "starflow", "--starflow-scope", "deep",
                       "--rounds", "1"]) == 0
    part = load(tmp_path / "starflow_t2i_3b.json")
    assert part["scope"] == "deep block" and "--starflow-scope deep" in part["scope_reason"]
    check_starflow(part, blocks=1)


def test_starflow_shapes_are_the_public_3b_configuration():
    """The GPU shapes: T = 1024 latent tokens of 4 channels, width 3072, a 24-layer deep block, 128 text tokens."""
    suite_module()
    from _gpu_starflow import T2I_3B

    from arflow_solvers.adapters.starflow import StarFlow

    with torch.device("meta"):
        model = StarFlow(**T2I_3B)
    assert model.num_patches == 1024 and model.blocks[-1].in_channels == 4
    assert [len(b.attn_blocks) for b in model.blocks] == [2, 2, 2, 2, 2, 24]
    assert model.blocks[-1].attn_blocks[0].attention.num_heads == 48 and model.txt_dim == 2048
    assert 3.5e9 < sum(p.numel() for p in model.parameters()) < 4e9


def test_parts_subset_and_global_deadline(tmp_path):
    suite = suite_module()
    assert suite.main(["--smoke", "--out", str(tmp_path), "--parts", "correctness_nflows", "maf",
                       "--deadline", "0"]) == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["correctness_nflows.json", "maf_nflows.json", "maf_zuko.json", "suite.json"]
    for name in files[:-1]:
        part = load(tmp_path / name)
        assert part["status"] == "skipped" and "deadline" in part["reason"]
    with pytest.raises(SystemExit, match="unknown parts"):
        suite.main(["--smoke", "--out", str(tmp_path), "--parts", "nope"])
