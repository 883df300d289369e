"""Synthetic memory tasks: they live in `train.data.tasks` now; this name keeps old imports working."""
from train.data.tasks import delayed_recall

__all__ = ["delayed_recall"]
