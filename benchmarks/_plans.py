"""The plans the benchmark scripts take on their command lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arflow_solvers import GSJacobi, Jacobi, Plan, Serial  # noqa: E402
from arflow_solvers import init as inits  # noqa: E402

__all__ = ["parse_plan"]

_INITS = {"z": inits.noise, "noise": inits.noise, "z0": inits.zeros_first_exact,
          "zeros_first_exact": inits.zeros_first_exact}


def parse_plan(text: str, num_blocks: int, tol: float = 1e-5) -> Any:
    """`serial`, `jacobi`, `gs<M>`, the paper's `[Stack-GS-J-Else]` notation, or a saved plan.

    Optional suffixes: `@TOL` sets the tolerance of this plan (default `tol`), `:z0` /
    `:z` the initial guess (zeros with exact first position / the noise, default the noise),
    e.g. `[0-196-1-*]@1e-3:z0` (the notation's own suffixes, see `Plan`). `file:PATH`, or
    the path of an existing `.json` file, loads a plan saved by `Plan.save` or the `--json` file of
    `arflow-solvers plan` (its `plan_spec`).
    """
    path = Path(text[5:] if text.startswith("file:") else text)
    if text.startswith("file:") or (text.endswith(".json") and path.is_file()):
        data = json.loads(path.read_text())
        return Plan.from_dict(data.get("plan_spec", data))
    if text.startswith("["):
        return Plan.parse(text, num_blocks=num_blocks, tol=tol)
    init = inits.noise
    if ":" in text:
        text, _, name = text.rpartition(":")
        if name not in _INITS:
            raise ValueError(f"init suffix must be one of {sorted(_INITS)}; got {name!r}")
        init = _INITS[name]
    if "@" in text:
        text, _, tol_text = text.partition("@")
        tol = float(tol_text)
    if text == "serial":
        return Serial()
    if text == "jacobi":
        return Jacobi(tol=tol, init=init)
    if text.startswith("gs"):
        return GSJacobi(segments=int(text[2:]), tol=tol, init=init)
    raise ValueError(f"unknown plan {text!r}: expected serial, jacobi, gs<M>, [notation] or a file")
