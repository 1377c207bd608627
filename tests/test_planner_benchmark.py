"""The planner benchmark runs end to end on its built-in models and reports every promise."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from planners import main  # noqa: E402


def test_the_planner_benchmark_reports_promise_fresh_error_floor_and_speed(tmp_path):
    out = tmp_path / "planners.json"
    result = main(["--tiny", "--calibration", "8", "--fresh", "12", "--rounds", "1", "--out", str(out)])
    assert out.exists() and len(result["models"]) == 2
    for model in result["models"]:
        rows = model["planners"]
        assert set(rows) == {"default", "calibrated", "calibrated_any_speed", "metric"}
        calibrated = rows["calibrated"]
        assert calibrated["validation_samples"] == 4 and calibrated["promised_max_error"] == 1e-4
        assert calibrated["promise_held_on_fresh"] == (
            (calibrated["fresh_error_judged"] <= 1e-4) if calibrated["promised"] else None)
        assert 0 < model["judged_samples"] <= 12
        assert all(row["best_seconds"] > 0 and row["fresh_error"] >= 0 for row in rows.values())
        assert model["floor_on_fresh"] is not None
        for row in rows.values():  # the tail study: filled where there are errors to study
            tail = row["tail"]
            assert tail == {} or (tail["subset"] == 4 and 0 <= tail["estimate_short_fraction"] <= 1
                                  and tail["largest_over_estimate_median"] > 0)
