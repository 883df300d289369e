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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memzoo/memzoo/blob/main/notebooks/03_kernels.ipynb)
#
# # The kernels: one shared op, end to end
#
# Every memory in memzoo computes through a small library of shared ops in `pallas_kernels/`,
# each written four times from one contract:
#
# | file | what | runs on |
# |---|---|---|
# | `reference.py` | the specification, plain `jnp` / `lax.scan`, obviously correct | anywhere |
# | `xla.py` | the fast path XLA compiles well | CPU (the default there), anywhere |
# | `pallas.py` | Pallas kernels: Mosaic for TPU, Triton for GPU | TPU, GPU; any machine in interpret mode |
# | `__init__.py` | the public op: checks, custom VJP, dispatch by `implementation=` | |
#
# This notebook takes one op, `linear_scan` (the diagonal linear recurrence
# `h_t = a_t * h_{t-1} + b_t` under S4D's recurrent mode, S5 and the HiPPO cells), through all of
# it on a CPU: the reference, the XLA path, the Pallas kernels in interpret mode and in TPU
# interpret mode, the lowering for TPU and GPU printed from this CPU, gradients through the custom
# VJP, and a benchmark measured here, drawn as a bar chart.

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
SMALL = (2, 40, 24)                                   # [batch, time, channels] for interpreters
BENCH_SHAPE = (2, 256, 64) if QUICK else (4, 2048, 512)
REPEATS = 3 if QUICK else 10

# %%
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from pallas_kernels import linear_scan, pallas_interpret
from pallas_kernels import _testing   # the test suite's helpers: float64 runs, lowering
from pallas_kernels._dispatch import tpu_interpret_params
from pallas_kernels.linear_scan import pallas as scan_pallas

print("jax", jax.__version__, "on", jax.devices()[0].platform)


def inputs(shape, seed=0):
    ka, kb, kh = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.uniform(ka, shape, jnp.float32, 0.5, 1.0)       # decays
    b = jax.random.normal(kb, shape, jnp.float32)
    h0 = jax.random.normal(kh, (shape[0], shape[2]), jnp.float32)  # state carried in
    return a, b, h0


a, b, h0 = inputs(SMALL)

# %% [markdown]
# ## 1. The reference: the specification
#
# `implementation="reference"` runs `reference.py`, a `lax.scan` nobody can misread. We run it in
# float64 once: that is the yardstick for every other implementation below (relative RMSE,
# `||x - ref|| / ||ref||`; the test suite asks for 1e-5 in float32).

# %%
ref_h, ref_final = _testing.float64_run(
    functools.partial(linear_scan, implementation="reference"), a, b, initial_state=h0)
print("h", ref_h.shape, ref_h.dtype, "  final state", ref_final.shape)
print("by hand, h_0 = a_0 h0 + b_0:", np.allclose(ref_h[:, 0], a[:, 0] * h0 + b[:, 0], atol=1e-6))


def report(name, out):
    h, final = out
    errs = _testing.rel_rmse(h, ref_h), _testing.rel_rmse(final, ref_final)
    print(f"{name:>40}: relative RMSE h {errs[0]:.1e}, final state {errs[1]:.1e}")
    assert max(errs) < 1e-5, (name, errs)

# %% [markdown]
# ## 2. The XLA path
#
# `implementation="xla"`: an in-place `fori_loop` over time that XLA compiles to a tight loop on a
# CPU. `"auto"` (the default) picks it on any platform but TPU and GPU.

# %%
report("reference, float32", linear_scan(a, b, initial_state=h0, implementation="reference"))
report("xla", jax.jit(functools.partial(linear_scan, implementation="xla"))(a, b,
                                                                           initial_state=h0))
report("auto (on this CPU: xla)", jax.jit(linear_scan)(a, b, initial_state=h0))

# %% [markdown]
# ## 3. The Pallas kernels, interpreted on this CPU
#
# `pallas_interpret(mode, target)` makes `"auto"` and `"pallas"` run the Pallas kernels through an
# interpreter, so their indexing, padding and state carrying are checked without the hardware:
#
# * `mode="generic"`: Pallas' interpreter, for the GPU (Triton) kernel or the TPU (Mosaic) one;
# * `mode="tpu"`: Pallas' TPU interpret mode, which models the TPU's grid order, VMEM scratch and
#   DMA, with race detection on and uninitialised memory filled with NaN (a kernel that reads
#   what it never wrote fails loudly).
#
# The mode is read when a function is traced, so build fresh jitted functions inside the context.

# %%
for mode, target in [("generic", "cuda"), ("generic", "tpu"), ("tpu", "tpu")]:
    with pallas_interpret(mode, target=target):
        t0 = time.perf_counter()
        out = jax.jit(functools.partial(linear_scan, implementation="pallas"))(
            a, b, initial_state=h0)
        report(f"pallas, {target} kernel, {mode} interpreter", out)
    print(f"{'':>42}({time.perf_counter() - t0:.1f} s, interpreters are slow)")

# %% [markdown]
# The kernels tile the arrays in blocks (`BlockSizes`, one default per target). The TPU kernel
# walks time in blocks of `block_t` rows, carrying the state in VMEM scratch from one grid step to
# the next; the GPU kernel gives each program `block_d` channels and walks all of time. Calling
# the kernel directly with small blocks makes this short input span several grid steps:

# %%
for target in ("tpu", "cuda"):
    print(target, "default:", scan_pallas.BlockSizes.get_default(target))
small = {"tpu": scan_pallas.BlockSizes(block_t=16, block_d=128),
         "cuda": scan_pallas.BlockSizes(block_t=0, block_d=8)}
# interpret=: TPU interpret mode for the TPU kernel, the generic interpreter for the GPU one.
for target, interpret in [("tpu", tpu_interpret_params()), ("cuda", True)]:
    out = scan_pallas.linear_scan_forward(a, b, h0, reverse=False, target=target,
                                          interpret=interpret, block_sizes=small[target])
    report(f"{target} kernel, {small[target]}", out)

# %% [markdown]
# ## 4. Lowering for TPU and GPU, from this CPU
#
# `"auto"` chooses its implementation when a function is *lowered*, with
# `jax.lax.platform_dependent`, not by looking at the devices while tracing. So a function traced
# here and lowered for `tpu` carries the Mosaic kernel, and for `cuda` the Triton one: the
# compiled kernel is the custom call in the module (its `backend_config` holds the serialized
# kernel, shortened here). `jax.export(..., platforms=("tpu",))` works the same way, so a model
# can be exported for a pod from a laptop.

# %%
def forward(a, b, h0):
    return linear_scan(a, b, initial_state=h0)


for platform in ("tpu", "cuda"):
    text = _testing.lower_for(forward, a, b, h0, platform=platform)
    calls = _testing.custom_calls(text)
    print(f"--- lowered for {platform}: custom calls {calls}")
    for line in text.splitlines():
        if _testing.CUSTOM_CALLS[platform] in line:
            print("   ", line.strip()[:220], "...")
    assert _testing.CUSTOM_CALLS[platform] in calls
print("--- lowered for cpu: custom calls", _testing.custom_calls(
    _testing.lower_for(forward, a, b, h0, platform="cpu")), "(the XLA path: plain HLO)")

# %% [markdown]
# ## 5. Gradients through the custom VJP
#
# Differentiating a scan with autodiff stores the state at every step for the backward pass. The
# op instead defines its own VJP: one fused pass against the scan's direction,
# `g_t = dh_t + a_{t+1} g_{t+1}`, `db_t = g_t`, `da_t = g_t h_{t-1}`, which needs only the forward
# output. Its gradients must equal autodiff of the reference (in float64), for the XLA path and
# for the Pallas backward kernels alike. `jax.make_jaxpr` shows the custom VJP in the program.

# %%
w = jax.random.normal(jax.random.key(9), SMALL)   # a loss that weights every output differently


def loss(implementation, a, b, h0):
    h, final = linear_scan(a, b, initial_state=h0, implementation=implementation)
    return jnp.sum(w * h) + jnp.sum(final ** 2)


grads_of = {impl: jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2))
            for impl in ("reference", "xla", "pallas")}
ref_grads = _testing.float64_run(grads_of["reference"], a, b, h0)
primitives = {e.primitive.name for e in jax.make_jaxpr(functools.partial(loss, "xla"))(
    a, b, h0).jaxpr.eqns}
print("primitives of the loss:", sorted(primitives))


def report_grads(name, grads):
    errs = [_testing.rel_rmse(g, r) for g, r in zip(grads, ref_grads)]
    print(f"{name:>40}: relative RMSE da {errs[0]:.1e}, db {errs[1]:.1e}, dh0 {errs[2]:.1e}")
    assert max(errs) < 1e-5, (name, errs)


report_grads("xla (custom VJP)", jax.jit(grads_of["xla"])(a, b, h0))
with pallas_interpret("generic", target="cuda"):
    report_grads("pallas, cuda kernel, generic interpreter", jax.jit(grads_of["pallas"])(a, b, h0))
with pallas_interpret("tpu"):
    report_grads("pallas, tpu kernel, TPU interpret mode", jax.jit(grads_of["pallas"])(a, b, h0))

# %% [markdown]
# ## 6. How fast, measured here
#
# The XLA path against what one would write without memzoo: a `lax.scan` over time and
# `lax.associative_scan` (log-depth, more arithmetic). If the
# [recurrentgemma](https://github.com/google-deepmind/recurrentgemma) package is installed, its
# scans join the table; it is not needed. Timings are medians of `REPEATS` calls after a warm-up
# call (compilation excluded), forward alone and forward + backward (`jax.grad` of the sum). On a
# TPU or GPU, `"auto"` would time the Pallas kernels instead. The project's own table
# (`python -m benchmarks linear_scan`, results in `benchmarks/RESULTS.md`) adds machine ceilings
# and donated-buffer timings.

# %%
def lax_scan(a, b):
    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h
    last, hs = jax.lax.scan(step, jnp.zeros_like(b[:, 0]),
                            (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
    return jnp.swapaxes(hs, 0, 1), last


def associative(a, b):
    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]
    _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
    return h, h[:, -1]


candidates = {
    "memzoo linear_scan (xla)": lambda a, b: linear_scan(a, b, implementation="xla"),
    "jax.lax.scan": lax_scan,
    "jax.lax.associative_scan": associative,
}
if importlib.util.find_spec("recurrentgemma") is not None:
    from recurrentgemma import common as rg_common
    from recurrentgemma.jax import scan as rg_scan
    for kind in ("LINEAR_NATIVE", "ASSOCIATIVE_NATIVE"):
        candidates[f"recurrentgemma {kind.lower()}"] = functools.partial(
            lambda a, b, kind: rg_scan.linear_scan(b, a, scan_type=rg_common.ScanType[kind]),
            kind=kind)
else:
    print("recurrentgemma not installed: its bars are left out")


def median_ms(fn, *args):
    jax.block_until_ready(fn(*args))                      # compile and warm up
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


ba, bb, _ = inputs(BENCH_SHAPE, seed=1)
ba = ba * 0.5                                             # decays in [0.25, 0.5]
check = candidates["memzoo linear_scan (xla)"](ba, bb)[0]
timings = {}
for name, fn in candidates.items():
    np.testing.assert_allclose(fn(ba, bb)[0], check, rtol=1e-4, atol=1e-4)  # same answer
    fwd = median_ms(jax.jit(fn), ba, bb)
    bwd = median_ms(jax.jit(jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b)[0]), argnums=(0, 1))),
                    ba, bb)
    timings[name] = (fwd, bwd)
    print(f"{name:>34}: forward {fwd:8.2f} ms   forward+backward {bwd:8.2f} ms")

# %%
names = list(timings)
ours = timings["memzoo linear_scan (xla)"]
fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.8))
y = np.arange(len(names))
ax.barh(y - 0.2, [timings[n][0] for n in names], 0.4, label="forward")
ax.barh(y + 0.2, [timings[n][1] for n in names], 0.4, label="forward + backward")
for i, n in enumerate(names):
    for j, off in ((0, -0.2), (1, 0.2)):
        ax.text(timings[n][j], i + off, f" {timings[n][j]:.1f} ms ({timings[n][j] / ours[j]:.1f}x)",
                va="center", fontsize=8)
ax.set_yticks(y, names)
ax.invert_yaxis()
ax.set_xscale("log")
ax.set_xlim(right=4 * max(max(t) for t in timings.values()))   # room for the labels
ax.set_xlabel("median ms, log scale (ratio to memzoo's in brackets)")
B, T, D = BENCH_SHAPE
ax.set_title(f"linear_scan, float32 [batch {B}, time {T}, channels {D}]\n"
             f"on this {jax.devices()[0].platform}, measured by this notebook", fontsize=10)
ax.legend(loc="best", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Where to go next
#
# * The other shared ops follow the same contract (`pallas_kernels/`: chunked linear attention,
#   the delta rule, the selective scan, the causal convolution, as they land); their tests in
#   `tests/pallas_kernels/` run exactly the checks above.
# * `python -m benchmarks` times every family against its peers with this machine's ceilings.
