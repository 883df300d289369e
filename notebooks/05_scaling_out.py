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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memzoo/memzoo/blob/main/notebooks/05_scaling_out.ipynb)
#
# # Scaling out: one training run on 1 and on 8 devices
#
# `python -m train` lays every run on a device mesh with four named axes:
#
# | axis | splits | what it buys |
# |---|---|---|
# | `data` | the batch | throughput; each device holds a full copy of the weights |
# | `fsdp` | the batch *and* the weights (ZeRO-3) | memory: weights, gradients and Adam state are spread out and gathered per use |
# | `tensor` | heads, MLP width, vocabulary (Megatron style) | memory and compute of one layer, for wide models |
# | `sequence` | the time axis of activations | long sequences; the scans carry state across the split |
#
# This notebook runs the same training on one device and on eight, prints the mesh and where
# every parameter lives, and checks that both give the same losses. The eight devices are
# simulated on this CPU (XLA's `--xla_force_host_platform_device_count`), which is how the
# sharding is developed and tested before a pod is ever booked: the program that runs on eight
# fake CPU devices is the program that runs on eight TPU chips.

# %%
# Install memzoo (skipped when it is already importable, e.g. in a checkout or on a second run).
import importlib.util

if importlib.util.find_spec("memzoo") is None:
    # %pip install -q "memzoo @ git+https://github.com/memzoo/memzoo"
    pass

# %% tags=["parameters"]
# Eight simulated CPU devices: XLA reads this flag once, when JAX starts, so it is set before
# anything imports jax. Sizes: MEMZOO_NOTEBOOK_QUICK=1 (set by the project's CI) shrinks the run
# to a smoke test; a colab user gets the full size.
import os
import sys

NUM_DEVICES = 8
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
if "jax" in sys.modules:
    print("jax was imported before this cell: if fewer than 8 devices show up below, restart the "
          "runtime (Runtime > Restart session) and run from the top")

QUICK = os.environ.get("MEMZOO_NOTEBOOK_QUICK", "0") == "1"
MIXER = "attention" if QUICK else "s4d,attention"   # quick: one layer of one family compiles faster
NUM_LAYERS = 1 if QUICK else 2
STEPS = 12 if QUICK else 200
D_MODEL = 16 if QUICK else 64
SEQ_LEN = 16 if QUICK else 64
BATCH = 16 if QUICK else 32
LOG_EVERY = 3 if QUICK else 10
EVAL_BATCHES = 1 if QUICK else 4
VOCAB = 16                                             # delayed recall's vocabulary
MESH_8 = dict(data=2, fsdp=2, tensor=2, sequence=1)   # 2 x 2 x 2 = 8 devices

# %%
import io
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np

import configs
from train import mesh as mesh_lib
from train.loop import run
from flax import nnx
from train.trainer import build_model

devices = jax.devices("cpu")   # host devices, also on a GPU or TPU runtime
print("jax", jax.__version__, "|", len(devices), "CPU devices:", devices)
assert len(devices) >= NUM_DEVICES, "restart the runtime and run from the top (see above)"

# %% [markdown]
# ## The run
#
# A two-layer hybrid, S4D then attention (one attention layer in quick mode), on delayed recall
# (predict the token seen 4 steps earlier). The config is the default preset with `--set` overrides, exactly as on the command
# line; only the `mesh.*` keys differ between the two runs.

# %%
SETS = [f"model.mixer={MIXER}", f"model.d_model={D_MODEL}", f"model.num_layers={NUM_LAYERS}",
        f"data.seq_len={SEQ_LEN}", f"data.batch_size={BATCH}", f"data.eval_batches={EVAL_BATCHES}",
        f"optim.steps={STEPS}", f"optim.warmup_steps={max(1, STEPS // 10)}",
        f"logging.log_every={LOG_EVERY}", "checkpoint.every=0", "logging.tensorboard=false"]
mesh_sets_1 = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.sequence=1"]
mesh_sets_8 = [f"mesh.{k}={v}" for k, v in MESH_8.items()]
config_1 = configs.resolve(sets=SETS + mesh_sets_1)
config_8 = configs.resolve(sets=SETS + mesh_sets_8)
print("python -m train " + " ".join(f"--set {s}" for s in SETS + mesh_sets_8))

# %% [markdown]
# ## The mesh and the shardings
#
# `train.mesh.make_mesh` arranges the devices in a `(data, fsdp, tensor, sequence)` grid. Every
# parameter in memzoo names its axes logically when it is created (`embed`, `mlp`, `heads`,
# `vocab`, `state`...), and one table, `train.mesh.LOGICAL_AXIS_RULES`, maps those names onto mesh
# axes. Changing the parallelism is a change of mesh sizes (or of that table), never of a model.

# %%
mesh = mesh_lib.make_mesh(config_8.mesh, devices[:NUM_DEVICES])
print("mesh:", dict(mesh.shape))
print(mesh.devices)
print("\nlogical axis -> mesh axis:")
for name, axis in mesh_lib.LOGICAL_AXIS_RULES:
    print(f"  {name:>9} -> {axis}")

# %%
# What the Trainer does when it builds the sharded state: the model's shapes without allocating
# anything (nnx.eval_shape), each parameter's logical names, and the mesh axes they map to.
abstract_model = nnx.eval_shape(lambda: build_model(config_8, VOCAB, nnx.Rngs(0)))
params = nnx.state(abstract_model, nnx.Param)
shardings = mesh_lib.state_shardings(params, mesh)


def unwrap(v):
    return v.get_value() if isinstance(v, nnx.Variable) else v


print(f"{'parameter':<42} {'shape':>12}  {'logical axes':<28} partition spec")
for (path, var), (_, sh) in zip(nnx.to_flat_state(params), nnx.to_flat_state(shardings)):
    names = var.get_metadata().get("out_sharding")
    spec = unwrap(sh).spec
    print(f"{'/'.join(map(str, path)):<42} {str(tuple(var.get_value().shape)):>12}  "
          f"{str(tuple(names) if names else ()):<28} {spec}")

# %% [markdown]
# Reading the table: the embedding `[vocab, embed]` is split over `tensor` (vocabulary) and `fsdp`
# (model width); attention's projections over `tensor` by heads and `fsdp` by width; the MLP over
# `tensor` by hidden units; S4D's state matrices are replicated on the `state` axis (small, and
# every step of the scan touches all of it); a dimension the mesh cannot divide is replicated.
# The batch goes over `data` x `fsdp`: each of those 4 groups of devices sees 1/4 of the rows.
# Here is how the embedding lies on the devices (`jax.debug.visualize_array_sharding`): each block
# of the `[vocab, embed]` matrix and the devices that hold it.

# %%
flat_shardings = dict(nnx.to_flat_state(shardings))
embed_sharding = unwrap(flat_shardings[("embed",)])
embed = jax.device_put(np.zeros((VOCAB, D_MODEL), np.float32), embed_sharding)
print("embedding", embed.shape, embed.sharding.spec)
jax.debug.visualize_array_sharding(embed)

# %% [markdown]
# ## One device, then eight
#
# `train.loop.run(config, devices=...)` is `python -m train` as a function. The same config,
# seeds and batches, on one device and on the 2 x 2 x 2 mesh. Sharding changes how the arithmetic
# is split (reductions are summed in a different order across devices), not what is computed, so
# the losses agree to float32 rounding.

# %%
results = {}
for label, config, devs in [("1 device", config_1, devices[:1]),
                            (f"{NUM_DEVICES} devices", config_8, devices[:NUM_DEVICES])]:
    log = io.StringIO()
    out = run(config.replace(run_dir=tempfile.mkdtemp()), out=log, devices=devs)
    results[label] = out
    print(f"--- {label}")
    print("\n".join(line for line in log.getvalue().splitlines()
                    if line.startswith(("devices:", "model:", "compiled", "eval:", "final:"))))

# %%
h1, h8 = (results[k]["history"] for k in results)
loss_1 = np.array([h["loss"] for h in h1])
loss_8 = np.array([h["loss"] for h in h8])
print("step      loss (1 device)   loss (8 devices)   relative difference")
for h, l1, l8 in zip(h1, loss_1, loss_8):
    print(f"{h['step']:>4}   {l1:16.6f}   {l8:16.6f}   {abs(l1 - l8) / abs(l1):.1e}")
assert np.all(np.isfinite(loss_1)) and np.allclose(loss_1, loss_8, rtol=1e-3), (loss_1, loss_8)

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([h["step"] for h in h1], loss_1, "o-", label="1 device", ms=4)
ax.plot([h["step"] for h in h8], loss_8, "x--", label=f"{NUM_DEVICES} devices, mesh "
        f"{MESH_8['data']}x{MESH_8['fsdp']}x{MESH_8['tensor']} (data x fsdp x tensor)")
ax.set(xlabel="step", ylabel="training loss", yscale="log",
       title="the same run on one device and on eight")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# On simulated CPU devices eight is not faster than one (they share the same cores); the point is
# that the program is right. On real chips the per-device work shrinks with the mesh.
#
# ## On a pod
#
# The same command, on every host of the slice (one process per host, each seeing its local
# chips; `jax.distributed` joins them into one set of devices):
#
# ```bash
# # TPU pod slice, e.g. 4 hosts x 4 chips = 16 devices: 2-way data, 4-way fsdp, 2-way tensor
# python -m train --preset mqar_attention --distributed \
#     --set mesh.data=2 --set mesh.fsdp=4 --set mesh.tensor=2 \
#     --set data.batch_size=256 --set run_dir=gs://my-bucket/runs/mqar
# # elsewhere (GPU clusters, several processes by hand):
# python -m train ... --coordinator_address HOST0:1234 --num_processes 4 --process_id $RANK
# ```
#
# Choosing the mesh:
#
# * Start with `data` only (`mesh.data=-1`, the default: all devices). Move devices to `fsdp` when
#   the weights plus Adam state (about 16 bytes per parameter in float32) no longer fit one
#   device, and to `tensor` when a single layer's activations or weights are too wide (keep
#   `tensor` within a host, where the interconnect is fastest). Use `sequence` for sequences
#   too long for one device's activations.
# * `data.batch_size` is the global batch: it must divide by `data x fsdp` (and by the number of
#   processes); each process feeds only its own rows (the grain loader shards by process).
# * Checkpoints (orbax) are written by all hosts together and restore onto a different mesh, so a
#   run can move from 16 chips to 64 by changing `mesh.*` and rerunning the same command.
# * `model.scan_layers=true` compiles one layer whatever the depth (compile time on a pod
#   matters); `model.remat=full` trades compute for activation memory.
# * Before booking the pod, run the exact command here with the pod's mesh shape on simulated
#   devices (`XLA_FLAGS=--xla_force_host_platform_device_count=16`) and a tiny model: sharding
#   errors show up in seconds.
