"""The Neural Turing Machine's copy task (Graves et al., 2014, section 4.1): a random-length
sequence, a delimiter, then the sequence again (train.data.tasks.variable_copying). Trained at
length 16 (copies of 1..8 tokens), evaluated also at length 32 (copies of 1..16,
`data.eval_seq_len`): the paper's claim is that the NTM's learned write-shift-read program
carries to longer copies than it was trained on.

Sized for minutes on 2 CPU cores: one NTM layer (32 slots of width 16, one read and one write
head) without MLPs, d_model 32, vocab 10 (8 symbols, chance 1/8). Results and commands:
benchmarks/RESULTS.md.
"""
from configs.base import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                          TrainConfig)


def get_config(mixer: str = "ntm", **mixer_options) -> TrainConfig:
    options = {"memory_slots": 32, "memory_width": 16} if mixer == "ntm" else {}
    return TrainConfig(
        name=f"copy_{mixer}",
        model=ModelConfig(mixer=mixer, d_model=32, num_layers=1, mlp_ratio=0,
                          mixer_options={**options, **mixer_options}),
        data=DataConfig(task="variable_copying", batch_size=32, seq_len=16, eval_seq_len=32,
                        task_options={"vocab_size": 10}),
        optim=OptimConfig(steps=1000, learning_rate=3e-3, warmup_steps=100, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(log_every=100),
    )
