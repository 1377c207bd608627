"""Adapters: one module per flow family, each exposing its blocks to the arflow-solvers core."""
