"""Typed training configurations: frozen dataclasses, named presets, command-line overrides."""
from configs.base import PRESETS, TrainConfig, from_args

__all__ = ["PRESETS", "TrainConfig", "from_args"]
