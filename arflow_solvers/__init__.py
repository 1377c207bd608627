"""Fast sampling of autoregressive normalizing flows by Jacobi and GS-Jacobi iteration."""

from . import init
from .flow import Flow, Permute
from .plan import Plan
from .protocol import AffineARBlock, CachedARBlock, CausalMapBlock, HasOutputProjection
from .solution import BlockStats, Solution, SolveError, Status
from .solve import solve, solve_inverse
from .solvers import GSJacobi, Jacobi, Serial, Solver, segment_bounds

__all__ = [
    "AffineARBlock",
    "BlockStats",
    "CachedARBlock",
    "CausalMapBlock",
    "Flow",
    "GSJacobi",
    "HasOutputProjection",
    "Jacobi",
    "Permute",
    "Plan",
    "Serial",
    "Solution",
    "SolveError",
    "Solver",
    "Status",
    "init",
    "segment_bounds",
    "solve",
    "solve_inverse",
]

__version__ = "0.1.0"
