"""Training entries: the default config's train step, and compile time with and without
scan-over-layers.

Everything goes through train.trainer.Trainer (the optimizer, shardings, donation and step
the training loop runs), so a row measures what `python -m train` runs, not a stand-in.

1. Throughput: the default preset's compiled train step, state donated and fed back as in the
   loop. FLOPs per step are XLA's `cost_analysis()` of that executable, so % gemm is achieved
   FLOP/s over the harness' GEMM probe.
2. Compile time: lowering + compiling the train step of a fresh Trainer (new model, new jit, so
   nothing is served from a cache) at two depths, for "s4d" and "attention", with
   `model.scan_layers` on and off. Unrolled, the program grows with depth; scanned, one layer
   is traced and compiled whatever the depth, which is the point of measuring both.
"""
from __future__ import annotations

import statistics
import time
import traceback

import jax

from benchmarks import _timing
from benchmarks.harness import Context, Row

MIXERS = ("s4d", "attention")
# (mixers, depths, d_model, seq_len, batch, compiles per point); the deep point is the one that
# matters, the shallow one shows the growth. Even a 1-layer train step takes ~5 s to compile on
# the 2-core CPU (AdamW over six parameter groups), so --quick compiles one mixer at one depth.
FULL_COMPILE = (MIXERS, (2, 12), 64, 64, 32, 3)
QUICK_COMPILE = (("s4d",), (1,), 16, 16, 4, 1)


def _config(quick: bool, **sets):
    import configs

    # synthetic: the tfds/grain loader would add import time and nothing the step sees
    base = configs.PRESETS["smoke" if quick else configs.DEFAULT_PRESET]()
    return base.overrides({"data.loader": "synthetic", "checkpoint.every": 0, **sets})


def _setup(config):
    from train import input as input_lib
    from train import mesh as mesh_lib

    d = config.data
    it, info = input_lib.build(d.task, loader=d.loader, split="train", batch_size=d.batch_size,
                               seq_len=d.seq_len, seed=config.seed, data_dir=d.data_dir,
                               shard_index=0, shard_count=1, **d.task_options)
    # One device: the GEMM ceiling is one device's, and tests force 8 host devices that the
    # smoke batch of 4 does not split over.
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    return mesh, info.vocab_size, next(it)


def _shape(config) -> str:
    m, d = config.model, config.data
    return f"{m.num_layers}x{m.mixer} d{m.d_model} B{d.batch_size} T{d.seq_len}"


def _throughput(ctx: Context) -> Row:
    from train.trainer import Trainer, flops_of

    config = _config(ctx.quick)
    mesh, vocab, batch_np = _setup(config)
    trainer = Trainer(config, mesh, vocab_size=vocab)
    state = trainer.init()
    batch = trainer.shard_batch(batch_np)
    # Trainer.compile would also compile the eval step, seconds this row does not use.
    train, _ = trainer.jitted_steps(batch)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        step = train.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    # The loop's call: state donated, the new state fed back, metrics waited on.
    ms = ctx.time(_timing.donated_step(step, (state, batch), 0))
    tokens = config.data.batch_size * config.data.seq_len
    flops = flops_of(step)
    notes = [f"{1e3 / ms:.1f} steps/s", f"{tokens / ms:.1f}k tok/s",
             f"{flops / 1e6:.1f} MFLOP/step (cost_analysis)" if flops else "no cost_analysis",
             f"{trainer.num_params:,} params", f"compile {compile_s:.1f} s"]
    if ctx.last_note:
        notes.append(ctx.last_note)
    return Row("train step", f"{config.name}: {_shape(config)}", config.model.dtype,
               "Trainer + adamw", "donated", ms, flops=flops, tokens=tokens, ceiling="gemm",
               note="; ".join(notes))


def compile_seconds(config) -> tuple[float, float]:
    """(lower s, compile s) of the train step of a Trainer built from scratch for `config`."""
    from train.trainer import Trainer

    mesh, vocab, batch_np = _setup(config)
    trainer = Trainer(config, mesh, vocab_size=vocab)
    batch = trainer.shard_batch(batch_np)
    train, _ = trainer.jitted_steps(batch)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        # abstract state: lowering needs shapes and shardings only, and an init would add its
        # own compile to nothing we report
        lowered = train.lower(trainer.abstract_state, batch)
        mid = time.perf_counter()
        lowered.compile()
        end = time.perf_counter()
    return mid - start, end - mid


def _compile_rows(ctx: Context) -> list[Row]:
    mixers, depths, d_model, seq_len, batch, repeats = (QUICK_COMPILE if ctx.quick
                                                         else FULL_COMPILE)
    repeats = min(repeats, ctx.repeats)
    rows = []
    for mixer in mixers:
        for scan in (True, False):
            shallow = None
            for depth in depths:
                config = _config(ctx.quick, **{
                    "model.mixer": mixer, "model.num_layers": depth, "model.scan_layers": scan,
                    "model.d_model": d_model, "data.seq_len": seq_len,
                    "data.batch_size": batch})
                impl = "scan_layers" if scan else "unrolled"
                try:
                    times = [compile_seconds(config) for _ in range(repeats)]
                except Exception as e:  # noqa: BLE001 - one failing point should not hide the rest
                    ctx.log(traceback.format_exc())
                    rows.append(Row("compile train step", _shape(config), config.model.dtype,
                                    impl, "lower+compile", None,
                                    note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
                    continue
                lower = statistics.median(t[0] for t in times)
                comp = statistics.median(t[1] for t in times)
                total = statistics.median(t[0] + t[1] for t in times)
                notes = [f"lower {lower:.2f} s + compile {comp:.2f} s",
                         f"median of {repeats} fresh builds"]
                if shallow is not None:
                    notes.append(f"{total / shallow:.1f}x the {depths[0]}-layer time")
                else:
                    shallow = total
                ctx.log(f"  compile {_shape(config)} {impl}: {total:.2f} s")
                rows.append(Row("compile train step", _shape(config), config.model.dtype, impl,
                                "lower+compile", total * 1e3, note="; ".join(notes)))
    return rows


def run(ctx: Context) -> list[Row]:
    rows = []
    try:
        rows.append(_throughput(ctx))
        ctx.log(f"  train step: {rows[-1].note}")
    except Exception as e:  # noqa: BLE001 - the compile rows are still worth having
        ctx.log(traceback.format_exc())
        rows.append(Row("train step", "default preset", "float32", "Trainer + adamw", "donated",
                        None, note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
    return rows + _compile_rows(ctx)
