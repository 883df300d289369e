"""Byte-level language models at realistic sizes (about 350M and 1.3B parameters, 4k context).

Sized for pods, not for this machine: `python -m train --preset NAME --compile_for v5e:4x4`
(train/compile_for.py) compiles the sharded train step for a TPU v5e-16 or 8 H100s without the
hardware and reports memory, FLOPs and collectives (benchmarks/RESULTS.md, "Whole models on pod
topologies"). Training for real needs the pod (or a prepared corpus and a lot of patience).

Every preset: the byte-LM task (train.data's "bytes", vocab 259, documents packed with segment
ids) at 4096 tokens, bfloat16 compute (float32 parameters and Adam state), a SwiGLU MLP of 3 x
d_model after every mixer, layers scanned over pattern repeats (one compiled group whatever the
depth) and every block rematerialised, a global batch of 32 rows (131k tokens), and a mesh that
puts every device on fsdp (ZeRO-3: parameters, gradients and optimizer state split 1/N; the
batch is split over data x fsdp too). Heads of 128 channels (64 for Mamba-2, as in the paper)
suit the TPU's 128-lane tiles.

    size   d_model  layers (attention / mamba2 / gated_deltanet / gla / hybrid)  parameters
    350m   1024     26 / 22 / 24 / 24 / 24                                     347M-355M
    1300m  2048     24 / 20 / 22 / 22 / 24                                     1.27B-1.39B (hybrid)

The hybrid is Gated DeltaNet with attention every fourth layer (pattern
"gated_deltanet,gated_deltanet,gated_deltanet,attention").
"""
from configs.base import (CheckpointConfig, DataConfig, LoggingConfig, MeshConfig, ModelConfig,
                          OptimConfig, TrainConfig)

SEQ_LEN = 4096
HYBRID = "gated_deltanet,gated_deltanet,gated_deltanet,attention"
MIXERS = ("attention", "mamba2", "gated_deltanet", "gla", "hybrid")
# size -> (d_model, learning rate)
SIZES = {"350m": (1024, 3e-4), "1300m": (2048, 2e-4)}
# size -> mixer -> layers: counts that bring each stack near the size's parameter budget
LAYERS = {"350m": {"attention": 26, "mamba2": 22, "gated_deltanet": 24, "gla": 24, "hybrid": 24},
          "1300m": {"attention": 24, "mamba2": 20, "gated_deltanet": 22, "gla": 22,
                    "hybrid": 24}}


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
    )
