"""Selective copying (Mamba, section 4.1.1): data tokens at random positions among blanks, to be
reproduced in order after a delimiter. A time-invariant SSM (S4D) cannot know where the data
stood; a selective one (Mamba) decides per token what enters its state.

Sized for a few minutes on 2 CPU cores: length 64, 8 data tokens, vocab 16 (14 data symbols,
chance 1/14), 2 Mamba layers without MLPs (the Mamba architecture), d_model 64.
Results and commands: benchmarks/RESULTS.md.
"""
from configs.base import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                          TrainConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="selective_copying_mamba",
        model=ModelConfig(mixer="mamba", d_model=64, num_layers=2, mlp_ratio=0,
                          mixer_options={"state_size": 16}),
        data=DataConfig(task="selective_copying", batch_size=32, seq_len=64,
                        task_options={"vocab_size": 16, "num_tokens": 8}),
        optim=OptimConfig(steps=800, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(log_every=100),
    )
