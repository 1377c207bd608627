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

from arflow_solvers import GSJacobi, Status, solve, solve_inverse
from arflow_solvers.distributed import ResumeError, ShardSpec, merge_shards, sample_many, sample_noise, shard_path
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
    same = {"model": BLOCK, "sampler_id": "GSJacobi(2, tol=1e-6)", "show_progress": False}
    first = sample_many(sampler, SPEC, (6, 2), tmp_path, **same)
    reference = torch.load(first)["samples"]
    shard_path(tmp_path, 1).unlink()  # as if the job died before shard 1 was written
    stamp = shard_path(tmp_path, 0).stat().st_mtime_ns
    calls = []
    counting = lambda z, cond: calls.append(z.shape[0]) or sampler(z, cond)
    again = torch.load(sample_many(counting, SPEC, (6, 2), tmp_path, **same))
    assert calls == [3]  # only the missing shard was solved
    assert shard_path(tmp_path, 0).stat().st_mtime_ns == stamp
    assert torch.equal(again["samples"], reference)


def test_merge_names_missing_shards(tmp_path):
    sample_many(sampler, SPEC, (6, 2), tmp_path, show_progress=False)
    shard_path(tmp_path, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"missing.*\[2\]|\[2\].*missing"):
        merge_shards(tmp_path, SPEC)


class Exploding:
    """x_t = exp(200 (x_{t-1} - 2)^+) z_t: overflows for samples 0 and 8 of SPEC, on no redraw."""

    seq_len = 6

    def affine(self, x, cond=None):
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return torch.zeros_like(x), 200.0 * (previous - 2.0).clamp(min=0)


EXPLODING = Exploding()
SAMPLERS = {  # the three ways a sampler reports a failed sample
    "raises SolveError": lambda z, cond: solve_inverse(EXPLODING, z, GSJacobi(2, tol=1e-6)),
    "returns a Solution": lambda z, cond: solve(EXPLODING, z, GSJacobi(2, tol=1e-6), throw=False),
    "returns NaN rows": lambda z, cond: solve(EXPLODING, z, GSJacobi(2, tol=1e-6), throw=False).x,
}


@pytest.mark.parametrize("kind", SAMPLERS)
def test_samples_the_model_cannot_produce_are_marked_and_the_run_finishes(tmp_path, kind):
    with pytest.warns(RuntimeWarning, match=r"10 samples .*: 2 failed \(indices 0, 8"):
        merged = sample_many(SAMPLERS[kind], SPEC, (6, 2), tmp_path, show_progress=False)
    assert merged.failed.tolist() == [0, 8] and merged.redrawn.numel() == 0
    data = torch.load(merged)
    assert data["status"][[0, 8]].tolist() == [Status.NONFINITE] * 2
    good = [i for i in range(10) if i not in (0, 8)]
    assert (data["status"][good] == Status.CONVERGED).all() and torch.isfinite(data["samples"][good]).all()
    expected = solve(EXPLODING, sample_noise(good, (6, 2), seed=4), GSJacobi(2, tol=1e-6)).x
    assert torch.equal(data["samples"][good], expected)


def test_redraws_replace_failed_samples_with_reproducible_recorded_noise(tmp_path):
    merged = sample_many(SAMPLERS["raises SolveError"], SPEC, (6, 2), tmp_path, redraws=2, show_progress=False)
    data = torch.load(merged)
    assert merged.failed.numel() == 0 and merged.redrawn.tolist() == [0, 8]
    assert data["attempts"].tolist() == [1] + [0] * 7 + [1, 0]
    redrawn = solve(EXPLODING, sample_noise([0, 8], (6, 2), seed=4, draw=1), GSJacobi(2, tol=1e-6)).x
    assert torch.equal(data["samples"][[0, 8]], redrawn)


def make_sampler(block):
    return lambda z, cond: solve_inverse(block, z, GSJacobi(2, tol=1e-6))


CHANGES = {  # what a rerun changes -> (sampler, spec, noise shape), and the manifest field named
    "seed": ((sampler, ShardSpec(10, 3, seed=5), (6, 2)), "seed"),
    "model": ((make_sampler(CausalMLP(6, 2, seed=10, dtype=torch.float32)), SPEC, (6, 2)), "model"),
    "noise shape": ((sampler, SPEC, (6, 1)), "noise_shape"),
    "sampler": ((lambda z, cond: solve_inverse(BLOCK, z, GSJacobi(3, tol=1e-6)), SPEC, (6, 2)), "sampler"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_rerun_with_other_settings_is_refused_naming_what_differs(tmp_path, change):
    sample_many(make_sampler(BLOCK), SPEC, (6, 2), tmp_path, show_progress=False)
    (other, spec, shape), field = CHANGES[change]
    with pytest.raises(ResumeError, match=rf"{field}: .* there, .* now.*another out_dir.*overwrite"):
        sample_many(other, spec, shape, tmp_path, show_progress=False)


def test_overwrite_deletes_the_old_run_and_starts_again(tmp_path):
    sample_many(sampler, SPEC, (6, 2), tmp_path, show_progress=False)
    other = ShardSpec(4, 3, seed=5)
    merged = torch.load(sample_many(sampler, other, (6, 2), tmp_path, overwrite=True, show_progress=False))
    assert merged["samples"].shape == (4, 6, 2)
    assert torch.equal(merged["samples"][:3], sampler(sample_noise(range(3), (6, 2), seed=5), None))
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_000000.pt", "shard_000001.pt"]


def test_shards_without_a_manifest_are_not_trusted(tmp_path):
    torch.save({"indices": torch.arange(3), "samples": torch.zeros(3, 6, 2)}, shard_path(tmp_path, 0))
    with pytest.raises(ResumeError, match="no manifest.json.*overwrite"):
        sample_many(sampler, SPEC, (6, 2), tmp_path, show_progress=False)


def test_a_sampler_returning_the_wrong_number_of_rows_is_refused_before_its_shard_is_written(tmp_path):
    short = lambda z, cond: sampler(z, cond)[1:]
    with pytest.raises(ValueError, match="returned 2 rows for the 3 noise rows of shard 0"):
        sample_many(short, SPEC, (6, 2), tmp_path, show_progress=False)
    assert not list(tmp_path.glob("shard_*"))


def test_corrupt_shards_are_named_moved_aside_and_solved_again(tmp_path):
    reference = torch.load(sample_many(sampler, SPEC, (6, 2), tmp_path, show_progress=False))["samples"]
    whole = shard_path(tmp_path, 1).read_bytes()
    shard_path(tmp_path, 1).write_bytes(whole[: len(whole) // 2])  # truncated
    shard_path(tmp_path, 2).write_bytes(b"not a torch file")  # garbage
    shard = torch.load(shard_path(tmp_path, 3))
    torch.save({**shard, "samples": shard["samples"][:0]}, shard_path(tmp_path, 3))  # rows missing
    with pytest.warns(RuntimeWarning) as caught:
        again = torch.load(sample_many(sampler, SPEC, (6, 2), tmp_path, show_progress=False))
    messages = " ".join(str(w.message) for w in caught)
    for k in (1, 2, 3):
        assert f"{shard_path(tmp_path, k)} " in messages and shard_path(tmp_path, k).with_suffix(".pt.corrupt").exists()
    assert "unreadable" in messages and "0 rows of 'samples' for 1 samples" in messages
    assert torch.equal(again["samples"], reference)


def test_merge_names_a_corrupt_shard_and_moves_it_aside(tmp_path):
    sample_many(sampler, SPEC, (6, 2), tmp_path, show_progress=False)
    shard_path(tmp_path, 0).write_bytes(b"")
    with pytest.raises(ValueError, match=r"shard_000000.pt is unreadable.*rerun sample_many"):
        merge_shards(tmp_path, SPEC)
    assert (tmp_path / "shard_000000.pt.corrupt").exists() and not shard_path(tmp_path, 0).exists()


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
