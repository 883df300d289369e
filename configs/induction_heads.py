"""Induction heads (Mamba, section 4.1.2): a trigger token, the token after it, and the trigger
again at the end: predict the token that followed it. Trained at length 64 and evaluated also at
256 (`data.eval_seq_len`): Mamba's claim is that a selective SSM extrapolates in length where
attention with positional encodings does not.

Sized for a few minutes on 2 CPU cores: vocab 16 (chance 1/15), 2 Mamba layers without MLPs,
d_model 64. Results and commands: benchmarks/RESULTS.md.
"""
from configs.base import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                          TrainConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="induction_heads_mamba",
        model=ModelConfig(mixer="mamba", d_model=64, num_layers=2, mlp_ratio=0,
                          mixer_options={"state_size": 16}),
        data=DataConfig(task="induction_heads", batch_size=32, seq_len=64, eval_seq_len=256,
                        task_options={"vocab_size": 16}),
        optim=OptimConfig(steps=800, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(log_every=100),
    )
