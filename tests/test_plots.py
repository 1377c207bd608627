"""Plots: every figure the paper draws can be written as PNG or SVG from a solve's statistics."""

import xml.etree.ElementTree as ElementTree

import pytest
import torch

pytest.importorskip("matplotlib")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from arflow_solvers import Flow, GSJacobi, solve  # noqa: E402
from arflow_solvers.metrics import BlockMetrics  # noqa: E402
from arflow_solvers.plot import metric_bars, residual_curves, speed_error_frontier  # noqa: E402
from toys import CausalMLP  # noqa: E402

METRICS = [BlockMetrics(index=0, igm_noise=1.0, igm_zeros_first_exact=2.5, crm=40.0,
                        iterations_mean=7.5, iterations_max=9),
           BlockMetrics(index=1, igm_noise=0.5, igm_zeros_first_exact=0.7, crm=None,
                        iterations_mean=3.0, iterations_max=4)]
RESULTS = {"J-10": {"speedup_vs_serial": 3.0, "max_abs_error": 1e-3},
           "exact": {"speedup_vs_serial": 1.5, "max_abs_error": 0.0}}


@pytest.fixture(scope="module")
def solution():
    z = torch.randn(4, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return solve(Flow([CausalMLP(6, 2, seed=1), CausalMLP(6, 2, seed=2)]), z, GSJacobi(2, tol=1e-8))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plots_are_written_in_the_format_of_the_suffix(tmp_path, suffix, solution):
    figures = {
        "residuals": lambda path: residual_curves(solution, path),
        "metrics": lambda path: metric_bars(METRICS, path),
        "frontier": lambda path: speed_error_frontier(RESULTS, path),
    }
    for name, draw in figures.items():
        path = tmp_path / f"{name}.{suffix}"
        figure = draw(path)
        assert figure.axes and path.stat().st_size > 0
        head = path.read_bytes()[:5]
        assert head.startswith(b"\x89PNG") if suffix == "png" else b"<" in head
        if suffix == "png":  # decodes, and is not a blank canvas
            pixels = matplotlib.image.imread(path)
            assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
            rgb = (pixels[..., :3] * 255).round().astype(np.uint32)
            colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
            assert colours.size > 10, f"{name}.png is (nearly) one colour"
            assert (rgb < 128).all(-1).mean() > 0.001, f"{name}.png has no dark ink (axes, text)"
        else:  # well-formed SVG with drawn paths
            root = ElementTree.parse(path).getroot()
            assert root.tag.endswith("svg")
            assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 10


def test_residual_curves_draw_one_median_curve_per_block_on_a_log_axis(solution):
    (ax,) = residual_curves(solution).axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["block 0", "block 1"]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "Jacobi iteration" and "median" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["block 0", "block 1"]
    for line, block in zip(lines, solution.blocks):
        expected = torch.cat([r.nanmedian(dim=1).values for r in block.residuals if r.numel()])
        x, y = line.get_data()
        assert list(x) == list(range(1, len(expected) + 1))  # segments one after another
        torch.testing.assert_close(torch.as_tensor(y, dtype=torch.float64), expected.clamp_min(1e-30))


def test_metric_bars_draw_both_igms_and_the_crm_per_block():
    left, right = metric_bars(METRICS).axes
    assert left.get_title() == "IGM" and right.get_title() == "CRM"
    assert left.get_xlabel() == right.get_xlabel() == "block (sampling order)"
    noise_bars, z0_bars = left.containers
    assert [b.get_height() for b in noise_bars] == [1.0, 0.5]
    assert [b.get_height() for b in z0_bars] == [2.5, 0.7]
    centres = [b.get_x() + b.get_width() / 2 for b in noise_bars], [b.get_x() + b.get_width() / 2 for b in z0_bars]
    assert centres[0] == pytest.approx([-0.2, 0.8]) and centres[1] == pytest.approx([0.2, 1.2])
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["X0 = Z", "X0 = Z0"]
    (crm_bars,) = right.containers
    assert [b.get_height() for b in crm_bars] == [40.0, 0.0]  # a block without a CRM draws no bar


def test_speed_error_frontier_places_one_labelled_point_per_plan():
    (ax,) = speed_error_frontier(RESULTS).axes
    points = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert points == [pytest.approx((1e-3, 3.0)), pytest.approx((1e-16, 1.5))]  # error 0 drawn at 1e-16
    assert [t.get_text() for t in ax.texts] == ["J-10", "exact"]
    assert [t.xy for t in ax.texts] == [pytest.approx((1e-3, 3.0)), pytest.approx((1e-16, 1.5))]
    assert ax.get_xscale() == "log"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("max abs error", "speedup vs serial")


def test_plotting_leaves_pyplot_and_the_backend_as_they_were(solution, tmp_path):
    import matplotlib

    backend, open_before = matplotlib.get_backend(), plt.get_fignums()
    for _ in range(3):
        residual_curves(solution, tmp_path / "r.png")
        metric_bars(METRICS)
        speed_error_frontier(RESULTS)
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == open_before
