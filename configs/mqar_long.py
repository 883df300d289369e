"""MQAR at the issue's larger setting: length 256, 32 key-value pairs (zoology's Figure 2 data).

Held-out data is zoology's MQAR at 256 / 32 pairs as its paper runs it: queries placed with
power_a 0.01 and no random filler (`random_non_queries=False`: every non-query token is 0).
Training follows zoology's practice of training on a mixture and testing on the hard setting:
each training example draws its number of pairs from {2, 4, 8, 16, 32} (`train_num_kv_pairs`;
validation and test always have 32). Vocabulary 256 (keys from [1, 128), values from
[128, 256)); zoology uses 8192, whose output layer alone would cost more than the rest of the
model on a CPU.

The attention model has a short causal convolution over q/k/v (`conv_size=4`, memzoo.attention):
with it 2-layer attention solves the task (held-out 0.978 at step 500, 1.000 at step 1000;
benchmarks/RESULTS.md). Plain attention (`--set 'model.mixer_options={"state_size": 64}'`),
with RoPE alone or with learned positions (`model.max_positions=256`) too, was still on the 1/32
plateau after 2000 steps: the previous-token step of the induction circuit is what it lacks.
"""
from configs.base import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                          TrainConfig)

SEQ_LEN, NUM_KV_PAIRS = 256, 32
TRAIN_KV_PAIRS = [2, 4, 8, 16, 32]


def get_config() -> TrainConfig:
    return TrainConfig(
        name="mqar256_attention",
        model=ModelConfig(mixer="attention", d_model=64, num_layers=2,
                          mixer_options={"state_size": 64, "attention": {"conv_size": 4}}),
        data=DataConfig(task="mqar", batch_size=16, seq_len=SEQ_LEN, eval_batches=8,
                        task_options={"vocab_size": 256, "num_kv_pairs": NUM_KV_PAIRS,
                                      "power_a": 0.01, "random_non_queries": False,
                                      "train_num_kv_pairs": TRAIN_KV_PAIRS}),
        optim=OptimConfig(steps=1000, learning_rate=3e-3, warmup_steps=100, weight_decay=0.0,
                          final_lr_fraction=0.1),
        checkpoint=CheckpointConfig(every=500, keep=1),
        logging=LoggingConfig(log_every=100, eval_every=250),
    )
