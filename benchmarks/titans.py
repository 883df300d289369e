"""Titans / Miras training throughput against Gated DeltaNet at equal d_model.

Each row is the compiled train step of `train.trainer.Trainer` (AdamW, donation: what
`python -m train` runs) for a 2-layer CausalLM on synthetic NIAH batches (configs/niah.py's
data), one mixer per row at the same d_model, heads and head_dim:

  gated_deltanet          the linear-attention baseline (pallas_kernels.delta_rule)
  neural_memory (linear)  Titans' linear memory without momentum: the delta-rule path
  neural_memory           Titans' memory, 2-layer MLP, momentum, chunks of 16
                          (vmap(grad) + linear_scan, two-level checkpoints)
  titans_mag              the memory gated with a window attention (window 16)
  moneta                  Miras: l_p bias, l_q retention

tokens/s = batch x seq_len / median step time. `--quick` shrinks the batch and the set.
"""
from __future__ import annotations

import traceback

from benchmarks import _timing
from benchmarks.harness import Context, Row
from benchmarks.train import _setup, _shape

HEADS = {"num_heads": 4}
FULL = (64, 256, 16)      # d_model, seq_len, batch
QUICK = (32, 64, 4)
MIXERS = (
    ("gated_deltanet", "gated_deltanet", {}),
    ("neural_memory (linear)", "neural_memory", {"memory_layers": 1, "learning_rule": "gd"}),
    ("neural_memory", "neural_memory", {"chunk_size": 16}),
    ("titans_mag", "titans_mag", {"chunk_size": 16, "window": 16}),
    ("moneta", "moneta", {"chunk_size": 16}),
)


def _config(mixer: str, options: dict, d_model: int, seq_len: int, batch: int):
    import configs

    return configs.PRESETS["niah_swa"]().overrides({
        "name": f"bench_{mixer}", "model.mixer": mixer, "model.d_model": d_model,
        "model.mixer_options": {**HEADS, **options}, "data.seq_len": seq_len,
        "data.batch_size": batch, "data.loader": "synthetic", "checkpoint.every": 0})


def _row(ctx: Context, label: str, mixer: str, options: dict, sizes) -> Row:
    import jax

    from train.trainer import Trainer

    config = _config(mixer, options, *sizes)
    mesh, vocab, batch_np = _setup(config)
    trainer = Trainer(config, mesh, vocab_size=vocab)
    state = trainer.init()
    batch = trainer.shard_batch(batch_np)
    train, _ = trainer.jitted_steps(batch)
    with jax.set_mesh(mesh):
        step = train.lower(state, batch).compile()
    ms = ctx.time(_timing.donated_step(step, (state, batch), 0))
    tokens = config.data.batch_size * config.data.seq_len
    notes = [f"{tokens / ms:.2f}k tok/s", f"{trainer.num_params:,} params"]
    if ctx.last_note:
        notes.append(ctx.last_note)
    return Row("titans train step", f"{label}: {_shape(config)}", config.model.dtype,
               "Trainer + adamw", "donated", ms, tokens=tokens, note="; ".join(notes))


def run(ctx: Context) -> list[Row]:
    sizes = QUICK if ctx.quick else FULL
    mixers = MIXERS[:3] if ctx.quick else MIXERS
    rows = []
    for label, mixer, options in mixers:
        try:
            rows.append(_row(ctx, label, mixer, options, sizes))
            ctx.log(f"  {label}: {rows[-1].note}")
        except Exception as e:  # noqa: BLE001 - one failing mixer should not hide the rest
            ctx.log(traceback.format_exc())
            rows.append(Row("titans train step", label, "float32", "Trainer + adamw", "donated",
                            None, note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
    return rows
