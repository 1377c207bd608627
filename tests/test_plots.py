"""Plots: every figure the paper draws can be written as PNG or SVG from a solve's statistics."""

import pytest
import torch

pytest.importorskip("matplotlib")

from arflow_solvers import Flow, GSJacobi, solve  # noqa: E402
from arflow_solvers.metrics import BlockMetrics  # noqa: E402
from arflow_solvers.plot import metric_bars, residual_curves, speed_error_frontier  # noqa: E402
from toys import CausalMLP  # noqa: E402


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plots_are_written_in_the_format_of_the_suffix(tmp_path, suffix):
    z = torch.randn(4, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solution = solve(Flow([CausalMLP(6, 2, seed=1), CausalMLP(6, 2, seed=2)]), z, GSJacobi(2, tol=1e-8))
    metrics = [BlockMetrics(index=0, igm_noise=1.0, igm_zeros_first_exact=2.5, crm=40.0,
                            iterations_mean=7.5, iterations_max=9),
               BlockMetrics(index=1, igm_noise=0.5, igm_zeros_first_exact=0.7, crm=None,
                            iterations_mean=3.0, iterations_max=4)]
    figures = {
        "residuals": lambda path: residual_curves(solution, path),
        "metrics": lambda path: metric_bars(metrics, path),
        "frontier": lambda path: speed_error_frontier(
            {"J-10": {"speedup_vs_serial": 3.0, "max_abs_error": 1e-3},
             "exact": {"speedup_vs_serial": 1.5, "max_abs_error": 0.0}}, path),
    }
    for name, draw in figures.items():
        path = tmp_path / f"{name}.{suffix}"
        figure = draw(path)
        assert figure.axes and path.stat().st_size > 0
        head = path.read_bytes()[:5]
        assert head.startswith(b"\x89PNG") if suffix == "png" else b"<" in head
