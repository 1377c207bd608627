"""The command line plans a flow, checks the plan against serial and writes JSON; mistakes are one line."""

import json
import re

import pytest
import torch

from arflow_solvers import Plan
from arflow_solvers.__main__ import main
from toys import load_for_planning as toy_loader

LOADED = []


def recording_loader(path, batch, seed, device):
    """The toy loader, noting that it ran (`--model test_cli:recording_loader`)."""
    LOADED.append(path)
    return toy_loader(path, batch, seed, device)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "unused.pt"  # the toy loader ignores it, but it must exist
    path.touch()
    return path


def test_plan_command_writes_a_plan_that_plan_load_reads(tmp_path, checkpoint, capsys):
    out, report = tmp_path / "plan.json", tmp_path / "report.json"
    code = main(["plan", str(checkpoint), "--model", "toys:load_for_planning", "--batch", "4",
                 "--planner", "metric", "--segments", "5", "--out", str(out), "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "plan: " in printed and "IGM(Z)" in printed
    plan = Plan.load(out)
    data = json.loads(report.read_text())
    assert data["plan"] == str(plan)
    assert len(data["metrics"]) == 2
    assert data["check"]["max_abs_error"] < 1e-3


def test_calibrated_plan_command_keeps_the_calibration_in_its_json(tmp_path, checkpoint, capsys):
    report = tmp_path / "report.json"
    code = main(["plan", str(checkpoint), "--model", "toys:load_for_planning", "--batch", "4",
                 "--planner", "calibrated", "--max-error", "1e-3", "--min-speed", "none", "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "expected speedup" in printed and "held-out samples" in printed and "not a bound" in printed
    assert "max error 0.001: promised" in printed or "NOT promised (see the note)" in printed
    calibration = json.loads(report.read_text())["calibration"]
    assert calibration["end_to_end_error"] <= 1e-3 and calibration["rounds"] >= 1
    assert all(len(block["candidates"]) >= 2 for block in calibration["blocks"])


def test_model_kinds_come_from_the_installed_entry_points():
    from arflow_solvers.__main__ import loaders

    assert loaders()["nflows"] == "arflow_solvers.adapters.nflows:load_for_planning"
    assert loaders()["tarflow"] == "arflow_solvers.adapters.tarflow:load_for_planning"


def _files(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, whole)
    (tmp_path / "truncated.pt").write_bytes(whole.read_bytes()[:200])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"config": {"img_size": 28}, "state_dict": {"blocks.0.proj.weight": torch.zeros(2)}},
               tmp_path / "tarflow.pt")


MISTAKES = {  # arguments after `plan` -> what the one-line error says
    "missing checkpoint": (["missing.pt", "--model", "nflows"], r"checkpoint \S*missing.pt does not exist"),
    "truncated file": (["truncated.pt", "--model", "nflows"],
                       r"cannot load \S*truncated.pt with --model nflows: .*not a readable torch checkpoint"),
    "garbage file": (["garbage.pt", "--model", "tarflow"],
                     r"cannot load \S*garbage.pt with --model tarflow: .*not a readable torch checkpoint"),
    "TarFlow file as nflows": (["tarflow.pt", "--model", "nflows"], r"tarflow.pt is not an nflows MAF.*--model tarflow"),
    "unknown model kind": (["whole.pt", "--model", "maf"], r"--model must be one of \[.*'nflows'"),
    "unimportable model": (["whole.pt", "--model", "no_such_module:load"], r"--model no_such_module:load: cannot import"),
    "bad device": (["whole.pt", "--model", "test_cli:recording_loader", "--device", "nosuchdevice"],
                   r"--device nosuchdevice is not usable here"),
    "absent device": (["whole.pt", "--model", "test_cli:recording_loader", "--device", "cuda:99"],
                      r"--device cuda:99 is not usable here"),
    "--out in a missing folder": (["whole.pt", "--model", "test_cli:recording_loader", "--out", "nowhere/plan.json"],
                                  r"--out \S*plan.json: folder \S*nowhere does not exist"),
    "--json in a missing folder": (["whole.pt", "--model", "test_cli:recording_loader", "--json", "nowhere/r.json"],
                                   r"--json \S*r.json: folder \S*nowhere does not exist"),
    "--trust-pickle for a loader without it": (["whole.pt", "--model", "test_cli:recording_loader", "--trust-pickle"],
                                               r"--trust-pickle: the loader of --model \S+ has no trust_pickle"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_in_the_command_is_one_line_with_status_2_before_any_work(tmp_path, monkeypatch, capsys, mistake):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    LOADED.clear()
    arguments, message = MISTAKES[mistake]
    assert main(["plan", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("arflow-solvers plan: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert LOADED == []  # nothing was loaded, let alone planned


def test_a_pickled_checkpoint_is_refused_unless_trust_pickle_is_given(tmp_path, capsys):
    from arflow_solvers.adapters.nflows import build_maf, load_for_planning

    path = tmp_path / "flow.pt"
    torch.save(build_maf(4, 8, 1, 1), path)  # a whole Flow: unpickling it runs code
    assert main(["plan", str(path), "--model", "nflows", "--planner", "metric", "--batch", "2"]) == 2
    assert "pass trust_pickle=True (arflow-solvers plan --trust-pickle)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pickled"):
        load_for_planning(str(path), 2, 0, "cpu")
    assert main(["plan", str(path), "--model", "nflows", "--planner", "metric", "--batch", "2", "--trust-pickle"]) == 0


def test_a_batch_below_one_is_refused_by_the_parser(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(checkpoint), "--model", "toys:load_for_planning", "--batch", "0"])
    assert exit_.value.code == 2 and "--batch: must be an int >= 1; got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(checkpoint), "--model", "toys:load_for_planning", "--min-speed", "fast"])
    assert exit_.value.code == 2 and "--min-speed: must be a number > 0 or 'none'; got 'fast'" in capsys.readouterr().err


def test_a_plan_that_cannot_be_made_is_one_line_with_status_1(checkpoint, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise ValueError("z has 9 positions;\nthe flow expects T=10")

    monkeypatch.setattr("arflow_solvers.__main__.trace", refuse)
    assert main(["plan", str(checkpoint), "--model", "toys:load_for_planning", "--batch", "2"]) == 1
    err = capsys.readouterr().err
    assert err == f"arflow-solvers plan: error: planning {checkpoint} failed: ValueError: z has 9 positions; the flow expects T=10\n"
