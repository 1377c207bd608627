"""Sharded sampling: independent of the world size, resumable, nothing lost or duplicated."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arflow_solvers import GSJacobi, solve_inverse
from arflow_solvers.distributed import ShardSpec, merge_shards, sample_many, sample_noise, shard_path
from toys import CausalMLP

ROOT = Path(__file__).resolve().parents[1]
BLOCK = CausalMLP(6, 2, seed=9, dtype=torch.float32)
SPEC = ShardSpec(num_samples=10, shard_size=3, seed=4)


def free_port() -> int:
    """A TCP port nothing listens on now: bind port 0 on 127.0.0.1, read it, release it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sampler(z, cond):
    return solve_inverse(BLOCK, z, GSJacobi(2, tol=1e-6))


def test_noise_of_a_sample_depends_only_on_its_index_and_seed():
    assert torch.equal(sample_noise([5, 7], (3,), seed=1)[1], sample_noise([7], (3,), seed=1)[0])
    assert not torch.equal(sample_noise([5], (3,), seed=1), sample_noise([5], (3,), seed=2))


def test_one_process_writes_every_sample_once(tmp_path):
    merged = torch.load(sample_many(sampler, SPEC, (6, 2), tmp_path, show_progress=False))
    assert merged["samples"].shape == (10, 6, 2)
    assert merged["indices"].tolist() == list(range(10))
    expected = sampler(sample_noise(range(3), (6, 2), seed=4), None)
    assert torch.equal(merged["samples"][:3], expected)


def test_a_restart_skips_finished_shards(tmp_path):
    first = sample_many(sampler, SPEC, (6, 2), tmp_path, show_progress=False)
    reference = torch.load(first)["samples"]
    shard_path(tmp_path, 1).unlink()  # as if the job died before shard 1 was written
    stamp = shard_path(tmp_path, 0).stat().st_mtime_ns
    calls = []
    counting = lambda z, cond: calls.append(z.shape[0]) or sampler(z, cond)
    again = torch.load(sample_many(counting, SPEC, (6, 2), tmp_path, show_progress=False))
    assert calls == [3]  # only the missing shard was solved
    assert shard_path(tmp_path, 0).stat().st_mtime_ns == stamp
    assert torch.equal(again["samples"], reference)


def test_merge_names_missing_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        merge_shards(tmp_path, SPEC)


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sample_many(sampler, SPEC, (6, 2), out_dir, show_progress=False)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_bit_identical_samples_to_one_process(tmp_path):
    single = torch.load(sample_many(sampler, SPEC, (6, 2), tmp_path / "one", show_progress=False))
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2, join=True)
    double = torch.load(tmp_path / "two" / "samples.pt")
    assert torch.equal(single["samples"], double["samples"])


def test_torchrun_job_killed_mid_run_completes_on_restart(tmp_path):
    out = tmp_path / "run"

    def command():  # a fresh free port per launch: the killed job's port may linger
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                str(ROOT / "examples" / "sample_many.py"),
                "--num-samples", "40", "--shard-size", "5", "--features", "8", "--out", str(out)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(command() + ["--stop-after", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    written = sorted(p.name for p in out.glob("shard_*.pt"))
    assert 0 < len(written) < 8
    finished = subprocess.run(command(), env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    merged = torch.load(out / "samples.pt")
    assert merged["indices"].tolist() == list(range(40))
    assert not list(out.glob("*.partial*"))
    single = subprocess.run([sys.executable, str(ROOT / "examples" / "sample_many.py"), "--num-samples", "40",
                             "--shard-size", "5", "--features", "8", "--out", str(tmp_path / "single")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "single" / "samples.pt")["samples"], merged["samples"])
