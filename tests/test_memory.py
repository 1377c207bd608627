"""Peak memory is bounded by B x T x D times a small constant, however many iterations run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
BENCHMARKS = ROOT.parent / "benchmarks"

PROBE = textwrap.dedent("""
    import json, sys, torch
    sys.path[:0] = [{tests!r}, {benchmarks!r}]
    from arflow_solvers import GSJacobi, Jacobi, solve
    from _common import peak_rss_growth_mib
    from toys import Recurrence
    batch, seq_len, iters, segments = {batch}, {seq_len}, {iters}, {segments}
    block = Recurrence(seq_len, gain=0.5)
    z = torch.randn(batch, seq_len, 1, dtype=torch.float64)
    solver = GSJacobi(segments, tol=0.0, max_iters=iters) if segments > 1 else Jacobi(tol=0.0, max_iters=iters)
    solve(block, z[:2], solver)  # first-call allocations
    grew = peak_rss_growth_mib(lambda: solve(block, z, solver, max_batch={max_batch}))
    print(json.dumps({{"grew_mib": grew}}))
""")


def peak_growth_mib(batch, seq_len, iters, segments=1, max_batch=None):
    code = PROBE.format(tests=str(ROOT), benchmarks=str(BENCHMARKS), batch=batch, seq_len=seq_len, iters=iters,
                        segments=segments, max_batch=max_batch)
    # A fixed mmap threshold makes glibc return freed large blocks at once, so the peak RSS
    # follows the live tensors instead of the allocator's dynamic threshold.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["grew_mib"]


BATCH, SEQ_LEN = 64, 16384  # one (B, T, 1) float64 tensor is 8 MiB: an extremely long T, D = 1
TENSOR_MIB = BATCH * SEQ_LEN * 8 / 2**20


@pytest.mark.parametrize("segments", [1, 8])
def test_peak_memory_is_a_small_multiple_of_the_iterate(segments):
    grew = peak_growth_mib(BATCH, SEQ_LEN, iters=50, segments=segments)
    assert grew <= 12 * TENSOR_MIB, f"grew {grew:.0f} MiB for {TENSOR_MIB:.0f} MiB tensors"


def test_peak_memory_does_not_grow_with_iterations():
    few = peak_growth_mib(BATCH, SEQ_LEN, iters=5)
    many = peak_growth_mib(BATCH, SEQ_LEN, iters=200)
    assert many - few <= 2 * TENSOR_MIB, (few, many)


def test_max_batch_bounds_peak_memory_by_the_chunk():
    whole = peak_growth_mib(BATCH, SEQ_LEN, iters=20)
    chunked = peak_growth_mib(BATCH, SEQ_LEN, iters=20, max_batch=BATCH // 8)
    assert chunked <= whole / 2 + TENSOR_MIB, (whole, chunked)


BACKWARD_PROBE = textwrap.dedent("""
    import json, sys, torch
    sys.path[:0] = [{tests!r}, {benchmarks!r}]
    from arflow_solvers import Jacobi, solve
    from _common import peak_rss_growth_mib
    from toys import shift_right

    class Learned:  # x_t = exp(0.1 tanh(x_(t-1))) z_t + gain x_(t-1), gain learned
        seq_len = {seq_len}
        gain = torch.tensor({gain}, dtype=torch.float64, requires_grad=True)
        def parameters(self):
            return [self.gain]
        def affine(self, x, cond=None):
            previous = shift_right(x)
            return self.gain * previous, 0.1 * torch.tanh(previous)

    z = torch.randn({batch}, {seq_len}, 1, dtype=torch.float64, requires_grad=True)

    def step(z):
        solution = solve(Learned(), z, Jacobi(tol=0.0), log_prob=True)
        (solution.x.square().mean() + solution.log_prob.mean()).backward()
        return solution

    step(z[:2])  # first-call allocations
    found = []
    grew = peak_rss_growth_mib(lambda: found.append(step(z)))
    print(json.dumps({{"grew_mib": grew, "iterations": found[0].adjoint[0].iterations}}))
""")


def backward_peak_growth_mib(gain):
    code = BACKWARD_PROBE.format(tests=str(ROOT), benchmarks=str(BENCHMARKS), batch=BATCH, seq_len=SEQ_LEN, gain=gain)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["grew_mib"], result["iterations"]


def test_a_gradient_step_costs_one_evaluations_graph_however_many_iterations():
    """Autograd through the iterations would keep one graph per iteration; the adjoint keeps one."""
    few, few_iterations = backward_peak_growth_mib(gain=0.3)
    many, many_iterations = backward_peak_growth_mib(gain=0.8)
    assert many_iterations >= 3 * few_iterations, (few_iterations, many_iterations)
    assert many <= 16 * TENSOR_MIB, f"grew {many:.0f} MiB for {TENSOR_MIB:.0f} MiB tensors"
    assert many - few <= 2 * TENSOR_MIB, (few, many)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_peak_memory_is_a_small_multiple_of_the_iterate():
    from arflow_solvers import Jacobi, solve
    from toys import Recurrence

    z = torch.randn(BATCH, SEQ_LEN, 1, dtype=torch.float64, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    solve(Recurrence(SEQ_LEN, gain=0.5), z, Jacobi(tol=0.0, max_iters=100))
    assert torch.cuda.max_memory_allocated() - base <= 12 * TENSOR_MIB * 2**20
