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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memzoo/memzoo/blob/main/notebooks/06_memory_families.ipynb)
#
# # The memory families side by side: induction heads, and what happens at 4x the length
#
# memzoo has memories from five families (the README's zoo table): attention, whose state (the
# KV cache) grows with the sequence; state-space models; linear-attention memories (additive,
# gated, delta rule); test-time memories that learn while they read; and memory systems built
# around an explicit store (Hopfield layers, Memory Mosaics, hierarchical chunk attention).
#
# This notebook trains one member of each on the same task, through the API of `python -m train`,
# and measures the same things for every one of them:
#
# * **induction heads** (Mamba's section 4.1.2): a trigger token, the token after it, and the
#   trigger again at the end; predict the token that followed it. Solving it needs a memory that
#   binds "what came after X" and reads it back by content.
# * **length generalisation**: trained at length 64, evaluated at 256. A memory whose state has a
#   fixed size and no positional encoding to run out of can hold up; attention with RoPE meets
#   positions it never saw.
# * **state**: the floats in each model's decoding cache for one sequence, at 64 and at 256
#   tokens: fixed for the recurrent memories, growing for attention and the explicit stores.

# %%
# Install memzoo (skipped when it is already importable, e.g. in a checkout or on a second run).
import importlib.util

if importlib.util.find_spec("memzoo") is None:
    # %pip install -q "memzoo @ git+https://github.com/memzoo/memzoo"
    pass

# %% tags=["parameters"]
# Sizes. MEMZOO_NOTEBOOK_QUICK=1 (set by the project's CI) shrinks the runs to a smoke test; a
# colab user gets the full size: 400 steps per family, about 1-4 minutes each on a 2-core CPU.
import os

QUICK = os.environ.get("MEMZOO_NOTEBOOK_QUICK", "0") == "1"
# One member per family, with the options it runs with (d_model 64, 2 layers, no MLP).
FAMILIES = {
    "attention": ("attention", {"num_heads": 4}),
    "state-space (selective)": ("mamba2", {"state_size": 16, "head_dim": 16}),
    "linear attention (delta rule)": ("deltanet", {"num_heads": 4}),
    "linear attention (gated, additive)": ("gla", {"num_heads": 4}),
    "test-time memory": ("titans_mag", {"num_heads": 4, "window": 16, "chunk_size": 16}),
    "Hopfield layer": ("hopfield", {"num_heads": 4}),
    "Memory Mosaics": ("memory_mosaic", {"num_heads": 4}),
    "hierarchical chunk attention": ("hcam", {"num_heads": 4, "chunk_len": 8, "top_k": 4}),
}
if QUICK:
    FAMILIES = dict(list(FAMILIES.items())[:2])
SEQ_LEN, EVAL_SEQ_LEN = (16, 32) if QUICK else (64, 256)
STEPS = 10 if QUICK else 400
BATCH = 8 if QUICK else 32
EVAL_BATCHES = 1 if QUICK else 4

# %%
import io
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import configs
import memzoo
from train.loop import run
from train.trainer import build_model

print("jax", jax.__version__, "on", jax.device_count(), "x", jax.devices()[0].platform)
missing = [m for m, _ in FAMILIES.values() if m not in memzoo.MIXERS]
assert not missing, f"not registered: {missing}"

# %% [markdown]
# ## The runs
#
# Each run is `train.loop.run(config)`, the function behind `python -m train`, on the
# `induction_heads_attention` preset with the mixer swapped by `--set` overrides; the cell prints
# the equivalent command. Checkpoints and TensorBoard logs are off and every run gets its own
# temporary directory. Chance is 1/15 (vocabulary 16, the trigger excluded).

# %%
def config_for(mixer: str, options: dict):
    options_json = "{" + ", ".join(f'"{k}": {v}' for k, v in options.items()) + "}"
    sets = [f"model.mixer={mixer}", f"model.mixer_options={options_json}",
            f"data.seq_len={SEQ_LEN}", f"data.eval_seq_len={EVAL_SEQ_LEN}",
            f"data.batch_size={BATCH}", f"data.eval_batches={EVAL_BATCHES}",
            f"optim.steps={STEPS}", f"optim.warmup_steps={max(1, STEPS // 10)}",
            f"logging.log_every={max(1, STEPS // 10)}", "checkpoint.every=0",
            "logging.tensorboard=false", "logging.progress=false"]
    command = ("python -m train --preset induction_heads_attention "
               + " ".join(f"--set '{s}'" for s in sets))
    config = configs.resolve(preset="induction_heads_attention", sets=sets)
    return config.replace(name=f"induction_{mixer}", run_dir=tempfile.mkdtemp()), command


def cache_floats(config, length: int) -> int:
    """Floats in the decoding cache for one sequence of `length` tokens (shapes only)."""
    def cache():
        return build_model(config, 16, nnx.Rngs(0)).init_cache(1, length)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(cache))
               if np.issubdtype(x.dtype, np.inexact))


results = []
for family, (mixer, options) in FAMILIES.items():
    config, command = config_for(mixer, options)
    print(command)
    t0 = time.perf_counter()
    out = run(config, out=io.StringIO())
    results.append(dict(family=family, mixer=mixer, params=out["num_params"],
                        accuracy=out["eval_accuracy"], long_accuracy=out["long_eval_accuracy"],
                        state=cache_floats(config, SEQ_LEN),
                        long_state=cache_floats(config, EVAL_SEQ_LEN),
                        history=out["history"], seconds=time.perf_counter() - t0))
    r = results[-1]
    print(f"  -> {mixer}: held-out accuracy {r['accuracy']:.3f} at {SEQ_LEN}, "
          f"{r['long_accuracy']:.3f} at {EVAL_SEQ_LEN}; {r['seconds']:.0f} s")

# %%
print(f"{'family':>36} {'mixer':>14} {'params':>8} {'acc@' + str(SEQ_LEN):>8} "
      f"{'acc@' + str(EVAL_SEQ_LEN):>8} {'state@' + str(SEQ_LEN):>10} "
      f"{'state@' + str(EVAL_SEQ_LEN):>10} {'s':>5}")
for r in results:
    print(f"{r['family']:>36} {r['mixer']:>14} {r['params']:>8,} {r['accuracy']:>8.3f} "
          f"{r['long_accuracy']:>8.3f} {r['state']:>10,} {r['long_state']:>10,} "
          f"{r['seconds']:>5.0f}")
assert all(np.isfinite(h["loss"]) for r in results for h in r["history"])

# %% [markdown]
# ## Accuracy at the training length and at 4x it
#
# A bar pair per family. Where the right bar drops, the memory learned the task at the length it
# saw and not beyond it.

# %%
fig, (ax, ax_state) = plt.subplots(1, 2, figsize=(12, 4.5))
x = np.arange(len(results))
ax.bar(x - 0.2, [r["accuracy"] for r in results], 0.4, label=f"length {SEQ_LEN} (trained)")
ax.bar(x + 0.2, [r["long_accuracy"] for r in results], 0.4, label=f"length {EVAL_SEQ_LEN}")
ax.axhline(1 / 15, ls=":", c="gray", lw=1)
ax.set_xticks(x, [r["mixer"] for r in results], rotation=30, ha="right")
ax.set(ylabel="held-out accuracy", ylim=(0, 1.05), title=f"induction heads, {STEPS} steps")
ax.legend(fontsize=8)
ax_state.bar(x - 0.2, [r["state"] for r in results], 0.4, label=f"{SEQ_LEN} tokens")
ax_state.bar(x + 0.2, [r["long_state"] for r in results], 0.4, label=f"{EVAL_SEQ_LEN} tokens")
ax_state.set_xticks(x, [r["mixer"] for r in results], rotation=30, ha="right")
ax_state.set(yscale="log", ylabel="decoding cache (floats, one sequence)",
             title="state: fixed or growing")
ax_state.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Learning curves
#
# Training-batch accuracy every few steps: some memories leave chance at once, some sit on a
# plateau and then jump (an induction circuit forming).

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for r in results:
    ax.plot([h["step"] for h in r["history"]], [h["accuracy"] for h in r["history"]],
            label=r["mixer"])
ax.axhline(1 / 15, ls=":", c="gray", lw=1)
ax.set(xlabel="step", ylabel="training accuracy (answer position)", ylim=(-0.02, 1.02))
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Going further
#
# * Every family's behaviour on its own paper's task has a preset (`configs/__init__.py`) and a
#   recorded run in `benchmarks/RESULTS.md`: e.g. `python -m train --preset niah_titans_mag`
#   (a needle beyond the attention window), `--preset rmt_copy` (copying across segments through
#   memory tokens), `--preset mqar16_deltanet` (the delta rule against additive memories).
# * The README's zoo table lists every mixer; swap any of them into `FAMILIES` above.
# * 400 steps is short for some families (their curves are still climbing): raise `STEPS`.
