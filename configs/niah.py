"""Single needle in a haystack (train.data's "niah"): [NEEDLE, key, value] somewhere in 128
random tokens, then [QUERY, key]; the target is the value (chance 1/30 with vocab 32).

The comparison of issue 7: every model has a sliding-window attention of WINDOW = 16 tokens,
so a needle more than 14 tokens before the query (about 88% of them) is out of the attention's
sight. Sized for a few minutes on 2 shared CPU cores:
  niah_swa                2 x sliding-window attention only ("attention", window 16)
  niah_titans_mag         2 x Titans MAG: the same window attention gated with a neural memory
                          (2-layer memory MLP, momentum, chunks of 16)
  niah_titans_mag_linear  the same with the linear memory, no momentum (the delta-rule path)
  niah_titans_mal         2 x Titans MAL: the neural memory as a layer before the window attention
1500 steps: with 600 (a shorter cosine) neither the window attention nor MAG-linear left chance.
Numbers and commands: benchmarks/RESULTS.md (section "Titans / Miras").

The reading list's later memories on the same task (presets in configs/__init__.py):
  niah_hcam               2 x HCAM, chunks of 8, top 4 chunks, no window (it reads every
                          completed chunk through its summary), short conv 4 over q/k/v
  niah_ttm                2 x Token Turing Machine, 16 memory tokens, 4 read, segments of 16,
                          short conv 4 over its inputs
  niah_swa_conv           niah_swa with the same short conv 4 over q/k/v (the fair baseline)
Both memories read sets of tokens (summaries, means, softmax-weighted sums) and see no order
without the conv; with it a token carries its predecessors, the "value after NEEDLE, key"
binding. The conv stretches the window model's reach by 3 tokens a layer: values at >= 91
(needles starting at >= 89, 35 of 124), a bound of 0.28 + 0.72/30 = 0.31 for niah_swa_conv.
"""
from configs.base import DataConfig, LoggingConfig, ModelConfig, OptimConfig, TrainConfig

WINDOW = 16
SEQ_LEN = 128


def get_config(mixer: str = "attention", **options) -> TrainConfig:
    # MAC's attention is over segments of the memory's chunk, not a sliding window.
    sight = {"segment_len": WINDOW} if mixer == "titans_mac" else {"window": WINDOW}
    mixer_options = {"num_heads": 4, **sight, **options}
    return TrainConfig(
        name="niah_swa" if mixer == "attention" else f"niah_{mixer}",
        model=ModelConfig(mixer=mixer, d_model=64, num_layers=2, mixer_options=mixer_options),
        data=DataConfig(task="niah", batch_size=16, seq_len=SEQ_LEN, eval_batches=16,
                        task_options={"vocab_size": 32}),
        optim=OptimConfig(steps=1500, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0),
        logging=LoggingConfig(log_every=50),
    )
