"""Byte-level language models at the sizes people train (about 125M, 350M and 1.3B parameters,
4k context), and a CPU-size variant of each architecture.

The pod sizes are for pods, not this machine: `python -m train --preset NAME --compile_for
v5e:4x4` (train/compile_for.py) compiles the sharded train step for a TPU v5e-16 or 8 H100s
without the hardware and reports memory, FLOPs and collectives (benchmarks/RESULTS.md, "Whole
models on pod topologies"). The `lmtiny_*` variants are the same architectures and precision
(bf16 compute, float32 master weights and SSM dynamics) at d_model 128 and 256 tokens: they
train on a 2-core CPU in minutes (`python -m train --preset lmtiny_gated_deltanet`).

Every preset: the byte-LM task (train.data's "bytes", vocab 259, documents packed with segment
ids), bfloat16 compute (float32 parameters and Adam state; the mixers keep their decay / step
parameters and recurrences in float32), a SwiGLU MLP of 3 x d_model after every mixer, layers
scanned over pattern repeats (one compiled group whatever the depth). Pod sizes: 4096 tokens,
every block rematerialised, a global batch of 32 rows (131k tokens), and a mesh that puts every
device on fsdp (ZeRO-3: parameters, gradients and optimizer state split 1/N; the batch is split
over data x fsdp too). Heads of 128 channels (64 for Mamba-2, as in the paper) suit the TPU's
128-lane tiles.

    size   d_model  layers (attention / mamba2 / gated_deltanet / gla / hybrid)  parameters
    125m   768      16 / 14 / 15 / 15 / 16                                     123M-130M
    350m   1024     26 / 22 / 24 / 24 / 24                                     347M-355M
    1300m  2048     24 / 20 / 22 / 22 / 24                                     1.27B-1.39B (hybrid)
    tiny   128      2 / 2 / 2 / 2 / 4                                          0.46M-0.94M

The hybrid is Gated DeltaNet with attention every fourth layer (pattern
"gated_deltanet,gated_deltanet,gated_deltanet,attention").
"""
from configs.base import (CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, MeshConfig,
                          ModelConfig, OptimConfig, TrainConfig)

SEQ_LEN = 4096
HYBRID = "gated_deltanet,gated_deltanet,gated_deltanet,attention"
MIXERS = ("attention", "mamba2", "gated_deltanet", "gla", "hybrid")
# size -> (d_model, learning rate)
SIZES = {"125m": (768, 6e-4), "350m": (1024, 3e-4), "1300m": (2048, 2e-4), "tiny": (128, 2e-3)}
# size -> mixer -> layers: counts that bring each stack near the size's parameter budget
LAYERS = {"125m": {"attention": 16, "mamba2": 14, "gated_deltanet": 15, "gla": 15, "hybrid": 16},
          "350m": {"attention": 26, "mamba2": 22, "gated_deltanet": 24, "gla": 24, "hybrid": 24},
          "1300m": {"attention": 24, "mamba2": 20, "gated_deltanet": 22, "gla": 22,
                    "hybrid": 24},
          "tiny": {"attention": 2, "mamba2": 2, "gated_deltanet": 2, "gla": 2, "hybrid": 4}}


def mixer_options(mixer: str, d_model: int) -> dict:
    heads = d_model // 128
    linear = {"num_heads": heads, "head_dim": 128}
    return {
        "attention": {"num_heads": heads},
        "mamba2": {"state_size": 128, "head_dim": 64, "expand": 2},
        "gated_deltanet": linear,
        "gla": linear,
        # per-mixer options (memzoo.models.route_mixer_options): each mixer its own heads
        "hybrid": {"gated_deltanet": linear, "attention": {"num_heads": heads}},
    }[mixer]


def get_config(mixer: str = "attention", size: str = "350m") -> TrainConfig:
    if mixer not in MIXERS:
        raise ValueError(f"configs/lm.py: mixer must be one of {MIXERS}, got {mixer!r}")
    if size not in SIZES:
        raise ValueError(f"configs/lm.py: size must be one of {tuple(SIZES)}, got {size!r}")
    d_model, lr = SIZES[size]
    if size == "tiny":
        return _tiny(mixer, d_model, lr)
    return TrainConfig(
        name=f"lm{size}_{mixer}",
        model=ModelConfig(mixer=HYBRID if mixer == "hybrid" else mixer, d_model=d_model,
                          num_layers=LAYERS[size][mixer], mlp_ratio=3, dtype="bfloat16",
                          mixer_options=mixer_options(mixer, d_model), scan_layers=True,
                          remat="full"),
        data=DataConfig(task="bytes", batch_size=32, seq_len=SEQ_LEN, eval_batches=8,
                        task_options={}),
        optim=OptimConfig(steps=20_000, learning_rate=lr, warmup_steps=1000,
                          final_lr_fraction=0.1, b2=0.95, weight_decay=0.1,
                          decay_embeddings=False),
        mesh=MeshConfig(data=1, fsdp=-1),
        checkpoint=CheckpointConfig(every=1000),
        logging=LoggingConfig(log_every=50, eval_every=1000),
        # at the end: perplexity, bits per byte, loss by position, 2x/4x/8x lengths, needles
        eval=EvalConfig(enabled=True),
    )


def _tiny(mixer: str, d_model: int, lr: float) -> TrainConfig:
    """The architecture at CPU size: minutes of training here, the pod presets' precision."""
    return TrainConfig(
        name=f"lmtiny_{mixer}",
        model=ModelConfig(mixer=HYBRID if mixer == "hybrid" else mixer, d_model=d_model,
                          num_layers=LAYERS["tiny"][mixer], mlp_ratio=3, dtype="bfloat16",
                          mixer_options=mixer_options(mixer, d_model), scan_layers=True,
                          remat="none"),
        data=DataConfig(task="bytes", batch_size=8, seq_len=256, eval_batches=4,
                        task_options={}),
        optim=OptimConfig(steps=300, learning_rate=lr, warmup_steps=30, final_lr_fraction=0.1,
                          b2=0.95, weight_decay=0.1, decay_embeddings=False),
        checkpoint=CheckpointConfig(every=100),
        logging=LoggingConfig(log_every=10, eval_every=100),
        eval=EvalConfig(enabled=True),
    )
