"""Recurrent Memory Transformer / HMT (memzoo/memories/rmt.py) on copying across segments.

Copying (train/data/tasks.py): 8 data tokens at [0, 8), blanks, the delimiter at 24 and the
8 answers at [24, 32). Segments of 8 tokens: the data fill segment 0 and the answers segment 3,
so the answer is 3 segments away from its source and attention, confined to a segment, cannot
see it. `rmt_copy_local` is the same model without memory (num_memory=0: segment-local
attention, chance 1/14); `rmt_copy` carries 8 memory tokens from segment to segment (gradients
through all 4 segments); `hmt_copy` adds HMT's recall of the last 4 segments' memories.
"""
from configs.base import DataConfig, LoggingConfig, ModelConfig, OptimConfig, TrainConfig

SEGMENT = 8


def get_config(kind: str = "rmt") -> TrainConfig:
    memory = {"rmt": {"segment_len": SEGMENT, "num_memory": 8},
              "hmt": {"segment_len": SEGMENT, "num_memory": 8, "hierarchical": True,
                      "recall_segments": 4, "summary_len": 1},
              "local": {"segment_len": SEGMENT, "num_memory": 0}}[kind]
    name = {"rmt": "rmt_copy", "hmt": "hmt_copy", "local": "rmt_copy_local"}[kind]
    return TrainConfig(
        name=name,
        model=ModelConfig(mixer="attention", d_model=64, num_layers=2,
                          mixer_options={"num_heads": 4}, recurrent_memory=memory),
        data=DataConfig(task="copying", batch_size=32, seq_len=4 * SEGMENT,
                        task_options={"vocab_size": 16, "num_tokens": SEGMENT}),
        optim=OptimConfig(steps=1000, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0),
        logging=LoggingConfig(log_every=100),
    )
