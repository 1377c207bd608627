"""The docs cannot rot: their code runs, every public name has a docstring, the site builds."""

import importlib
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE_PAGES = ["getting-started.md", "howto/custom-block.md", "howto/reading-a-solution.md"]
PUBLIC_MODULES = ["arflow_solvers", "arflow_solvers.metrics", "arflow_solvers.planners",
                  "arflow_solvers.init", "arflow_solvers.plot", "arflow_solvers.adapters.made", "arflow_solvers.adapters.nflows",
                  "arflow_solvers.adapters.tarflow"]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_every_code_block_on_the_page_runs(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python code block"
    namespace: dict = {"__name__": "docs"}
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), namespace)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
            missing.append(name)
    assert not missing, f"{module_name}: no docstring for {missing}"


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).with_name("mkdocs"))
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
