"""Deprecated: checkpoints moved to ringattn/run/checkpoint.py (a run directory's, read by
evals/ and hf/ too)."""

from ringattn import deprecation

__getattr__ = deprecation.moved(__name__, {"Checkpointer": "ringattn.run.checkpoint"})
