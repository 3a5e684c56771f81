"""Influence engine: per-pair gradients, curvature products, solvers and scores."""
