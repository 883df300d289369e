"""The Pallas Mosaic GPU (Hopper) kernels, on a CPU: run in Mosaic GPU's interpret mode (race
detection on, uninitialised memory NaN) against the float64 reference, and compiled for sm_90a
(H100, H200) by the CUDA plugin without a GPU. Skipped where the installed JAX has no Mosaic GPU
or no GPU interpret mode (the older-JAX CI stage).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this JAX has no Mosaic GPU interpret mode", allow_module_level=True)

from pallas_kernels import _aot, _dispatch  # noqa: E402
from pallas_kernels import _testing as kt  # noqa: E402
from pallas_kernels import chunked_linear_attention  # noqa: E402
from pallas_kernels.chunked_linear_attention import mosaic_gpu as cla_mgpu  # noqa: E402
from pallas_kernels.chunked_linear_attention import xla as cla_xla  # noqa: E402

pytestmark = pytest.mark.kernel

if not cla_mgpu.available():
    pytest.skip("this JAX's Mosaic GPU lacks what the kernels use", allow_module_level=True)

BF16_TOL = 1e-2
# The chunk states and final state accumulate exact products of the 16-bit inputs in float32
# (the state itself meets the tensor cores as a bfloat16 head + remainder): float32 accuracy.
STATE_TOL = 1e-6


def _inputs(shape, seed=0):
    batch, length, heads, kdim, vdim = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (batch, length, heads, kdim)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (batch, length, heads, kdim)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (batch, length, heads, vdim)).astype(jnp.bfloat16)
    h0 = jax.random.normal(ks[3], (batch, heads, kdim, vdim))
    return q, k, v, h0


@pytest.mark.parametrize("shape", [(1, 100, 2, 64, 80), (1, 64, 1, 128, 64)],
                         ids=["T100-K64-V80", "T64-K128-V64"])
def test_forward_kernel_in_gpu_interpret_mode(shape):
    """The kernel itself: outputs, final state and every chunk's start state (what the
    backward reads) against the float64 chunked form. T=100 is not a multiple of the chunk,
    V=80 not of the value block."""
    q, k, v, h0 = _inputs(shape)
    qs = q.astype(jnp.float32) * shape[3] ** -0.5
    assert cla_mgpu.supports(qs, k, v, None, None)
    o, final, starts = jax.jit(lambda *a: cla_mgpu.forward(
        *a, None, interpret=cla_mgpu.interpret_params()))(qs, k, v, None, h0)
    ref = kt.float64_run(lambda *a: cla_xla.forward_with_states(*a, None), qs, k, v, None, h0)
    assert o.dtype == jnp.bfloat16
    kt.assert_close(o, ref[0], BF16_TOL, "o")
    kt.assert_close(final, ref[1], STATE_TOL, "final_state")
    kt.assert_close(starts, ref[2], STATE_TOL, "chunk start states")


def test_op_runs_mosaic_kernel_under_gpu_interpret_mode():
    """The public op inside pallas_interpret("gpu"): the Mosaic GPU forward (the Triton
    backward, in the generic interpreter, for the gradient), against the float64 reference."""
    shape = (1, 70, 1, 64, 64)
    q, k, v, h0 = _inputs(shape, seed=3)

    def run(q, k, v, h0):
        o, s = chunked_linear_attention(q, k, v, initial_state=h0, implementation="pallas")
        return o, s

    ref = kt.float64_run(jax.jit(lambda *a: chunked_linear_attention(
        *a[:3], initial_state=a[3], implementation="reference")), q, k, v, h0)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(run)(q, k, v, h0))
        o, s = jax.jit(run)(q, k, v, h0)
    assert "mpmd_map" in jaxpr or "core_map" in jaxpr, "no Mosaic GPU kernel in the program"
    kt.assert_close(o, ref[0], BF16_TOL, "o")
    kt.assert_close(s, ref[1], STATE_TOL, "final_state")


def test_uncovered_calls_run_triton_under_gpu_interpret_mode():
    """Scalar gates are not on the Mosaic kernel yet: the op still runs, through the Triton
    kernel in the generic interpreter, and matches the reference."""
    shape = (1, 40, 1, 16, 16)
    q, k, v, h0 = _inputs(shape, seed=5)
    g = jnp.log(jax.random.uniform(jax.random.PRNGKey(7), shape[:3], minval=0.8, maxval=1.0))
    fn = lambda impl: jax.jit(lambda *a: chunked_linear_attention(
        *a[:3], log_gate=a[3], initial_state=a[4], implementation=impl))
    ref = kt.float64_run(fn("reference"), q, k, v, g, h0)
    with _dispatch.pallas_interpret("gpu"):
        o, s = fn("pallas")(q, k, v, g, h0)
    kt.assert_close(o, ref[0], BF16_TOL, "o")
    kt.assert_close(s, ref[1], STATE_TOL, "final_state")


def test_chunks_longer_than_a_tile_run_triton():
    """chunk_size=128 (two 64-row tiles): the Triton kernel, with xla.py's 128-token chunks."""
    q, k, v, _ = _inputs((1, 256, 1, 64, 64))
    assert cla_mgpu.supports(q, k, v, None, None, 64)
    assert not cla_mgpu.supports(q, k, v, None, None, 128)


def test_pallas_interpret_gpu_mode_checks_target():
    with pytest.raises(ValueError, match="GPU interpret mode"):
        with _dispatch.pallas_interpret("gpu", target="tpu"):
            pass
    with pytest.raises(ValueError, match="backend"):
        with _dispatch.gpu_backend("cutlass"):
            pass


def _cpu_host():
    if os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu"):
        pytest.skip("compile-only devices are tested on a CPU host (JAX_PLATFORMS=cpu)")


def _kernels(target, key_dim, backend):
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    shape = (2, 512, 4, key_dim)
    q = _aot.abstract(shape, jnp.bfloat16, target)
    v = _aot.abstract(shape[:3] + (128,), jnp.bfloat16, target)

    def fwd(q, k, v):
        return chunked_linear_attention(q, k, v, implementation="pallas")

    with _dispatch.gpu_backend(backend):
        compiled, _ = _aot.compile(fwd, q, q, v)
    return [k["kind"] for k in _aot.report(compiled)["kernels"]]


@pytest.mark.compile
@pytest.mark.parametrize("target", ["h100", "h200"])
@pytest.mark.parametrize("key_dim", [64, 128, 256])
def test_forward_compiles_for_hopper(target, key_dim):
    """Lowered by Mosaic GPU and compiled by ptxas for sm_90a (its shared memory checked
    against the 227 KiB a block may use), at each head dim."""
    _cpu_host()
    assert _kernels(target, key_dim, "mosaic") == ["mosaic_gpu"]


@pytest.mark.compile
def test_dispatch_picks_triton_off_hopper_and_by_default():
    _cpu_host()
    assert _kernels("a100", 64, "mosaic") == ["triton"]
    assert _kernels("h100", 64, "triton") == ["triton"]

