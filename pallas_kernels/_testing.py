"""Shared test helpers for every op (used by tests/pallas_kernels and by later ops' tests).

* `float64_run(fn, *args)`: run `fn` in float64 (complex128) on upcast copies of the arguments:
  the reference every fast path is compared with.
* `rel_rmse(x, ref)` and `assert_close(x, ref, tol, what)`: relative RMSE ||x - ref|| / ||ref||;
  NaN or inf never passes.
* `nan_like(x)`: NaN poisoning of buffers a kernel must overwrite. The Pallas runners below
  poison too: the generic interpreter fills unwritten outputs with NaN, TPU interpret mode
  fills uninitialised outputs and scratch with NaN (`uninitialized_memory="nan"`).
* `IMPLEMENTATION_RUNNERS`: (name, context manager factory, implementation) triples that run an
  op through every implementation a CPU can run: the XLA path, the Pallas kernels for GPU and
  for TPU in the generic interpreter, and the TPU kernels in TPU interpret mode with race
  detection; on a GPU or TPU machine also "pallas_native", the kernels compiled for the device
  (no interpreter). `PALLAS_RUNNERS` names the Pallas ones of these.
* `lower_for(fn, *args, platform)` and `assert_lowers_to(...)`: lower for "tpu" or "cuda" on a
  CPU-only machine and assert the expected custom call (Mosaic: `tpu_custom_call`; Triton:
  `__gpu$xla.gpu.triton`, or Mosaic GPU's `mosaic_gpu_v2` where `gpu_backend` picks it) is in
  the module.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._dispatch import pallas_interpret

CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# A "cuda" Pallas kernel is Triton's or, on Hopper under `gpu_backend("auto")` for the calls a
# Mosaic GPU kernel covers, Mosaic GPU's (the kind is tested in tests/pallas_kernels/
# test_mosaic_gpu.py); the lowering tests count either.
KERNEL_CALLS = {"tpu": ("tpu_custom_call",), "cuda": ("__gpu$xla.gpu.triton", "mosaic_gpu_v2")}

# The GPU that cuda lowering targets when no GPU is present (Triton needs a compute capability).
ABSTRACT_GPU = "NVIDIA H100"


def _upcast(x):
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.asarray(x, jnp.complex128 if jnp.iscomplexobj(x) else jnp.float64)
    return x


def float64_run(fn: Callable, *args, **kwargs):
    """fn(*args) with x64 enabled and every floating argument upcast to 64 bits; numpy out."""
    with jax.enable_x64(True):
        out = fn(*jax.tree.map(_upcast, args), **kwargs)
        return jax.tree.map(lambda y: np.asarray(y), out)


def rel_rmse(x, ref) -> float:
    x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
    ref = np.asarray(ref, np.complex128 if np.iscomplexobj(ref) else np.float64)
    if x.shape != ref.shape:
        raise AssertionError(f"shape {x.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(x)):
        return float("inf")
    denom = np.linalg.norm(ref)
    err = np.linalg.norm(x - ref)
    return float(err / denom) if denom > 0 else float(err)


def assert_close(x, ref, tol: float, what: str = "value"):
    err = rel_rmse(x, ref)
    assert err <= tol, f"{what}: relative RMSE {err:.3e} > {tol:.1e}"


def assert_tree_close(xs, refs, tol: float, what: str = "value"):
    flat_x, tree_x = jax.tree.flatten(xs)
    flat_r, tree_r = jax.tree.flatten(refs)
    assert tree_x == tree_r, f"{what}: structure {tree_x} != {tree_r}"
    for i, (x, r) in enumerate(zip(flat_x, flat_r)):
        assert_close(x, r, tol, f"{what}[{i}]")


def nan_like(x):
    return jnp.full(x.shape, jnp.nan, x.dtype)


# name -> (context manager factory, implementation=)
IMPLEMENTATION_RUNNERS: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], str]] = {
    "xla": (contextlib.nullcontext, "xla"),
    "pallas_gpu_interpret": (lambda: pallas_interpret("generic", target="cuda"), "pallas"),
    "pallas_tpu_generic_interpret": (lambda: pallas_interpret("generic", target="tpu"), "pallas"),
    "pallas_tpu_interpret": (lambda: pallas_interpret("tpu"), "pallas"),
}
if jax.default_backend() in ("gpu", "tpu"):
    # implementation="pallas" outside any interpreter: dispatch compiles the kernel written for
    # the device (Triton on GPU, Mosaic on TPU), so `pytest -m kernel` there runs them for real.
    IMPLEMENTATION_RUNNERS["pallas_native"] = (contextlib.nullcontext, "pallas")

PALLAS_RUNNERS = tuple(name for name in IMPLEMENTATION_RUNNERS if name != "xla")


def _abstract_gpu_context():
    """Newer JAX asks which GPU to lower Triton for when none is attached: name one."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=ABSTRACT_GPU, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("_lowering",),
                                     axis_types=(jax.sharding.AxisType.Auto,),
                                     abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def lower_for(fn: Callable, *args, platform: str) -> str:
    """The StableHLO text of jit(fn)(*args) lowered for `platform`, on any machine."""
    ctx = _abstract_gpu_context() if platform == "cuda" else contextlib.nullcontext()
    with ctx:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def custom_calls(hlo_text: str) -> list[str]:
    return re.findall(r"custom_call @([\w$.\-]+)\(", hlo_text)


def assert_lowers_to(fn: Callable, *args, platform: str, count: int | None = None) -> str:
    text = lower_for(fn, *args, platform=platform)
    calls = [c for c in custom_calls(text) if c in KERNEL_CALLS[platform]]
    if count == 0:
        assert not calls, f"expected no {KERNEL_CALLS[platform]}, got {len(calls)}"
        return text
    assert calls, f"no {KERNEL_CALLS[platform]} in the {platform} lowering"
    if count is not None:
        assert len(calls) == count, f"expected {count} {KERNEL_CALLS[platform]}, got {len(calls)}"
    return text


def assert_auto_lowers(make_fn: Callable, *args, op: str, platform: str, count: int) -> None:
    """`make_fn(implementation)` -> function. "pallas" lowers to `count` kernel calls for
    `platform`; "auto" to the same where it picks the kernel there (_dispatch.AUTO_ON_CUDA), to
    none (the XLA path) where it does not."""
    from pallas_kernels import _dispatch
    if _dispatch.auto_runs_pallas(op, platform):  # "auto" is "pallas" there: one lowering
        assert_lowers_to(make_fn("auto"), *args, platform=platform, count=count)
    else:
        assert_lowers_to(make_fn("pallas"), *args, platform=platform, count=count)
        assert_lowers_to(make_fn("auto"), *args, platform=platform, count=0)


# ---- the matrix-state ops' gradient harness (delta_rule, dplr_delta_rule) ---------------------
F32_TOL = 1e-5
BF16_TOL = 1e-2


def given_inputs(inputs: dict, names) -> tuple[tuple[str, ...], list]:
    """(the names in `names` whose input is not None, their arrays), in that order."""
    given = tuple(n for n in names if inputs[n] is not None)
    return given, [inputs[n] for n in given]


def forward_and_grads(op: Callable, implementation, chunk_size, names, seg, weights, *arrays):
    """(op's (o, final state), the gradient of every array) for the loss
    sum(o * weights[0]) + sum(final * weights[1])."""
    def call(*xs):
        return op(**dict(zip(names, xs)), segment_ids=seg, chunk_size=chunk_size,
                  implementation=implementation)

    def loss(*xs):
        o, final = call(*xs)
        return (jnp.sum(o.astype(weights[0].dtype) * weights[0])
                + jnp.sum(final.astype(weights[1].dtype) * weights[1]))

    return call(*arrays), jax.grad(loss, argnums=tuple(range(len(arrays))))(*arrays)


def close_per_row(x, ref, tol: float, what: str):
    """Relative RMSE per batch row: a badly conditioned row cannot hide behind a large one."""
    for i in range(ref.shape[0]):
        assert_close(x[i], ref[i], tol, f"{what}[batch {i}]")


def check_matrix_state_op(op: Callable, implementation: str, inputs: dict, names, *,
                          chunk_size, seed: int, ctx=None, tol=None, x64: bool = False):
    """Outputs, final state and the gradient of every input of a matrix-state op (keywords
    `names`, q and v among them, plus segment_ids / chunk_size / implementation) against its
    float64 reference (`x64`: the implementation itself runs in float64 too, and must match to
    rounding)."""
    import functools
    names, arrays = given_inputs(inputs, names)
    q, v = inputs["q"], inputs["v"]
    key = jax.random.PRNGKey(seed)
    weights = (jax.random.normal(key, v.shape),
               jax.random.normal(jax.random.fold_in(key, 1),
                                 (q.shape[0], q.shape[2], q.shape[3], v.shape[3])))
    seg = inputs["segment_ids"]
    run = lambda impl: jax.jit(functools.partial(forward_and_grads, op, impl, chunk_size, names))
    ref_out, ref_grads = float64_run(run("reference"), seg, weights, *arrays)
    if x64:
        out, grads = float64_run(run(implementation), seg, weights, *arrays)
        tol = 1e-10
    else:
        with (ctx or IMPLEMENTATION_RUNNERS["xla"][0]()):
            out, grads = run(implementation)(seg, weights, *arrays)
        assert out[0].dtype == q.dtype and out[1].dtype == jnp.float32
    if tol is None:
        tol = BF16_TOL if q.dtype == jnp.bfloat16 else F32_TOL
    assert out[0].shape == v.shape
    close_per_row(out[0], ref_out[0], tol, "o")
    close_per_row(out[1], ref_out[1], tol, "final_state")
    for name, g, r in zip(names, grads, ref_grads):
        assert g.shape == inputs[name].shape
        close_per_row(g, r, tol, f"d{name}")
