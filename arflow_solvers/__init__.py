"""Fast sampling of autoregressive normalizing flows by Jacobi and GS-Jacobi iteration."""

from . import divergence, init
from .divergence import DivergencePolicy, FallBack, GiveUp
from .flow import Flow, Permute
from .metrics import crm, flow_metrics, igm, iterations_to_tolerance
from .newton import Newton
from .plan import Plan
from .planners import CalibratedPlanner, MetricPlanner
from .protocol import AffineARBlock, CachedARBlock, CausalMapBlock, HasOutputProjection
from .solution import BlockStats, Solution, SolveError, Status
from ._sweep import NotCausalError
from .solve import solve, solve_inverse
from .solvers import GSJacobi, Jacobi, Serial, Solver, segment_bounds
from .stopping import StoppingRule

__all__ = [
    "AffineARBlock",
    "BlockStats",
    "CalibratedPlanner",
    "CachedARBlock",
    "CausalMapBlock",
    "DivergencePolicy",
    "FallBack",
    "Flow",
    "GSJacobi",
    "GiveUp",
    "HasOutputProjection",
    "Jacobi",
    "MetricPlanner",
    "Newton",
    "NotCausalError",
    "Permute",
    "Plan",
    "Serial",
    "Solution",
    "SolveError",
    "Solver",
    "Status",
    "StoppingRule",
    "crm",
    "divergence",
    "flow_metrics",
    "igm",
    "init",
    "iterations_to_tolerance",
    "segment_bounds",
    "solve",
    "solve_inverse",
]

__version__ = "0.1.0"
