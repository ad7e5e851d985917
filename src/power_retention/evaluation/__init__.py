"""Evaluation: in-context learning curves and the weight-state FLOP ratio."""
