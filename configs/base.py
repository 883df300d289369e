"""`TrainConfig` and its presets. Values are validated when the config is built, so a bad value
fails with a message naming it before anything is compiled."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model
    mixer: str = "s4d"              # a name or a repeating pattern of names from memzoo.MIXERS
    d_model: int = 64
    num_layers: int = 2
    state_size: int = 32
    # task: delayed recall, target_t = token_{t - delay} (a memory of the last `delay` tokens)
    vocab_size: int = 16
    seq_len: int = 64
    delay: int = 4
    # optimisation
    batch_size: int = 32
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_batches: int = 4
    log_every: int = 25

    def __post_init__(self):
        positive = ["d_model", "num_layers", "state_size", "vocab_size", "seq_len", "delay",
                    "batch_size", "steps", "eval_batches", "log_every"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: `{name}` must be a positive integer, got {value!r}")
        if self.delay >= self.seq_len:
            raise ValueError(f"TrainConfig: `delay` ({self.delay}) must be smaller than "
                             f"`seq_len` ({self.seq_len})")
        if self.vocab_size < 2:
            raise ValueError(f"TrainConfig: `vocab_size` must be at least 2, got {self.vocab_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig: `learning_rate` must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("TrainConfig: `warmup_steps` and `weight_decay` must be >= 0 and "
                             "`grad_clip` > 0")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, TrainConfig] = {
    "delayed_recall_s4d": TrainConfig(),
    "delayed_recall_s5": TrainConfig(mixer="s5"),
    "delayed_recall_hybrid": TrainConfig(mixer="s4d,s5", num_layers=2),
    "smoke": TrainConfig(d_model=16, num_layers=1, state_size=8, seq_len=16, steps=4,
                         batch_size=4, eval_batches=1, log_every=2, warmup_steps=1),
}


def from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """`--preset NAME` then `--field value` overrides, typed from the dataclass."""
    parser = argparse.ArgumentParser(prog="python -m train", description=(
        "Train a memzoo model on the delayed-recall memory task (synthetic, offline)."))
    parser.add_argument("--preset", default="delayed_recall_s4d", choices=sorted(PRESETS))
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=None,
                            help=f"(default from preset; TrainConfig default {field.default!r})")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    try:
        return PRESETS[args.preset].replace(**overrides)
    except ValueError as err:
        parser.error(str(err))
