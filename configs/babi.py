"""bAbI-like stories (train.data.tasks.babi, generated offline): 4-token facts "entity moved-to
location ." / "entity picked-up object .", questions among them. The two-supporting-facts
variant (hops=2, "where is object ?": the last picker's last move) is End-to-End Memory
Networks' case for several hops (Sukhbaatar et al., 2015): memn2n with 1 hop against 3 hops, and
attention as a baseline.

Sized for minutes on 2 CPU cores: length 64 (16 sentences), one memn2n layer without MLPs
(sentences of 4, memory of the 16 most recent), d_model 64; 4 entities, 6 locations, 4 objects
(chance 1/6). Results and commands: benchmarks/RESULTS.md.
"""
from configs.base import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                          TrainConfig)


def get_config(mixer: str = "memn2n", num_hops: int = 3, hops: int = 2) -> TrainConfig:
    if mixer == "memn2n":
        name, layers = f"babi{hops}_memn2n_{num_hops}hop", 1
        options = {"sentence_len": 4, "num_hops": num_hops, "memory_size": 16}
    else:
        name, layers, options = f"babi{hops}_{mixer}", 2, {"num_heads": 4}
    return TrainConfig(
        name=name,
        model=ModelConfig(mixer=mixer, d_model=64, num_layers=layers, mlp_ratio=0,
                          mixer_options=options),
        data=DataConfig(task="babi", batch_size=32, seq_len=64, task_options={"hops": hops}),
        optim=OptimConfig(steps=1000, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(log_every=100),
    )
