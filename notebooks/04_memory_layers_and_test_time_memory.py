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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memzoo/memzoo/blob/main/notebooks/04_memory_layers_and_test_time_memory.ipynb)
#
# # Memory layers and test-time memory
#
# Two memories that are not a recurrent state carried by a mixer:
#
# * **A memory layer** (product-key memory; "memory layers at scale") replaces a block's MLP with a
#   huge table of value rows of which each token reads only its top-k: parameters grow without
#   active FLOPs growing. Its published gains are largest on **factual knowledge**, so we train it
#   on a synthetic world of individuals and their attributes (as in "How do language models learn
#   facts?") against a dense SwiGLU MLP of no fewer active FLOPs.
# * **A test-time memory** (Titans' neural memory) is a small MLP whose weights are trained *while
#   the model reads*, by gradient descent on an associative loss with momentum and forgetting. In
#   Titans-MAG it runs beside a sliding-window attention: we hide a needle farther back than the
#   window can see and ask for it at the end (single needle in a haystack).
#
# Both comparisons are `train.loop.run(config)` on the presets `python -m train --preset ...`
# runs, with the same overrides a shell user would pass. Every number and plot comes from this run.

# %%
# Install memzoo (skipped when it is already importable, e.g. in a checkout or on a second run).
import importlib.util

if importlib.util.find_spec("memzoo") is None:
    # %pip install -q "memzoo @ git+https://github.com/memzoo/memzoo"
    pass

# %% tags=["parameters"]
# Sizes. MEMZOO_NOTEBOOK_QUICK=1 (set by the project's CI) shrinks every run to a smoke test; a
# colab user gets the full size (the presets' own schedules, shortened to fit a free CPU runtime:
# a few minutes per run, the table below prints each run's time).
import os

QUICK = os.environ.get("MEMZOO_NOTEBOOK_QUICK", "0") == "1"
FACT_STEPS = 12 if QUICK else None   # None: the preset's own schedule
NIAH_STEPS = 12 if QUICK else None
BATCH = 8 if QUICK else None          # None: the preset's batch
LAYERS = 1 if QUICK else None         # None: the preset's depth (2)
EVAL_BATCHES = 1 if QUICK else 8
LOG_EVERY = 4 if QUICK else 25

# %%
import io
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import configs
from train.loop import run

print("jax", jax.__version__, "on", jax.device_count(), "x", jax.devices()[0].platform)


def train(preset: str, steps=None, extra=()):
    """One run of `python -m train --preset PRESET` with the notebook's sizes (steps None: the
    preset's); returns its metrics, history, parameter count and the equivalent command."""
    sets = [f"data.eval_batches={EVAL_BATCHES}", f"logging.log_every={LOG_EVERY}",
            "checkpoint.every=0", "logging.tensorboard=false", "logging.progress=false", *extra]
    if steps:
        sets += [f"optim.steps={steps}", f"optim.warmup_steps={max(1, steps // 12)}",
                 f"logging.eval_every={steps}"]
    if BATCH:
        sets.append(f"data.batch_size={BATCH}")
    if LAYERS:
        sets.append(f"model.num_layers={LAYERS}")
    config = configs.resolve(preset=preset, sets=sets)
    config = config.replace(run_dir=tempfile.mkdtemp())
    command = f"python -m train --preset {preset} " + " ".join(f"--set '{s}'" for s in sets)
    print(command)
    t0 = time.perf_counter()
    out = run(config, out=io.StringIO())
    seconds = time.perf_counter() - t0
    params = out["num_params"]
    print(f"  -> held-out accuracy {out['eval_accuracy']:.3f}, loss {out['eval_loss']:.3f}, "
          f"{params:,} parameters, {seconds:.0f} s")
    return dict(preset=preset, accuracy=out["eval_accuracy"], loss=out["eval_loss"],
                history=out["history"], params=params, seconds=seconds, config=config)


def curves(ax, results, title, chance):
    for r in results:
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h["accuracy"] for h in r["history"]], label=r["preset"])
    ax.axhline(chance, ls=":", c="gray", lw=1)
    ax.text(0.01, chance, "chance", transform=ax.get_yaxis_transform(), va="bottom",
            fontsize=8, color="gray")
    ax.set(xlabel="step", ylabel="training accuracy (answer positions)", ylim=(-0.02, 1.02),
           title=title)
    ax.legend(fontsize=8)


# %% [markdown]
# ## 1. Product-key memory against a dense MLP on factual recall
#
# The world: individuals with two-token names (first, last), each with a few attributes whose
# values are fixed once for the whole dataset. A sequence is a list of facts
# `first last attribute value`; the value can only come from the weights, because each individual
# appears rarely and never with the same fact earlier in the context. The two models differ only
# in the MLP slot of each block: `factual_recall_dense` has a SwiGLU MLP, `factual_recall_pkm` a
# product-key memory (`model.mlp=pkm`) with 4096 slots read top-8 per head, whose active FLOPs
# per token are no more than the dense MLP's (the arithmetic is in `configs/factual_recall.py`).

# %%
facts = [train("factual_recall_dense", FACT_STEPS), train("factual_recall_pkm", FACT_STEPS)]
fact_chance = 1 / facts[0]["config"].data.task_options["num_values"]

# %% [markdown]
# ## 2. Titans-MAG against sliding-window attention on a needle beyond the window
#
# `niah_swa` is two layers of sliding-window attention that sees 16 tokens back;
# `niah_titans_mag_linear` is the same window attention gated with a neural memory: here the
# linear memory (one matrix per head, written by one gradient step per token on
# ||M k - v||^2 with a data-dependent learning rate and forgetting, which is the gated delta
# rule, run in parallel chunks). The needle `[NEEDLE, key, value]` is anywhere in 128 tokens,
# mostly far outside the window; the query `[QUERY, key]` comes last. Two stacked 16-token
# windows see at most about a quarter of the needle positions, so the window-only model is
# capped far below 1 however long it trains.

# %%
needles = [train("niah_swa", NIAH_STEPS), train("niah_titans_mag_linear", NIAH_STEPS)]
niah_chance = 1 / 30   # the value is one of 30 tokens (configs/niah.py)

# %%
print(f"{'preset':>24} {'parameters':>11} {'held-out acc.':>14} {'loss':>7} {'s':>5}")
for r in facts + needles:
    print(f"{r['preset']:>24} {r['params']:>11,} {r['accuracy']:>14.3f} {r['loss']:>7.3f} "
          f"{r['seconds']:>5.0f}")
assert all(np.isfinite(r["loss"]) for r in facts + needles)

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
curves(axes[0], facts, "factual recall", fact_chance)
curves(axes[1], needles, "needle beyond a 16-token window", niah_chance)
names = [r["preset"] for r in facts + needles]
axes[2].barh(names, [r["accuracy"] for r in facts + needles],
             color=["tab:blue", "tab:orange", "tab:blue", "tab:orange"])
axes[2].set(xlim=(0, 1.02), xlabel="held-out accuracy", title="held out, end of training")
axes[2].invert_yaxis()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Going further
#
# * The memory layer's value table can be shared by several layers (`shared_values`) and sharded
#   along its embedding dimension over a mesh axis; its rows train with their own learning rate
#   (`optim.lr_multipliers.memory_values`). See `memzoo/memory_layers/` and
#   `python -m train --help`.
# * The other Titans variants and the Miras rules run from the same presets:
#   `--preset niah_titans_mag` (a 2-layer memory MLP with momentum), `--preset niah_titans_mal`,
#   `--preset niah_titans_mac`, and the Miras memories as mixers of their own
#   (`--preset niah_swa --set model.mixer=yaad`, likewise `moneta`, `memora`; see
#   `memzoo/neural_memory/`).
# * Longer schedules (the presets' own `optim.steps`) give the converged numbers recorded in
#   `benchmarks/RESULTS.md`.
