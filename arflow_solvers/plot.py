"""Convergence plots (needs the `plot` extra: matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .metrics import BlockMetrics
from .solution import Solution

__all__ = ["residual_curves", "metric_bars", "speed_error_frontier"]


def _figure(**options: Any) -> Any:
    """A standalone matplotlib `Figure`: no pyplot state, no backend switched, nothing left open."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'arflow-solvers[plot]'") from error
    return Figure(**options)


def _save(fig: Any, path: str | Path | None) -> Any:
    if path is not None:
        fig.savefig(path, bbox_inches="tight", dpi=120)
    return fig


def residual_curves(solution: Solution, path: str | Path | None = None) -> Any:
    """Median max-abs update vs iteration, one curve per block (the paper's Figures 2 and 5).

    Segments of a GS-Jacobi block are drawn one after another on the iteration axis.
    Returns the matplotlib figure; saves it (PNG or SVG by the suffix) when `path` is given.
    """
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for block in solution.blocks:
        if not block.residuals:
            continue
        curve = torch.cat([r.nanmedian(dim=1).values for r in block.residuals if r.numel()])
        ax.semilogy(range(1, len(curve) + 1), curve.clamp_min(1e-30).tolist(),
                    label=f"block {block.index}")
    ax.set_xlabel("Jacobi iteration")
    ax.set_ylabel("median max |x^{k+1} - x^k|")
    ax.legend(fontsize="small")
    return _save(fig, path)


def metric_bars(metrics: Sequence[BlockMetrics], path: str | Path | None = None) -> Any:
    """Per-block IGM (both initial guesses) and CRM as bar charts."""
    fig = _figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    index = [m.index for m in metrics]
    width = 0.4
    left.bar([i - width / 2 for i in index], [m.igm_noise for m in metrics], width, label="X0 = Z")
    left.bar([i + width / 2 for i in index], [m.igm_zeros_first_exact for m in metrics], width,
             label="X0 = Z0")
    left.set_title("IGM")
    left.set_xlabel("block (sampling order)")
    left.legend(fontsize="small")
    right.bar(index, [m.crm if m.crm is not None else 0.0 for m in metrics])
    right.set_title("CRM")
    right.set_xlabel("block (sampling order)")
    return _save(fig, path)


def speed_error_frontier(results: Mapping[str, Mapping[str, float]], path: str | Path | None = None,
                         speed_key: str = "speedup_vs_serial", error_key: str = "max_abs_error") -> Any:
    """Speedup vs error of several plans, one labelled point each (e.g. a benchmark's JSON)."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, row in results.items():
        error = max(float(row[error_key]), 1e-16)
        ax.scatter(error, row[speed_key])
        ax.annotate(name, (error, row[speed_key]), fontsize="x-small")
    ax.set_xscale("log")
    ax.set_xlabel(error_key.replace("_", " "))
    ax.set_ylabel(speed_key.replace("_", " "))
    return _save(fig, path)
