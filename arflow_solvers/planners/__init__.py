"""Planners: choose, per block, how many segments and iterations to spend."""

from .calibrated import CalibratedPlanner, Calibration, Candidate
from .metric import MetricPlanner, select_tough

__all__ = ["select_tough", "MetricPlanner", "CalibratedPlanner", "Calibration", "Candidate"]
