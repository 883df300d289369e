"""Multi-query associative recall (Zoology's MQAR): key-value pairs, then queries whose targets
are the values bound to earlier keys. A harder memory test than delayed recall: the state must
hold `num_kv_pairs` bindings, not a fixed window.

Measured (benchmarks/RESULTS.md): 2-layer attention at d_model 64 sits on the 1/num_kv_pairs
plateau (it knows the values, not the bindings) until about step 1800, then solves it (held-out
accuracy 1.000 at 3000 steps, about 5 minutes on 2 CPU cores). Learning rate 1e-3 with weight decay
0.1 stayed on the plateau for 2000 steps.
"""
from configs.base import DataConfig, LoggingConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="mqar_s4d",
        model=ModelConfig(mixer="s4d", d_model=64, num_layers=2, mixer_options={"state_size": 64}),
        data=DataConfig(task="mqar", batch_size=32, seq_len=64,
                        task_options={"vocab_size": 64, "num_kv_pairs": 4, "power_a": 1.0}),
        optim=OptimConfig(steps=3000, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0),
        logging=LoggingConfig(log_every=250),
    )
