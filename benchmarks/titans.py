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

Memory rows: XLA's temp bytes (`compile().memory_analysis()`) of grad(sum(y)) of the chunked
2-layer memory (core.chunked_memory; B1, 4 heads x 16 = width 64, C=16) at T=8192 for two hidden
widths (16 and 64, 4x the parameters), with the two-level checkpoints and without any remat,
against the bytes one per-token copy of the weights would take (T x params x 4).
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


def memory_row(T: int, hidden: int, remat: bool, heads: int = 4, K: int = 16, C: int = 16) -> Row:
    import jax
    import jax.numpy as jnp

    from memzoo.neural_memory import MemoryRule, chunked_memory

    rule, sizes = MemoryRule(), [K, hidden, K]
    acc = tuple(jax.ShapeDtypeStruct((1, heads, i, o), jnp.float32)
                for i, o in zip(sizes[:-1], sizes[1:]))
    x = jax.ShapeDtypeStruct((1, T, heads, K), jnp.float32)
    g = jax.ShapeDtypeStruct((1, T, heads), jnp.float32)

    def loss(acc, k, v, q, theta, eta, alpha):
        mom = tuple(jnp.zeros_like(a) for a in acc)
        return jnp.sum(chunked_memory(rule, acc, mom, k, v, q, theta, eta, alpha,
                                      chunk_size=C, remat=remat)[0])

    f = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
    temp = f.lower(acc, x, x, x, g, g, g).compile().memory_analysis().temp_size_in_bytes
    params = heads * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    copies = T * params * 4
    return Row("neural memory fwd+bwd temp", f"T{T} H{heads}x{K} hidden {hidden} C{C}", "float32",
               "2-level remat" if remat else "no remat", "memory_analysis", None,
               note=f"temp {temp / 2**20:.1f} MiB; {temp / T:.0f} B/token; params {params:,}; "
                    f"per-token weight copies would be {copies / 2**20:.0f} MiB")


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
    T = 1024 if ctx.quick else 8192
    for hidden, remat in ((16, True), (64, True), (64, False)):
        rows.append(memory_row(T, hidden, remat))
        ctx.log(f"  memory: {rows[-1].implementation} {rows[-1].shape}: {rows[-1].note}")
    return rows
