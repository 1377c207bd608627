"""Helpers shared by the benchmark scripts: the machine's description, synchronised timing rounds, JSON output."""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "synchronizer", "timed_rounds", "time_summary", "write_json", "loadavg", "peak_rss_growth_mib"]


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or `None` where `/proc/loadavg` does not exist."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_rss_growth_mib(fn: Callable[[], Any]) -> float:
    """How far the resident set grew above its level before `fn()` at its peak, in MiB.

    Uses the peak of this process's own memory map (`VmHWM`, reset through
    `/proc/self/clear_refs`), not `getrusage`'s `ru_maxrss`, which a child process inherits
    from its parent across `fork` and `exec`. Run it in a fresh process, after a warm-up
    call, with `MALLOC_MMAP_THRESHOLD_` fixed so freed large blocks are returned at once.
    """
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the measurement: device model, date, versions, threads, load, commit."""
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "loadavg": loadavg(),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    return env


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_rounds(fns: dict[str, Callable[[], Any]], *, rounds: int, until: float, first_round_s: float,
                 sync: Callable[[], None], log: Callable[[str], None] = lambda _: None, warm: int = 0,
                 ) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Run every function once per round, round-robin, for at most `rounds` rounds.

    A round starts only if it is predicted to end before `until` (a `time.monotonic()`
    deadline): the first round is predicted to last `first_round_s`, later ones as long as the
    last. Each run is bracketed by `sync`, so the time is the device's, not the launch's.
    `warm` untimed runs of the same function precede each timed one, so each is timed as in a
    loop of its own (caches and allocator warm from the same work, not from the method before).
    Returns per function the seconds of each run and the outputs of each run.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, list[Any]] = {name: [] for name in fns}
    predicted = first_round_s
    for r in range(rounds):
        if time.monotonic() + predicted > until:
            log(f"round {r + 1}/{rounds} skipped: predicted {predicted:.1f} s, "
                f"{max(until - time.monotonic(), 0):.1f} s left")
            break
        began = time.monotonic()
        for name, fn in fns.items():
            for _ in range(warm):
                fn()
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times[name].append(time.perf_counter() - start)
            outputs[name].append(out)
            log(f"round {r + 1}/{rounds} {name}: {times[name][-1]:.3f} s")
        predicted = time.monotonic() - began
    return times, outputs


def time_summary(seconds: list[float]) -> dict[str, Any]:
    """Best (the figure ratios use), median, every run, and the spread `(max - min) / min`."""
    if not seconds:
        return {"rounds": 0, "best_s": math.nan, "median_s": math.nan, "spread": math.nan, "times_s": []}
    best = min(seconds)
    return {"rounds": len(seconds), "best_s": best, "median_s": statistics.median(seconds),
            "spread": (max(seconds) - best) / best if best > 0 else 0.0,
            "times_s": [round(s, 5) for s in seconds]}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically (a reader never sees half a file); NaN becomes null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def _finite(value: Any) -> Any:
    """`value` with non-finite floats replaced by `None` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
