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
from pallas_kernels import chunked_linear_attention, linear_scan, selective_scan  # noqa: E402
from pallas_kernels.chunked_linear_attention import mosaic_gpu as cla_mgpu  # noqa: E402
from pallas_kernels.chunked_linear_attention import xla as cla_xla  # noqa: E402
from pallas_kernels.linear_scan import mosaic_gpu as scan_mgpu  # noqa: E402
from pallas_kernels.linear_scan import reference as scan_ref  # noqa: E402
from pallas_kernels.selective_scan import mosaic_gpu as s6_mgpu  # noqa: E402
from pallas_kernels.selective_scan import xla as s6_xla  # noqa: E402

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



# ---------------------------------------------------------------------------------------------
# linear_scan: the TMA-pipelined walk (state in registers).


def _scan_inputs(shape, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    a = jax.random.uniform(ks[0], shape, minval=0.5, maxval=1.0).astype(dtype)
    b = jax.random.normal(ks[1], shape).astype(dtype)
    h0 = jax.random.normal(ks[2], (shape[0], shape[2]))
    return a, b, h0


# The walk adds in float32 exactly as the reference does; only h's rounding to its dtype differs.
SCAN_TOL = {jnp.float32: 1e-6, jnp.bfloat16: BF16_TOL}


@pytest.mark.parametrize("dtype,reverse", [(jnp.float32, False), (jnp.bfloat16, True)],
                         ids=["f32", "bf16-reverse"])
def test_linear_scan_kernel_in_gpu_interpret_mode(dtype, reverse):
    """The kernel itself against the float64 recurrence: T=70 spans several chunks (32 steps
    in f32, 64 in bf16) and is not a multiple of one (padded steps must leave the state alone, at the end or, reversed, at
    the start of the walk); 136 channels are one full and one padded block of 128."""
    a, b, h0 = _scan_inputs((1, 70, 136), dtype)
    assert scan_mgpu.supports(a, b, h0)
    h, final = jax.jit(lambda *x: scan_mgpu.linear_scan_forward(
        *x, reverse=reverse, interpret=scan_mgpu.interpret_params()))(a, b, h0)
    ref = kt.float64_run(lambda *x: scan_ref.linear_scan_reference(*x, reverse=reverse), a, b, h0)
    assert h.dtype == dtype and final.dtype == jnp.float32
    kt.assert_close(h, ref[0], SCAN_TOL[dtype], "h")
    kt.assert_close(final, ref[1], 1e-6, "final_state")


def test_linear_scan_op_runs_mosaic_kernel_with_segments_and_gradients():
    """The public op inside pallas_interpret("gpu") with segment_ids and an initial state: the
    Mosaic GPU forward (segment starts arrive as a = 0), and the gradients of every input
    through the custom VJP (its Triton backward in the generic interpreter), vs float64."""
    a, b, h0 = _scan_inputs((1, 40, 24), jnp.float32, seed=2)
    seg = jnp.repeat(jnp.arange(4), 10)[None]

    def loss(impl):
        def f(a, b, h0):
            h, last = linear_scan(a, b, initial_state=h0, segment_ids=seg, implementation=impl)
            return jnp.sum(jnp.sin(h)) + jnp.sum(last ** 2), (h, last)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    ref = kt.float64_run(loss("reference"), a, b, h0)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(a, b, h0))
        (_, (h, last)), grads = loss("pallas")(a, b, h0)
    assert "mpmd_map" in jaxpr or "core_map" in jaxpr, "no Mosaic GPU kernel in the program"
    kt.assert_close(h, ref[0][1][0], 1e-6, "h")
    kt.assert_close(last, ref[0][1][1], 1e-6, "final_state")
    kt.assert_tree_close(grads, ref[1], 1e-5, "grads")


def test_linear_scan_complex_runs_triton_under_gpu_interpret_mode():
    """Complex inputs are outside the Mosaic kernel: the op runs the Triton kernel (generic
    interpreter) and still matches the reference."""
    a, b, h0 = _scan_inputs((1, 12, 8), jnp.float32, seed=4)
    ac = jax.lax.complex(a, 0.3 * a)
    bc = jax.lax.complex(b, -b)
    assert not scan_mgpu.supports(ac, bc, h0.astype(jnp.complex64))
    fn = lambda impl: jax.jit(lambda a, b: linear_scan(a, b, implementation=impl))
    ref = kt.float64_run(fn("reference"), ac, bc)
    with _dispatch.pallas_interpret("gpu"):
        h, last = fn("pallas")(ac, bc)
    kt.assert_close(h, ref[0], 1e-6, "h")
    kt.assert_close(last, ref[1], 1e-6, "final_state")


def test_linear_scan_kernel_rejects_uncovered_inputs():
    a, b, h0 = _scan_inputs((1, 8, 8), jnp.float32)
    with pytest.raises(ValueError, match="Mosaic GPU kernel"):
        scan_mgpu.linear_scan_forward(a, b.astype(jnp.bfloat16), h0, reverse=False)


def _scan_kernels(target, dtype, backend):
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    x = _aot.abstract((2, 512, 256), dtype, target)
    h0 = _aot.abstract((2, 256), jnp.float32, target)

    def fwd(a, b, h0):
        return linear_scan(a, b, initial_state=h0, implementation="pallas")

    with _dispatch.gpu_backend(backend):
        compiled, _ = _aot.compile(fwd, x, x, h0)
    return [k["kind"] for k in _aot.report(compiled)["kernels"]]


@pytest.mark.compile
@pytest.mark.parametrize("target", ["h100", "h200"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_linear_scan_compiles_for_hopper(target, dtype):
    """Lowered by Mosaic GPU and compiled by ptxas for sm_90a, in both input dtypes."""
    _cpu_host()
    assert _scan_kernels(target, dtype, "mosaic") == ["mosaic_gpu"]


@pytest.mark.compile
def test_linear_scan_dispatch_picks_triton_off_hopper_and_by_default():
    _cpu_host()
    assert _scan_kernels("a100", jnp.float32, "mosaic") == ["triton"]
    assert _scan_kernels("h100", jnp.float32, "triton") == ["triton"]


# ---------------------------------------------------------------------------------------------
# selective_scan (Mamba-1 S6): N state entries per thread, checkpoints for the XLA backward.


def _s6_inputs(batch, length, channels, groups, state, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    u = jax.random.normal(ks[0], (batch, length, channels))
    delta = jax.random.normal(ks[1], (batch, length, channels))
    a = -jnp.exp(jax.random.normal(ks[2], (channels, state)))
    b = jax.random.normal(ks[3], (batch, length, groups, state))
    c = jax.random.normal(ks[4], (batch, length, groups, state))
    h0 = jax.random.normal(ks[5], (batch, channels, state))
    return u, delta, a, b, c, h0


def test_selective_scan_kernel_in_gpu_interpret_mode():
    """The kernel against xla.py's forward in float64: y, the final state and the checkpoints
    (T=70: two segments of 64 steps, the second mostly padding; a reset at t=37; N=4 and 8
    channels padded to one block of 128)."""
    u, delta, a, b, c, h0 = _s6_inputs(1, 70, 8, 1, 4)
    dt = jax.nn.softplus(delta)
    keep = jnp.ones((1, 70)).at[:, 37].set(0.0)
    assert s6_mgpu.supports(u, b, h0)
    out = jax.jit(lambda *x: s6_mgpu.selective_scan_forward(
        *x, interpret=s6_mgpu.interpret_params()))(dt, u, b, c, a, h0, keep)
    ref = kt.float64_run(lambda *x: s6_xla.selective_scan_forward(*x, save_states=True),
                         dt, u, b, c, a, h0, keep)
    for got, want, what in zip(out, ref, ("y", "final_state", "checkpoints")):
        assert got.shape == want.shape, what
        kt.assert_close(got, want, 1e-6, what)


def test_selective_scan_op_runs_mosaic_kernel_with_gradients():
    """The public op inside pallas_interpret("gpu") (D, z, delta bias + softplus, segment_ids,
    initial state): the Mosaic GPU forward, and every gradient through xla.py's backward, which
    recomputes from the checkpoints the kernel wrote, against float64 autodiff of the reference."""
    u, delta, a, b, c, h0 = _s6_inputs(1, 24, 8, 1, 4, seed=1)
    ks = jax.random.split(jax.random.PRNGKey(9), 3)
    d, bias = jax.random.normal(ks[0], (8,)), jax.random.normal(ks[1], (8,))
    z = jax.random.normal(ks[2], u.shape)
    seg = jnp.repeat(jnp.arange(2), 12)[None]

    def loss(impl):
        def f(u, delta, a, b, c, h0):
            y, last = selective_scan(u, delta, a, b, c, D=d, z=z, delta_bias=bias,
                                     delta_softplus=True, initial_state=h0, segment_ids=seg,
                                     implementation=impl)
            return jnp.sum(jnp.sin(y)) + jnp.sum(last ** 2), (y, last)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))

    ref = kt.float64_run(loss("reference"), u, delta, a, b, c, h0)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(u, delta, a, b, c, h0))
        (_, (y, last)), grads = loss("pallas")(u, delta, a, b, c, h0)
    assert "mpmd_map" in jaxpr or "core_map" in jaxpr, "no Mosaic GPU kernel in the program"
    kt.assert_close(y, ref[0][1][0], 1e-6, "y")
    kt.assert_close(last, ref[0][1][1], 1e-6, "final_state")
    kt.assert_tree_close(grads, ref[1], 1e-5, "grads")


def test_selective_scan_uncovered_calls():
    """Grouped B, C whose groups are narrower than a 128-channel block, 16-bit or 64-bit
    activations and N > 64 are outside the kernel (the op runs Triton); a direct call says so."""
    u, _, a, b, c, h0 = _s6_inputs(1, 8, 8, 2, 4)
    assert not s6_mgpu.supports(u, b, h0)
    assert not s6_mgpu.supports(u.astype(jnp.bfloat16), b[:, :, :1], h0)
    assert not s6_mgpu.supports(u, jnp.zeros((1, 8, 1, 80)), h0)
    with pytest.raises(ValueError, match="Mosaic GPU kernel"):
        s6_mgpu.selective_scan_forward(u, u, b, c, a, h0, jnp.ones((1, 8)))


def _s6_kernels(target, groups, backend):
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    batch, length, channels, state = 2, 512, 256, 16
    f = lambda *shape: _aot.abstract(shape, jnp.float32, target)
    args = (f(batch, length, channels), f(batch, length, channels), f(channels, state),
            f(batch, length, groups, state), f(batch, length, groups, state),
            f(batch, channels, state))

    def fwd(u, delta, a, b, c, h0):
        return selective_scan(u, delta, a, b, c, initial_state=h0, delta_softplus=True,
                              implementation="pallas")

    with _dispatch.gpu_backend(backend):
        compiled, _ = _aot.compile(fwd, *args)
    return [k["kind"] for k in _aot.report(compiled)["kernels"]]


@pytest.mark.compile
@pytest.mark.parametrize("target", ["h100", "h200"])
def test_selective_scan_compiles_for_hopper(target):
    """Lowered by Mosaic GPU and compiled by ptxas for sm_90a (one group, and two groups of
    128 channels: a block reads its own group's B, C)."""
    _cpu_host()
    assert _s6_kernels(target, 1, "mosaic") == ["mosaic_gpu"]
    assert _s6_kernels(target, 2, "mosaic") == ["mosaic_gpu"]


@pytest.mark.compile
def test_selective_scan_dispatch_picks_triton_off_hopper_and_by_default():
    _cpu_host()
    assert _s6_kernels("a100", 1, "mosaic") == ["triton"]
    assert _s6_kernels("h100", 1, "triton") == ["triton"]
