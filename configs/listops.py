"""ListOps (Long Range Arena's generated task, train/data/tasks.py): a nested MAX/MIN/MED/SM
expression over digits, classified by its value (10 classes). S4's LRA headline (S4D: ~60%
against ~36% for a Transformer at length 2,000) comes from a state-space layer that carries the
whole expression; here at CPU scale.

Sized for minutes on 2 CPU cores (about 20 under load): length 256 (trees of 65-256 tokens,
LRA's 1/4 ratio; LRA uses up to 2,000), depth <= 10, up to 10 arguments, 4 layers at d_model
64, 600 steps, mean pooling over the real tokens (SequenceClassifier). Both mixers are causal (LRA's S4 runs bidirectionally).
Results and commands: benchmarks/RESULTS.md.
"""
from configs.base import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                          TrainConfig)

MIXER_OPTIONS = {"s4d": {"state_size": 64}, "attention": {"num_heads": 4}}


def get_config(mixer: str = "s4d") -> TrainConfig:
    if mixer not in MIXER_OPTIONS:
        raise ValueError(f"configs/listops.py: mixer must be one of {tuple(MIXER_OPTIONS)}, "
                         f"got {mixer!r}")
    return TrainConfig(
        name=f"listops_{mixer}",
        model=ModelConfig(mixer=mixer, d_model=64, num_layers=4, mlp_ratio=2,
                          mixer_options=MIXER_OPTIONS[mixer], pooling="mean"),
        data=DataConfig(task="listops", batch_size=32, seq_len=256, eval_batches=8,
                        task_options={}),
        optim=OptimConfig(steps=600, learning_rate=2e-3, warmup_steps=50, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(log_every=100),
    )
