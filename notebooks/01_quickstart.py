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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memzoo/memzoo/blob/main/notebooks/01_quickstart.ipynb)
#
# # Quickstart: a memzoo memory inside your own model
#
# Every memory in memzoo is a *mixer*: a Flax NNX module `[batch, time, d_model] -> [batch, time,
# d_model]`, registered by name in `memzoo.MIXERS`, with two forms that compute the same thing:
#
# * the **parallel** form `y = mixer(x)`, what you train with;
# * the **recurrent** form `y_t, cache = mixer.step(x_t, cache)`, what you decode with, one token
#   at a time from `cache = mixer.init_cache(batch)`.
#
# This notebook puts a mixer inside a small NNX language model of our own, then inside a Linen
# model through `nnx.bridge`, runs both forms and checks that they agree, and looks at the module
# with treescope. It runs on a CPU runtime in a minute or two.

# %%
# Install memzoo (skipped when it is already importable, e.g. in a checkout or on a second run).
import importlib.util

if importlib.util.find_spec("memzoo") is None:
    # %pip install -q "memzoo @ git+https://github.com/memzoo/memzoo"
    pass

# %% tags=["parameters"]
# Sizes. MEMZOO_NOTEBOOK_QUICK=1 (set by the project's CI) shrinks the run to a smoke test;
# a colab user gets the full size.
import os

QUICK = os.environ.get("MEMZOO_NOTEBOOK_QUICK", "0") == "1"
BATCH = 2
LENGTH = 16 if QUICK else 128          # tokens per sequence
D_MODEL = 16 if QUICK else 64
VOCAB = 32

# %%
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import treescope
from flax import nnx

import memzoo

print("jax", jax.__version__, "on", jax.devices()[0].platform)
print("registered mixers:", list(memzoo.MIXERS))

# %% [markdown]
# ## 1. A mixer by name
#
# `memzoo.MIXERS[name](d_model, rngs=..., **options)` builds one. Options differ by family
# (`state_size` for the state-space models, `num_heads` for attention); `memzoo.accepts_keyword`
# tells which a constructor takes, which is how the helper below passes `state_size` only where
# it means something.

# %%
def build_mixer(name, d_model, *, seed=0, **options):
    ctor = memzoo.MIXERS[name]
    init = ctor.__init__ if isinstance(ctor, type) else ctor
    taken = {k: v for k, v in options.items() if memzoo.accepts_keyword(init, k)}
    return ctor(d_model, rngs=nnx.Rngs(seed), **taken)


s4d = build_mixer("s4d", D_MODEL, state_size=16)
x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, D_MODEL))
print("S4D:", x.shape, "->", s4d(x).shape)

# %% [markdown]
# ## 2. Inside your own NNX model
#
# An embedding, a memzoo mixer, a readout. The model has the same two forms as its mixer:
# `__call__` over a whole sequence and `step` over one token with a cache. Mixers whose state
# grows with the sequence (attention's KV cache) take `max_len` in `init_cache`.

# %%
class TinyLM(nnx.Module):
    def __init__(self, mixer: str, *, vocab=VOCAB, d_model=D_MODEL, seed=0, **options):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.memory = build_mixer(mixer, d_model, seed=seed + 1, **options)
        self.readout = nnx.Linear(d_model, vocab, rngs=rngs)

    def __call__(self, tokens):                      # [b, t] -> [b, t, vocab]
        return self.readout(self.memory(self.embed(tokens)))

    def init_cache(self, batch_size, max_len):
        if memzoo.accepts_keyword(self.memory.init_cache, "max_len"):
            return self.memory.init_cache(batch_size, max_len=max_len)
        return self.memory.init_cache(batch_size)

    def step(self, token_t, cache):                  # [b] -> [b, vocab]
        y_t, cache = self.memory.step(self.embed(token_t), cache)
        return self.readout(y_t), cache


@nnx.jit
def parallel(model, tokens):
    return model(tokens)


@nnx.jit
def step_by_step(model, tokens):
    """Decode token by token: a lax.scan over time carrying the mixer's cache."""
    def body(cache, token_t):
        logits_t, cache = model.step(token_t, cache)
        return cache, logits_t
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    _, logits = jax.lax.scan(body, cache, tokens.T)   # scan over the time axis
    return logits.swapaxes(0, 1)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, VOCAB)
model = TinyLM("s4d", state_size=16)
y_par = parallel(model, tokens)
y_seq = step_by_step(model, tokens)
err = rel_err(y_seq, y_par)
print(f"S4D in TinyLM: parallel {y_par.shape}, step-by-step {y_seq.shape}, "
      f"relative difference {err:.2e}")
assert err < 1e-4, err

# %% [markdown]
# S4D's parallel form is a long convolution computed with an FFT; its step form is a diagonal
# complex recurrence. They agree to float32 rounding.
#
# The same check for the other registered memories (the list grows as families land). Each
# mixer family keeps this contract; memzoo's tests check it for every one of them.

# %%
names = ["attention"] if QUICK else [n for n in memzoo.MIXERS if n != "s4d"]
for name in names:
    try:
        m = TinyLM(name, state_size=16)
    except (TypeError, ValueError) as e:   # a family that needs options this demo does not set
        print(f"{name:>18}: skipped ({e})")
        continue
    t0 = time.perf_counter()
    err = rel_err(step_by_step(m, tokens), parallel(m, tokens))
    print(f"{name:>18}: parallel vs step-by-step relative difference {err:.2e} "
          f"({time.perf_counter() - t0:.1f} s with compilation)")
    assert err < 1e-4, (name, err)

# %% [markdown]
# ## 3. Prefill, then decode
#
# Generation reads a prompt in the parallel form and continues token by token:
# `mixer(x, cache=cache)` returns the cache after `x`, ready for `step`.

# %%
@nnx.jit(static_argnames="split")
def prefill_then_decode(model, tokens, split):
    x = model.embed(tokens)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    y_prompt, cache = model.memory(x[:, :split], cache=cache)
    def body(cache, x_t):
        y_t, cache = model.memory.step(x_t, cache)
        return cache, y_t
    _, y_rest = jax.lax.scan(body, cache, x[:, split:].swapaxes(0, 1))
    return model.readout(jnp.concatenate([y_prompt, y_rest.swapaxes(0, 1)], axis=1))


err = rel_err(prefill_then_decode(model, tokens, LENGTH // 2), y_par)
print(f"prefill {LENGTH // 2} tokens, decode {LENGTH - LENGTH // 2}: relative difference "
      f"{err:.2e}")
assert err < 1e-4, err

# %% [markdown]
# ## 4. Inside a Linen model, through the bridge
#
# `nnx.bridge.to_linen(MixerClass, *args, **kwargs)` wraps an NNX module as a Linen submodule:
# its parameters live in the Linen `params` collection like any other layer's, and
# `nnx_method="step"` calls the recurrent form.

# %%
class LinenLM(nn.Module):
    mixer: str = "s4d"
    vocab: int = VOCAB
    d_model: int = D_MODEL

    def setup(self):
        self.embed = nn.Embed(self.vocab, self.d_model)
        self.memory = nnx.bridge.to_linen(memzoo.MIXERS[self.mixer], self.d_model, state_size=16)
        self.readout = nn.Dense(self.vocab)

    def __call__(self, tokens):
        return self.readout(self.memory(self.embed(tokens)))

    def init_cache(self, batch_size):
        return self.memory(batch_size, nnx_method="init_cache")

    def step(self, token_t, cache):
        y_t, cache = self.memory(self.embed(token_t), cache, nnx_method="step")
        return self.readout(y_t), cache


linen_model = LinenLM()
variables = linen_model.init(jax.random.key(2), tokens)
print(jax.tree.map(jnp.shape, nn.meta.unbox(variables["params"]["memory"])))


@jax.jit
def linen_step_by_step(variables, tokens):
    cache = linen_model.apply(variables, tokens.shape[0], method=LinenLM.init_cache)
    def body(cache, token_t):
        logits_t, cache = linen_model.apply(variables, token_t, cache, method=LinenLM.step)
        return cache, logits_t
    _, logits = jax.lax.scan(body, cache, tokens.T)
    return logits.swapaxes(0, 1)


y_linen = jax.jit(linen_model.apply)(variables, tokens)
err = rel_err(linen_step_by_step(variables, tokens), y_linen)
print(f"Linen model: parallel vs step-by-step relative difference {err:.2e}")
assert err < 1e-4, err

# %% [markdown]
# The Linen parameters are the NNX module's parameters: load them into a fresh NNX S4D (built
# with a different seed, so the values can only come from Linen) and it computes the same layer.

# %%
fresh = build_mixer("s4d", D_MODEL, seed=99, state_size=16)
graphdef, state = nnx.split(fresh)
nnx.replace_by_pure_dict(state, nn.meta.unbox(variables["params"]["memory"]))
loaded = nnx.merge(graphdef, state)
h = linen_model.apply(variables, tokens, method=lambda m, t: m.embed(t))
y_bridge = linen_model.apply(variables, h, method=lambda m, x: m.memory(x))
err = rel_err(loaded(h), y_bridge)
print(f"NNX S4D with the Linen parameters vs the bridged layer: relative difference {err:.2e}")
assert err < 1e-5, err

# %% [markdown]
# ## 5. Look inside with treescope
#
# treescope renders NNX modules and Linen variables as foldable trees, with array summaries
# (shape, dtype, range) and, for arrays, a heat map on click. Every parameter carries its logical
# sharding axes (`embed`, `state`...), which `python -m train` maps onto a device mesh.

# %%
treescope.basic_interactive_setup(autovisualize_arrays=True)
model

# %%
treescope.display(nn.meta.unbox(variables["params"]))

# %% [markdown]
# ## 6. A whole language model
#
# `memzoo.models.CausalLM` stacks pre-norm blocks from a pattern of mixer names ("s4d,attention"
# is a hybrid), and `memzoo.generate.generate` prefills a prompt and decodes. The same model is
# what `python -m train` trains.

# %%
from memzoo.generate import generate
from memzoo.models import CausalLM

lm = CausalLM(vocab_size=VOCAB, d_model=D_MODEL, num_layers=2, mixer="s4d,attention",
              mixer_options={"state_size": 16}, rngs=nnx.Rngs(0))
print("parameters:", sum(p.size for p in jax.tree.leaves(nnx.state(lm, nnx.Param))))
out = generate(lm, tokens[:, :4], num_tokens=8)
print("8 tokens generated after a 4-token prompt (untrained, so noise):\n", np.asarray(out))

# %% [markdown]
# ## 7. Load a reference implementation's weights
#
# `memzoo.convert` builds a `CausalLM` from the checkpoints of mamba-ssm, flash-linear-attention
# and recurrentgemma (README, "Load a checkpoint"; `python -m memzoo.convert DIR` on the command
# line). Here recurrentgemma's own Griffin (JAX) is built in the notebook with random weights,
# converted, and the two models' logits compared. The next cell installs recurrentgemma on colab;
# elsewhere the comparison runs where it is importable.

# %%
import sys

if importlib.util.find_spec("recurrentgemma") is None and "google.colab" in sys.modules:
    # %pip install -q "recurrentgemma[jax]"
    pass

# %%
from memzoo.convert.recurrentgemma import flatten, from_recurrentgemma, to_recurrentgemma

if importlib.util.find_spec("recurrentgemma") is not None:
    import recurrentgemma.jax as rg
    from recurrentgemma import common

    rg_config = common.GriffinConfig(
        vocab_size=VOCAB, width=32, mlp_expanded_width=64, num_heads=4,
        block_types=(common.TemporalBlockType.RECURRENT, common.TemporalBlockType.RECURRENT,
                     common.TemporalBlockType.ATTENTION),
        embeddings_scale_by_sqrt_dim=True, attention_window_size=8, logits_soft_cap=30.0)
    reference = rg.Griffin(rg_config)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape)
    rg_params = reference.init(jax.random.key(2), tokens, positions)
    rg_logits, _ = reference.apply(rg_params, tokens, positions, return_cache=False)

    griffin_lm = from_recurrentgemma(rg_params, rg_config)   # a memzoo CausalLM
    ours = griffin_lm(tokens)
    rmse = float(jnp.linalg.norm(ours - rg_logits) / jnp.linalg.norm(rg_logits))
    print(f"memzoo's Griffin vs recurrentgemma's: logits relative RMSE {rmse:.1e}")
    # ...and back to recurrentgemma's parameter tree, array for array.
    back, original = flatten(to_recurrentgemma(griffin_lm, rg_config)), flatten(rg_params)
    same = back.keys() == original.keys() and all(
        np.array_equal(back[k], original[k]) for k in original)
    print("round trip exact:", same)
else:
    print("recurrentgemma is not installed here: `pip install 'recurrentgemma[jax]'` to compare")

# %% [markdown]
# Next: `02_mqar_frontier` trains these memories on associative recall and plots what their state
# size buys; `03_kernels` opens up the shared op underneath the SSMs.
