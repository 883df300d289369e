# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memzoo/memzoo/blob/main/notebooks/02_mqar_frontier.ipynb)
#
# # Memory under a microscope: MQAR
#
# Multi-query associative recall (MQAR, from the Zoology paper) is the cleanest test of what a
# sequence memory can hold: a context of key-value pairs `k1 v1 k2 v2 ...`, then the keys again
# in random order, each of which must be answered with its value. A model that only knows which
# values are in the context sits on a plateau of `1 / num_kv_pairs`; solving it means binding each
# key to the value that followed it, and holding those bindings until they are queried.
#
# Zoology's finding: attention solves MQAR at any width because its state (the KV cache) grows with
# the sequence; fixed-size recurrent memories trade accuracy against **state size**, and how well
# they use a given state depends on the family: time-invariant SSMs (S4D) cannot bind at all,
# input-dependent ones (Mamba, gated linear attention, the delta rule) can.
#
# This notebook trains every memory family that memzoo has (those of the list below that are
# registered when it runs) through the same API as `python -m train`, then plots accuracy against
# state size (the frontier) and the learning curves. Every number in those comes from this run;
# the last section rebuilds every matrix-state mixer and shows the recorded state-size sweep.

# %%
# Install memzoo (skipped when it is already importable, e.g. in a checkout or on a second run).
import importlib.util

if importlib.util.find_spec("memzoo") is None:
    # %pip install -q "memzoo @ git+https://github.com/memzoo/memzoo"
    pass

# %% tags=["parameters"]
# Sizes. MEMZOO_NOTEBOOK_QUICK=1 (set by the project's CI) shrinks the run to a smoke test;
# a colab user gets the full size: two widths per family, 300 steps each, 15-60 s per run on a
# 2-core CPU runtime (the table below prints each run's time). Fewer families: edit WANTED.
import os

QUICK = os.environ.get("MEMZOO_NOTEBOOK_QUICK", "0") == "1"
# The families to compare, in plotting order; those not registered in this memzoo are skipped.
WANTED = ["attention", "s4d", "s5", "mamba", "mamba2", "linear_attention", "retnet", "gla",
          "deltanet", "gated_deltanet", "mom"]
MAX_MIXERS = 2 if QUICK else None       # quick mode: the first two available
D_MODELS = [16] if QUICK else [32, 64]   # model widths: each mixer's points on the frontier
NUM_LAYERS = 1 if QUICK else 2
STATE_SIZE = 16                          # SSM state per channel, for families that take it
SEQ_LEN = 16 if QUICK else 32
NUM_KV_PAIRS = 2 if QUICK else 4
VOCAB = 16                               # keys from [1, 8), values from [8, 16)
BATCH = 8 if QUICK else 32
STEPS = 20 if QUICK else 300
LOG_EVERY = 5 if QUICK else 20
EVAL_BATCHES = 1 if QUICK else 4

# %%
import io
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
from flax import nnx

import configs
import memzoo
from train.loop import run
from train.trainer import build_model

mixers = [m for m in WANTED if m in memzoo.MIXERS][:MAX_MIXERS]
print("jax", jax.__version__, "on", jax.device_count(), "x", jax.devices()[0].platform)
print("training:", mixers)
print("not registered in this memzoo (skipped):", [m for m in WANTED if m not in memzoo.MIXERS])

# %% [markdown]
# ## The runs
#
# Each run is `train.loop.run(config)`, the function behind `python -m train`; the config is the
# `mqar_s4d` preset with `--set` overrides, exactly as on the command line. The cell prints the
# equivalent command for each run. Checkpoints and TensorBoard logs are off (`checkpoint.every=0`)
# and every run gets its own temporary run directory.
#
# **State size** is measured, not looked up: the number of floats in the model's decoding cache
# for one sequence of `SEQ_LEN` tokens (`model.init_cache(1, max_len=SEQ_LEN)`, all layers; a
# complex number counts as two). For attention that is the KV cache, which grows with the
# sequence; for the recurrent memories it is fixed.

# %%
def config_for(mixer: str, d_model: int):
    sets = [f"model.mixer={mixer}", f"model.d_model={d_model}", f"model.num_layers={NUM_LAYERS}",
            f'model.mixer_options={{"state_size": {STATE_SIZE}}}',
            f"data.seq_len={SEQ_LEN}", f"data.batch_size={BATCH}",
            f"data.eval_batches={EVAL_BATCHES}",
            f'data.task_options={{"vocab_size": {VOCAB}, "num_kv_pairs": {NUM_KV_PAIRS}, '
            f'"power_a": 1.0}}',
            f"optim.steps={STEPS}", f"optim.warmup_steps={max(1, STEPS // 15)}",
            f"logging.log_every={LOG_EVERY}", "checkpoint.every=0", "logging.tensorboard=false",
            "logging.progress=false"]
    command = "python -m train --preset mqar_s4d " + " ".join(f"--set '{s}'" for s in sets)
    config = configs.resolve(preset="mqar_s4d", sets=sets)
    return config.replace(name=f"mqar_{mixer}_d{d_model}", run_dir=tempfile.mkdtemp()), command


def state_size(config) -> int:
    """Floats in the decoding cache for one sequence (shapes only: nothing is allocated)."""
    def cache():
        model = build_model(config, VOCAB, nnx.Rngs(0))
        return model.init_cache(1, config.data.seq_len)
    leaves = jax.tree.leaves(jax.eval_shape(cache))
    return sum(int(np.prod(x.shape)) * (2 if np.issubdtype(x.dtype, np.complexfloating) else 1)
               for x in leaves if np.issubdtype(x.dtype, np.inexact))


results = []
for mixer in mixers:
    for d_model in D_MODELS:
        config, command = config_for(mixer, d_model)
        print(command)
        log = io.StringIO()
        t0 = time.perf_counter()
        out = run(config, out=log)
        seconds = time.perf_counter() - t0
        results.append(dict(mixer=mixer, d_model=d_model, state=state_size(config),
                            accuracy=out["eval_accuracy"], loss=out["eval_loss"],
                            history=out["history"], seconds=seconds))
        print(f"  -> {mixer}, d_model {d_model}: held-out accuracy {out['eval_accuracy']:.3f}, "
              f"state {results[-1]['state']:,} floats, {seconds:.0f} s")

print("\nthe last run's log, as the command prints it:\n" +
      "\n".join(log.getvalue().splitlines()[-6:]))

# %%
print(f"{'mixer':>18} {'d_model':>8} {'state floats':>13} {'accuracy':>9} {'loss':>7} {'s':>5}")
for r in results:
    print(f"{r['mixer']:>18} {r['d_model']:>8} {r['state']:>13,} {r['accuracy']:>9.3f} "
          f"{r['loss']:>7.3f} {r['seconds']:>5.0f}")
chance = 1 / (VOCAB - VOCAB // 2)
print(f"chance {chance:.3f}; the 'values, not bindings' plateau {1 / NUM_KV_PAIRS:.3f}")
assert all(np.isfinite(r["loss"]) for r in results)

# %% [markdown]
# ## Accuracy against state size
#
# Up and to the left is better: more recall from less memory. Each mixer's points are its widths.

# %%
colors = dict(zip(mixers, plt.cm.tab10(np.linspace(0, 1, 10))))
fig, ax = plt.subplots(figsize=(7, 4.5))
for mixer in mixers:
    rs = sorted((r for r in results if r["mixer"] == mixer), key=lambda r: r["state"])
    ax.plot([r["state"] for r in rs], [r["accuracy"] for r in rs], "o-", color=colors[mixer],
            label=mixer)
for level, label, style in [(1 / NUM_KV_PAIRS, "plateau: values, not bindings", "--"),
                           (chance, "chance", ":")]:
    ax.axhline(level, ls=style, c="gray", lw=1)
    ax.text(0.01, level, label, transform=ax.get_yaxis_transform(), va="bottom", fontsize=8,
            color="gray")
ax.set(xscale="log", xlabel="state size (floats in the decoding cache, one sequence)",
       ylabel="held-out MQAR accuracy", ylim=(-0.02, 1.02),
       title=f"MQAR: {NUM_KV_PAIRS} pairs, length {SEQ_LEN}, {NUM_LAYERS} layers, {STEPS} steps")
ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
ax.xaxis.set_minor_formatter(mticker.NullFormatter())
ax.legend(fontsize=8, loc="center right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Learning curves
#
# Training-batch accuracy and loss every `LOG_EVERY` steps, at the widest model of each family.
# Attention's curve typically sits on the plateau for a while and then jumps: the moment an
# induction-style head forms.

# %%
fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
for mixer in mixers:
    r = max((r for r in results if r["mixer"] == mixer), key=lambda r: r["d_model"])
    steps = [h["step"] for h in r["history"]]
    ax_acc.plot(steps, [h["accuracy"] for h in r["history"]], color=colors[mixer], label=mixer)
    ax_loss.plot(steps, [h["loss"] for h in r["history"]], color=colors[mixer], label=mixer)
ax_acc.axhline(1 / NUM_KV_PAIRS, ls="--", c="gray", lw=1)
ax_acc.set(xlabel="step", ylabel="training accuracy (query positions)", ylim=(-0.02, 1.02))
ax_loss.set(xlabel="step", ylabel="training loss", yscale="log")
ax_acc.legend(fontsize=8)
fig.suptitle(f"learning curves at d_model {max(D_MODELS)}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The matrix-state family: every mixer, its state, and the recorded sweep
#
# The mixers whose memory is a matrix per head (linear attention and its gated, delta-rule,
# DPLR, slot, feature-map, mixture and test-time relatives) were swept over state size through
# the training command, `python -m benchmarks.mqar_sweep` (benchmarks/mqar_sweep.py; settings
# and reading in benchmarks/RESULTS.md). Retraining all of them takes an hour or more on a CPU, so
# this section loads the recorded results (`benchmarks/mqar_sweep.jsonl`, one line per finished
# run) instead. Each line holds the options the mixer ran with, so every mixer is rebuilt here
# from them (shapes only, `jax.eval_shape`): its output shape, the matrix state the sweep counted
# (`state_per_layer`, from the options) and the floats of its real decoding cache, which adds
# short-conv windows, token-shift rows and second copies (JRT's prefix state) to the matrix.

# %%
import json
import pathlib
import urllib.request

SWEEP_URL = "https://raw.githubusercontent.com/memzoo/memzoo/main/benchmarks/mqar_sweep.jsonl"
sweep_path = pathlib.Path(memzoo.__file__).resolve().parents[1] / "benchmarks" / "mqar_sweep.jsonl"
if sweep_path.exists():
    sweep_text = sweep_path.read_text()
else:   # an installed memzoo has no benchmarks/: fetch the recorded file
    try:
        sweep_text = urllib.request.urlopen(SWEEP_URL, timeout=30).read().decode()
    except OSError as e:
        sweep_text = ""
        print(f"no recorded sweep here ({e}); run `python -m benchmarks.mqar_sweep` in a checkout")
sweep = [json.loads(line) for line in sweep_text.splitlines() if line.strip()]
sweep = [r for r in sweep if "error" not in r]
print(f"{len(sweep)} recorded runs; setting: {sweep[0]['setting'] if sweep else None}")

# %%
def built(mixer: str, options: dict, d_model: int = 64, length: int = 32):
    """(output shape, cache floats) of the mixer built from `options`, shapes only."""
    def make():
        m = memzoo.MIXERS[mixer](d_model, rngs=nnx.Rngs(0), **options)
        return m(jax.numpy.zeros((1, length, d_model))), m.init_cache(1)
    y, cache = jax.eval_shape(make)
    return y.shape, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(cache)
                        if np.issubdtype(x.dtype, np.inexact))


sizes = sorted({r["d"] for r in sweep})
family = list(dict.fromkeys(r["mixer"] for r in sweep))
# Quick mode rebuilds one size of every mixer; the full run every recorded (mixer, size).
build_sizes = sizes[:1] if QUICK else sizes
print(f"{'mixer':>19} {'d':>3} {'matrix state':>22} {'numbers':>8} {'cache':>7} {'output':>14}")
for r in sweep:
    if r["d"] not in build_sizes or r["mixer"] not in memzoo.MIXERS:
        continue
    shape, cache = built(r["mixer"], r["mixer_options"])
    assert shape == (1, 32, 64) and cache >= r["state_per_layer"], r["mixer"]
    print(f"{r['mixer']:>19} {r['d']:>3} {r['state_formula']:>22} {r['state_per_layer']:>8,} "
          f"{cache:>7,} {str(shape):>14}")

# %%
found = {(r["mixer"], r["d"]): r for r in sweep}
print("held-out accuracy by per-head width d (matrix state per layer in brackets)")
print(f"{'mixer':>19} " + " ".join(f"{'d=' + str(d):>16}" for d in sizes))
for mixer in family:
    cells = [f"{found[mixer, d]['eval_accuracy']:.3f} ({found[mixer, d]['state_per_layer']:,})"
             if (mixer, d) in found else "-" for d in sizes]
    print(f"{mixer:>19} " + " ".join(f"{c:>16}" for c in cells))

# %%
if sweep:
    s = sweep[0]["setting"]
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20")
    for i, mixer in enumerate(family):
        rs = sorted((r for r in sweep if r["mixer"] == mixer), key=lambda r: r["state_per_layer"])
        ax.plot([r["state_per_layer"] for r in rs], [r["eval_accuracy"] for r in rs],
                "os^vD<>ph"[i % 9] + "-", color=cmap(i % 20), label=mixer, ms=5)
    ax.axhline(1 / s["pairs"], ls="--", c="gray", lw=1)
    ax.axhline(2 / s["vocab"], ls=":", c="gray", lw=1)
    ax.set(xscale="log", xlabel="matrix state per layer (numbers)",
           ylabel="held-out MQAR accuracy", ylim=(-0.02, 1.02),
           title=f"recorded sweep: {s['pairs']} pairs / {s['seq_len']} tokens, {s['steps']} steps")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## Going further
#
# * The same runs from a shell: the commands printed above (drop `logging.progress=false` for
#   a progress bar, keep checkpoints to resume).
# * Zoology's harder setting (length 256, 32+ pairs) needs tens of thousands of steps: run it on
#   an accelerator, e.g. `python -m train --preset mqar_attention --set data.seq_len=256
#   --set data.task_options.num_kv_pairs=32 --set data.task_options.vocab_size=256`.
# * 300 steps is short: the input-dependent memories are often still climbing when it ends (see
#   the curves). Raise `STEPS` for a converged frontier, and add widths to `D_MODELS` (or vary
#   `STATE_SIZE` for the SSMs) for more points on it.
