"""Subword language models: the "tokens" task (a byte-level BPE corpus, train/data/tokens.py).

Without data.task_options.dir the corpus is the Python standard library, tokenised into
data_dir on the first run (~30 MB; about a minute on 2 cores, then reused), so every preset
here trains on a fresh machine with no manual step. Own corpus:

    python -m train.tokenize --corpus ~/texts --vocab_size 2048 --output /data/tok
    python -m train --preset lm_tiny_tokens --set data.task_options='{"dir": "/data/tok"}'

(the JSON form replaces the preset's options; a dir tokenised with settings other than the ones
still given is refused as stale).

    lm_tiny_tokens[_MIXER]    2 x d_model 128, 2048 ids, 256 tokens a row (~770 bytes of the
                              standard library), 16 rows a batch, 300 steps: about 4 minutes on
                              2 CPU cores. MIXER: attention (default), gated_deltanet, mamba2.
    lm{SIZE}_tokens_MIXER     configs/lm.py's pod models (POD_SIZES) on 32768 ids, 4096 tokens
                              a row; `python -m train --preset lm350m_tokens_attention
                              --compile_for v5e:4x4` sizes one without data (the vocabulary
                              comes from task_options, or a dir's metadata).
"""
from configs import lm
from configs.base import (CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, ModelConfig,
                          OptimConfig, TrainConfig)

TINY_VOCAB, POD_VOCAB = 2048, 32768
TINY_MIXERS = ("attention", "gated_deltanet", "mamba2")
# lm.py's sizes at 4096 tokens; its CPU size, if any, is `tiny` here (a float32 model sized for
# a 2048-id vocabulary)
POD_SIZES = tuple(size for size in lm.SIZES if size != "tiny")


def tiny_mixer_options(mixer: str) -> dict:
    return {"attention": {"num_heads": 4},
            "gated_deltanet": {"num_heads": 2, "head_dim": 64},
            "mamba2": {"state_size": 64, "head_dim": 32, "expand": 2}}[mixer]


def tiny(mixer: str = "attention") -> TrainConfig:
    if mixer not in TINY_MIXERS:
        raise ValueError(f"configs/lm_tokens.py: mixer must be one of {TINY_MIXERS}, got "
                         f"{mixer!r}")
    return TrainConfig(
        name="lm_tiny_tokens" + ("" if mixer == "attention" else f"_{mixer}"),
        model=ModelConfig(mixer=mixer, d_model=128, num_layers=2, mlp_ratio=4,
                          mixer_options=tiny_mixer_options(mixer)),
        data=DataConfig(task="tokens", batch_size=16, seq_len=256, eval_batches=8,
                        task_options={"vocab_size": TINY_VOCAB}),
        optim=OptimConfig(steps=300, learning_rate=3e-3, warmup_steps=30, final_lr_fraction=0.1,
                          b2=0.95, weight_decay=0.1, decay_embeddings=False),
        checkpoint=CheckpointConfig(every=100),
        logging=LoggingConfig(log_every=25, eval_every=100),
        eval=EvalConfig(enabled=True),   # perplexity, bits per byte, 2x-8x lengths, needles
    )


def pod(mixer: str = "attention", size: str = "350m") -> TrainConfig:
    """configs/lm.py's model, batch and schedule at `size`, on tokens instead of bytes."""
    if size not in POD_SIZES:
        raise ValueError(f"configs/lm_tokens.py: size must be one of {POD_SIZES}, got {size!r}")
    return lm.get_config(mixer, size).overrides({
        "name": f"lm{size}_tokens_{mixer}", "data.task": "tokens",
        "data.task_options": {"vocab_size": POD_VOCAB}})


def get_config(mixer: str = "attention", size: str = "tiny") -> TrainConfig:
    return tiny(mixer) if size == "tiny" else pod(mixer, size)

