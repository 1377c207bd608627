"""The command line plans a flow, checks the plan against serial and writes JSON."""

import json

from arflow_solvers import Plan
from arflow_solvers.__main__ import main


def test_plan_command_writes_a_plan_that_plan_load_reads(tmp_path, capsys):
    out, report = tmp_path / "plan.json", tmp_path / "report.json"
    code = main(["plan", "unused.pt", "--model", "toys:load_for_planning", "--batch", "4",
                 "--planner", "metric", "--segments", "5", "--out", str(out), "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "plan: " in printed and "IGM(Z)" in printed
    plan = Plan.load(out)
    data = json.loads(report.read_text())
    assert data["plan"] == str(plan)
    assert len(data["metrics"]) == 2
    assert data["check"]["max_abs_error"] < 1e-3


def test_calibrated_plan_command_keeps_the_calibration_in_its_json(tmp_path, capsys):
    report = tmp_path / "report.json"
    code = main(["plan", "unused.pt", "--model", "toys:load_for_planning", "--batch", "4",
                 "--planner", "calibrated", "--max-error", "1e-3", "--json", str(report)])
    assert code == 0
    assert "expected speedup" in capsys.readouterr().out
    calibration = json.loads(report.read_text())["calibration"]
    assert calibration["end_to_end_error"] <= 1e-3 and calibration["rounds"] >= 1
    assert all(len(block["candidates"]) >= 2 for block in calibration["blocks"])


def test_model_kinds_come_from_the_installed_entry_points():
    from arflow_solvers.__main__ import loaders

    assert loaders()["nflows"] == "arflow_solvers.adapters.nflows:load_for_planning"
    assert loaders()["tarflow"] == "arflow_solvers.adapters.tarflow:load_for_planning"
