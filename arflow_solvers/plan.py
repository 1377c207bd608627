"""Plans: which solver inverts which block, in the paper's `[Stack-GS-J-Else]` notation."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from . import init as inits
from .divergence import POLICIES
from .newton import Newton
from .solvers import GSJacobi, Jacobi, Serial, Solver

__all__ = ["Plan", "as_plan"]

_NUMBERS = r"\d+(?:/\d+)*"
_CAPS = r"(?:\d+|\*)(?:/(?:\d+|\*))*"
_PAPER = re.compile(
    rf"^\[(?:(?P<stack>{_NUMBERS})-(?P<gs>{_NUMBERS})-(?P<j>{_CAPS})-)?(?P<rest>\d+|\*)\]"
    r"(?:@(?P<tol>[0-9.]+(?:[eE][-+]?\d+)?))?(?::(?P<init>zeros_first_exact|noise|z0|z))?$"
)
# Initial guesses the notation can name: `:z0` / `:z` (the paper's Z0 and Z) or their names.
_INIT_SUFFIX = {"z": inits.noise, "noise": inits.noise, "z0": inits.zeros_first_exact,
                "zeros_first_exact": inits.zeros_first_exact}


def _cap(text: str) -> int | None:
    return None if text == "*" else int(text)


def _cap_text(cap: int | None) -> str:
    return "*" if cap is None else str(cap)


# The notation writes caps, segments, the tolerance and the initial guess; any other option
# must have its default value, or the plan prints as Python.
_WRITTEN = ("segments", "max_iters", "tol", "init")


def _unwritten(solver: Solver) -> dict[str, Any]:
    return {name: value for name, value in solver.options().items() if name not in _WRITTEN}


def _shared_or_each(entries: list[str]) -> str:
    """`8` when every tough block has 8 (the paper's `[0/6-8-32-20]`), else `8/16`."""
    return entries[0] if len(set(entries)) == 1 else "/".join(entries)


@dataclass(frozen=True)
class Plan:
    """Which solver inverts each block: a default plus per-block overrides.

    Blocks are numbered in sampling order (the order the solver visits them; see
    [`Flow`][arflow_solvers.Flow]).

    The paper writes plans as `[Stack-GS-J-Else]`: `[6-8-32-10]` gives block 6 eight equal
    GS-Jacobi segments of at most 32 iterations each and every other block Jacobi capped at
    10; `[0/7-16/8-10/13-6]` does the same for blocks 0 and 7 with 16 and 8 segments, caps
    10 and 13, and caps the rest at 6. `[10]` is Jacobi capped at 10 everywhere. Our
    extensions: `*` for a cap means the exactness bound (`max_iters=None`); a suffix `@TOL`
    sets the tolerance (default `1e-5`; `@0` iterates to the fixed point) and `:z0` the
    paper's Z0 initial guess (`zeros_first_exact`; `:z` is the noise, the default), e.g.
    `[0-8-*-10]@1e-6:z0`. All solvers of a parsed plan share `tol`, `atol` and `init`; a plan
    the notation cannot express prints as Python.

    Arguments:
        default: the solver of every block without an override.
        overrides: block index to solver.

    References:
        Accelerate TarFlow Sampling with GS-Jacobi Iteration (Liu & Qin, 2025),
        https://arxiv.org/abs/2505.12849

    Examples:
        >>> plan = Plan.parse("[0/7-16/8-10/13-6]", num_blocks=8)
        >>> plan.solver_for(7)
        GSJacobi(segments=8, max_iters=13)
        >>> str(plan)
        '[0/7-16/8-10/13-6]'
    """

    default: Solver
    overrides: Mapping[int, Solver] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.default, Solver):
            raise TypeError(f"default must be a Solver; got {type(self.default).__name__}")
        overrides = dict(sorted(self.overrides.items()))
        for index, solver in overrides.items():
            if not isinstance(index, int) or index < 0:
                raise ValueError(f"override keys must be block indices >= 0; got {index!r}")
            if not isinstance(solver, Solver):
                raise TypeError(f"overrides[{index}] must be a Solver; got {type(solver).__name__}")
        object.__setattr__(self, "overrides", overrides)

    def solver_for(self, index: int) -> Solver:
        """The solver of block `index` (sampling order)."""
        return self.overrides.get(index, self.default)

    def check(self, num_blocks: int) -> None:
        """Raise `ValueError` if an override names a block the flow does not have."""
        missing = [i for i in self.overrides if i >= num_blocks]
        if missing:
            raise ValueError(
                f"plan overrides blocks {missing} but the flow has {num_blocks} blocks (0..{num_blocks - 1})"
            )

    @classmethod
    def parse(
        cls,
        text: str,
        num_blocks: int | None = None,
        *,
        tol: float = 1e-5,
        atol: float = 0.0,
        init: inits.Init = inits.noise,
        numbering: str = "sampling",
    ) -> "Plan":
        """Read the paper's `[Stack-GS-J-Else]` notation (see the class docstring).

        Arguments:
            text: e.g. `"[6-8-32-10]"`, `"[0/7-16/8-10/13-6]"` or `"[10]"`.
            num_blocks: if given, stack indices must be below it.
            tol: relative tolerance of every solver of the plan.
            atol: absolute tolerance of every solver of the plan.
            init: initial guess of every solver of the plan.
            numbering: `"sampling"` (ours: block 0 is the first block applied to the noise)
                or `"paper"`: the paper's and its code's numbering, the model's own (density)
                order, in which its block `k` is our block `num_blocks - 1 - k` (needs
                `num_blocks`). Its published Img128cond plan `[6-8-32-10]` segments our
                block 1.

        Examples:
            >>> Plan.parse("[6-8-32-10]", 8, numbering="paper").overrides.keys()
            dict_keys([1])
        """
        if numbering not in ("sampling", "paper"):
            raise ValueError(f"numbering must be 'sampling' or 'paper'; got {numbering!r}")
        if numbering == "paper" and num_blocks is None:
            raise ValueError("numbering='paper' needs num_blocks to map the paper's block indices")
        if not isinstance(text, str):
            raise TypeError(f"plan text must be a str; got {type(text).__name__}")
        match = _PAPER.match(text.strip())
        if match is None:
            raise ValueError(
                f"cannot parse plan {text!r}: expected '[Stack-GS-J-Else]' such as "
                "'[6-8-32-10]' or '[0/7-16/8-10/13-6]', or '[Else]' such as '[10]'"
            )
        if match["tol"] is not None:
            tol = float(match["tol"])
        if match["init"] is not None:
            init = _INIT_SUFFIX[match["init"]]
        options = {"tol": tol, "atol": atol, "init": init}
        default = Jacobi(max_iters=_cap(match["rest"]), **options)
        overrides: dict[int, Solver] = {}
        if match["stack"] is not None:
            stack = [int(n) for n in match["stack"].split("/")]
            segments = [int(n) for n in match["gs"].split("/")]
            caps = [_cap(n) for n in match["j"].split("/")]
            # One GS or J entry is shared by every stacked block, as in the paper's
            # "[0/6-8-32-20]".
            segments = segments * len(stack) if len(segments) == 1 else segments
            caps = caps * len(stack) if len(caps) == 1 else caps
            if not len(stack) == len(segments) == len(caps):
                raise ValueError(
                    f"plan {text!r}: GS and J need one entry per tough block, or one shared "
                    f"entry; got {len(stack)} blocks, {len(segments)} and {len(caps)} entries"
                )
            if len(set(stack)) != len(stack):
                raise ValueError(f"plan {text!r}: a block appears twice in Stack")
            if min(segments) < 1:
                raise ValueError(f"plan {text!r}: GS segment counts must be >= 1")
            if num_blocks is not None and max(stack) >= num_blocks:
                raise ValueError(
                    f"plan {text!r}: block {max(stack)} does not exist (num_blocks={num_blocks})"
                )
            for index, count, cap in zip(stack, segments, caps):
                ours = num_blocks - 1 - index if numbering == "paper" else index
                overrides[ours] = GSJacobi(count, max_iters=cap, **options)
        return cls(default, overrides)

    def __str__(self) -> str:
        notation = self._notation()
        return notation if notation is not None else repr(self)

    def _notation(self) -> str | None:
        default = self.default
        if type(default) is not Jacobi or _unwritten(default):
            return None
        suffix = "" if "tol" not in default.options() else f"@{default.tol:g}"
        if default.init is inits.zeros_first_exact:
            suffix += ":z0"
        elif default.init is not inits.noise:
            return None
        tough = []
        for index, solver in self.overrides.items():
            if type(solver) is not GSJacobi or not isinstance(solver.segments, int):
                return None
            if (solver.tol, solver.init) != (default.tol, default.init) or _unwritten(solver):
                return None
            tough.append((index, solver.segments, solver.max_iters))
        rest = _cap_text(default.max_iters)
        if not tough:
            return f"[{rest}]{suffix}"
        columns = [
            "/".join(str(i) for i, _, _ in tough),
            _shared_or_each([str(m) for _, m, _ in tough]),
            _shared_or_each([_cap_text(c) for _, _, c in tough]),
        ]
        return "[" + "-".join(columns) + f"-{rest}]{suffix}"

    def __repr__(self) -> str:
        if not self.overrides:
            return f"Plan({self.default!r})"
        return f"Plan({self.default!r}, {dict(self.overrides)!r})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (inits are stored by name: `noise`, `zeros`, ...)."""
        return {
            "default": _solver_to_dict(self.default),
            "overrides": {str(i): _solver_to_dict(s) for i, s in self.overrides.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Inverse of [`to_dict`][arflow_solvers.Plan.to_dict]; unknown keys are refused."""
        if not isinstance(data, Mapping) or "default" not in data:
            raise ValueError(f"not a plan description (no 'default' solver): {data!r:.200}")
        extra = set(data) - {"default", "overrides"}
        if extra:
            raise ValueError(f"unknown keys {sorted(extra)} in a plan description; "
                             "expected 'default' and 'overrides'")
        overrides = data.get("overrides", {})
        if not isinstance(overrides, Mapping):
            raise ValueError(f"plan 'overrides' must map block indices to solvers; got {overrides!r:.200}")
        try:
            solvers = {int(i): _solver_from_dict(s) for i, s in overrides.items()}
        except ValueError as error:
            raise ValueError(f"plan overrides: {error}") from error
        return cls(_solver_from_dict(data["default"]), solvers)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (every option of every solver)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan written by [`save`][arflow_solvers.Plan.save]; errors name the file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read a plan from {path}: {error}") from error
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a valid plan: {error}") from error


_SOLVERS = {"Serial": Serial, "Jacobi": Jacobi, "GSJacobi": GSJacobi, "Newton": Newton}
_INITS = {"noise": inits.noise, "zeros": inits.zeros, "zeros_first_exact": inits.zeros_first_exact}


def _encode(name: str, value: Any) -> Any:
    """One solver option as JSON."""
    if name == "init":
        init_name = getattr(value, "__name__", None)
        if _INITS.get(init_name) is not value:
            raise ValueError(f"cannot save a plan whose init {value!r} is not one of {sorted(_INITS)}")
        return init_name
    if name == "on_divergence" and not isinstance(value, str):
        policy_name = getattr(value, "name", None)
        if POLICIES.get(policy_name) != value:
            raise ValueError(f"cannot save a plan whose on_divergence {value!r} is not one of {sorted(POLICIES)}")
        return policy_name
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _decode(name: str, value: Any) -> Any:
    """Inverse of `_encode`."""
    if name == "init":
        if value not in _INITS:
            raise ValueError(f"unknown init {value!r}; expected one of {sorted(_INITS)}")
        return _INITS[value]
    if name == "update_dtype" and value is not None:
        return _dtype(value)
    if name == "segments" and isinstance(value, list):
        return tuple(value)
    return value


def _solver_to_dict(solver: Solver) -> dict[str, Any]:
    data: dict[str, Any] = {"type": type(solver).__name__}
    for f in dataclasses.fields(solver):
        data[f.name] = _encode(f.name, getattr(solver, f.name))
    return data


def _solver_from_dict(data: Any) -> Solver:
    if not isinstance(data, Mapping) or "type" not in data:
        raise ValueError(f"a solver description must be an object with a 'type'; got {data!r:.200}")
    kind = _SOLVERS.get(data["type"])
    if kind is None:
        raise ValueError(f"unknown solver type {data['type']!r}; expected one of {sorted(_SOLVERS)}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(data) - known - {"type"}
    if unknown:
        raise ValueError(f"unknown {data['type']} options {sorted(unknown)}; expected some of {sorted(known)}")
    options = {name: _decode(name, value) for name, value in data.items() if name != "type"}
    try:
        return kind(**options)
    except TypeError as error:
        raise ValueError(f"invalid {data['type']} options: {error}") from error


def _dtype(name: str) -> torch.dtype:
    """`"torch.float32"` (or `"float32"`) as the dtype."""
    dtype = getattr(torch, str(name).rpartition(".")[2], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown update_dtype {name!r} in the plan")
    return dtype


PlanLike = Union[Plan, Solver, str]


def as_plan(plan: PlanLike, num_blocks: int | None = None) -> Plan:
    """A `Plan` from a plan, a single solver (used for every block) or paper notation."""
    if isinstance(plan, Plan):
        result = plan
    elif isinstance(plan, Solver):
        result = Plan(plan)
    elif isinstance(plan, str):
        result = Plan.parse(plan, num_blocks)
    else:
        raise TypeError(
            f"plan must be a Plan, a solver (Serial(), Jacobi(), GSJacobi(...)) or a string in "
            f"the paper's notation; got {type(plan).__name__}"
        )
    if num_blocks is not None:
        result.check(num_blocks)
    return result
