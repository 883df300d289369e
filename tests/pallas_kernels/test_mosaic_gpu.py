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
    """Keys and values of different dtypes (float32 k, bf16 v) are not on the Mosaic kernel:
    the op still runs, through the Triton kernel in the generic interpreter, and matches the
    reference."""
    shape = (1, 40, 1, 16, 16)
    q, k, v, h0 = _inputs(shape, seed=5)
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    g = jnp.log(jax.random.uniform(jax.random.PRNGKey(7), shape[:3], minval=0.8, maxval=1.0))
    assert not cla_mgpu.supports(q, k, v, g[..., None], None)
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


# Gates and segment_ids on the Mosaic kernel: their arithmetic runs in XLA
# (mosaic_gpu._gate_tiles), the kernel multiplies q k^T by a decay tile (scalar gates,
# segments) or takes the vector-gated scores whole, and decays its state by a row vector.


def _gate(shape, kind, seed):
    """Log gates [B, T, H] (scalar) or [B, T, H, K] (vector), one of them past GATE_FLOOR."""
    gshape = shape[:3] if kind == "scalar" else shape[:4]
    g = jnp.log(jax.random.uniform(jax.random.PRNGKey(seed), gshape, minval=0.7, maxval=1.0))
    return g.at[:, shape[1] // 2 - 3].set(-50.0)


# Starts mid-chunk, on a chunk's first token (64) and two in one chunk; t = 0 is no start (the
# initial state reaches the first segment).
_STARTS = (20, 30, 64, 90)


@pytest.mark.parametrize("shape,kind,segmented", [
    ((1, 100, 1, 64, 80), "scalar", True), ((1, 70, 1, 128, 64), "vector", False),
    ((1, 100, 1, 64, 64), "vector", True), ((1, 100, 1, 64, 64), None, True)],
    ids=["scalar-segments-K64-V80", "vector-K128", "vector-segments", "segments"])
def test_gated_forward_kernel_in_gpu_interpret_mode(shape, kind, segmented):
    """The kernel with gates and/or segment starts: outputs, final state and every chunk's
    start state against xla.py's float64 chunked form (T not a multiple of the chunk, V not
    of the value block; K128 is the one-stage pipeline)."""
    q, k, v, h0 = _inputs(shape, seed=11)
    qs = q.astype(jnp.float32) * shape[3] ** -0.5
    g = None if kind is None else _gate(shape, kind, 12)
    g = g[..., None] if kind == "scalar" else g
    runs = None
    if segmented:
        runs = jnp.zeros(shape[:2], jnp.int32).at[:, jnp.array(_STARTS)].set(1)
    assert cla_mgpu.supports(qs, k, v, g, runs)
    o, final, starts = jax.jit(lambda *a: cla_mgpu.forward(
        *a, interpret=cla_mgpu.interpret_params()))(qs, k, v, g, h0, runs)
    ref = kt.float64_run(cla_xla.forward_with_states, qs, k, v, g, h0, runs)
    assert o.dtype == jnp.bfloat16
    kt.assert_close(o, ref[0], BF16_TOL, "o")
    kt.assert_close(final, ref[1], STATE_TOL, "final_state")
    kt.assert_close(starts, ref[2], STATE_TOL, "chunk start states")


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_gated_op_runs_mosaic_kernel_with_gradients(kind):
    """The public op inside pallas_interpret("gpu") with a gate, segment_ids and an initial
    state: the Mosaic GPU forward, and every gradient through the custom VJP (the Mosaic GPU
    backward reads the chunk states the forward kernel wrote), against
    float64 autodiff of the reference. The loss reads the bf16 output, hence BF16_TOL."""
    shape = (1, 40, 1, 16, 16)
    q, k, v, h0 = _inputs(shape, seed=13)
    g = _gate(shape, kind, 14)
    seg = jnp.repeat(jnp.arange(2), 20)[None]

    def loss(impl):
        def f(q, k, v, g, h0):
            o, s = chunked_linear_attention(q, k, v, log_gate=g, initial_state=h0,
                                            segment_ids=seg, implementation=impl)
            return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(s ** 2), (o, s)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(5)), has_aux=True))

    ref = kt.float64_run(loss("reference"), q, k, v, g, h0)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(q, k, v, g, h0))
        (_, (o, s)), grads = loss("pallas")(q, k, v, g, h0)
    assert "mpmd_map" in jaxpr or "core_map" in jaxpr, "no Mosaic GPU kernel in the program"
    kt.assert_close(o, ref[0][1][0], BF16_TOL, "o")
    kt.assert_close(s, ref[0][1][1], STATE_TOL, "final_state")
    kt.assert_tree_close(grads, ref[1], BF16_TOL, "grads")


def test_gated_calls_above_key_dim_128_split_the_key_dim():
    """The gated tiles (q~, k~ in three pieces, the decay or score tile) do not fit SMEM at
    key_dim 256 even with one stage: those calls run two programs of 128 key rows each (the
    ungated one keeps all 256 rows); above 256 the Triton kernel runs."""
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    q, q128, v = spec(1, 64, 1, 256), spec(1, 64, 1, 128), spec(1, 64, 1, 64)
    g = spec(1, 64, 1, 1)
    runs = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    assert cla_mgpu.supports(q, q, v, None, None)
    assert cla_mgpu.supports(q, q, v, g, None) and cla_mgpu.supports(q, q, v, None, runs)
    assert cla_mgpu.supports(q128, q128, v, g, runs)
    assert cla_mgpu._plan("plain", 256, jnp.bfloat16, False) == (256, 1)
    assert cla_mgpu._plan("scalar", 256, jnp.bfloat16, True) == (128, 1)
    assert cla_mgpu._plan("scalar", 128, jnp.bfloat16, True) == (128, 1)
    assert not cla_mgpu.supports(spec(1, 64, 1, 320), spec(1, 64, 1, 320), v, None, None)


def _gated_kernels(target, key_dim, kind, backend="mosaic"):
    """The kernels of the compiled forward with a `kind` ("scalar" or "vector") gate and
    segment_ids."""
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    shape = (2, 512, 4, key_dim)
    q = _aot.abstract(shape, jnp.bfloat16, target)
    v = _aot.abstract(shape[:3] + (128,), jnp.bfloat16, target)
    g = _aot.abstract(shape[:3] if kind == "scalar" else shape, jnp.float32, target)
    seg = _aot.abstract(shape[:2], jnp.int32, target)

    def fwd(q, k, v, g, seg):
        return chunked_linear_attention(q, k, v, log_gate=g, segment_ids=seg,
                                        implementation="pallas")

    with _dispatch.gpu_backend(backend):
        compiled, _ = _aot.compile(fwd, q, q, v, g, seg)
    return [k["kind"] for k in _aot.report(compiled)["kernels"]]


@pytest.mark.compile
@pytest.mark.parametrize("target,key_dim", [("h100", 64), ("h100", 128), ("h200", 128)])
@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_gated_forward_compiles_for_hopper(target, key_dim, kind):
    """Gates with segment_ids, lowered by Mosaic GPU and compiled by ptxas for sm_90a (two
    stages at key_dim 64, one at 128: the SMEM limit)."""
    _cpu_host()
    assert _gated_kernels(target, key_dim, kind) == ["mosaic_gpu"]


@pytest.mark.compile
def test_gated_dispatch_picks_triton_off_hopper():
    _cpu_host()
    assert _gated_kernels("a100", 64, "scalar") == ["triton"]


# The backward: the reverse chunk scan of dS on Mosaic GPU (mosaic_gpu.state_cotangents), the
# per-chunk VJP in XLA (xla.backward with those dS): its float32 gradients at the float32 path's
# tolerance (test_chunked_linear_attention's F32_TOL).
F32_GRAD_TOL = 1e-5


@pytest.mark.parametrize("shape,kind,segmented", [
    ((1, 100, 1, 64, 80), None, False), ((1, 100, 1, 64, 64), "scalar", True),
    ((1, 70, 1, 128, 64), "vector", True)],
    ids=["plain-T100-K64-V80", "scalar-segments", "vector-segments-K128"])
def test_backward_kernel_in_gpu_interpret_mode(shape, kind, segmented):
    """The reverse scan's dS at every chunk end and d initial_state against xla.py's float64
    scan, and every gradient of the backward built on it against xla.py's float64 backward
    (dk, dv come out in the inputs' bf16)."""
    q, k, v, h0 = _inputs(shape, seed=21)
    qs = q.astype(jnp.float32) * shape[3] ** -0.5
    g = None if kind is None else _gate(shape, kind, 22)
    g = g[..., None] if kind == "scalar" else g
    runs = None
    if segmented:
        runs = jnp.zeros(shape[:2], jnp.int32).at[:, jnp.array(_STARTS)].set(1)
    ks = jax.random.split(jax.random.PRNGKey(23), 2)
    do = jax.random.normal(ks[0], v.shape).astype(jnp.bfloat16)
    dfinal = jax.random.normal(ks[1], h0.shape)
    assert cla_mgpu.supports_backward(qs, k, v, g, runs, do)
    starts = kt.float64_run(cla_xla.forward_with_states, qs, k, v, g, h0, runs)[2]
    params = cla_mgpu.interpret_params()
    ends, dh0 = jax.jit(lambda *a: cla_mgpu.state_cotangents(*a, interpret=params))(
        qs, k, g, runs, do, dfinal)
    ref = kt.float64_run(cla_xla.state_cotangents, qs, g, runs, do, dfinal)
    kt.assert_close(ends, ref[0], STATE_TOL, "chunk end cotangents")
    kt.assert_close(dh0, ref[1], STATE_TOL, "d initial_state")
    args = (qs, k, v, g, h0, runs, starts.astype(jnp.float32), do, dfinal)
    grads = jax.jit(lambda *a: cla_mgpu.backward(*a, interpret=params))(*args)
    ref = kt.float64_run(cla_xla.backward, *args[:6], starts, *args[7:])
    for name, x, r in zip(["dq", "dk", "dv", "dg", "dh0"], grads, ref):
        if r is None:
            assert x is None, name
            continue
        tol = {"dk": BF16_TOL, "dv": BF16_TOL, "dh0": STATE_TOL}.get(name, F32_GRAD_TOL)
        kt.assert_close(x, r, tol, name)


def test_op_runs_mosaic_backward_under_gpu_interpret_mode():
    """The public op's gradients inside pallas_interpret("gpu"): both kernels Mosaic GPU
    (no Triton backward in the program), against float64 autodiff of the reference. A loss
    linear in o and the final state, so the bf16 gradients differ by their rounding alone and
    d initial_state is at float32 accuracy."""
    shape = (1, 70, 1, 64, 64)
    q, k, v, h0 = _inputs(shape, seed=24)
    ks = jax.random.split(jax.random.PRNGKey(25), 2)
    # w_o in bf16: the cotangent of the bf16 o is then exact on both sides.
    w_o = jax.random.normal(ks[0], v.shape).astype(jnp.bfloat16)
    w_s = jax.random.normal(ks[1], h0.shape)

    def loss(impl):
        def f(q, k, v, h0):
            o, s = chunked_linear_attention(q, k, v, initial_state=h0, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)
        return jax.jit(jax.grad(f, argnums=tuple(range(4))))

    ref = kt.float64_run(loss("reference"), q, k, v, h0)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(q, k, v, h0))
        grads = loss("pallas")(q, k, v, h0)
    assert jaxpr.count("mpmd_map") + jaxpr.count("core_map") == 2, "not two Mosaic GPU kernels"
    assert "pallas_call" not in jaxpr, "a Triton kernel in the program"
    kt.assert_tree_close(grads[:3], ref[:3], BF16_TOL, "dq, dk, dv")
    kt.assert_close(grads[3], ref[3], STATE_TOL, "d initial_state")


def _backward_kernels(target, key_dim, kind):
    """The kernels of the compiled forward + backward (bf16, segment_ids with a gate)."""
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    shape = (2, 512, 4, key_dim)
    q = _aot.abstract(shape, jnp.bfloat16, target)
    v = _aot.abstract(shape[:3] + (128,), jnp.bfloat16, target)
    g = None
    if kind is not None:
        g = _aot.abstract(shape[:3] if kind == "scalar" else shape, jnp.float32, target)
    seg = _aot.abstract(shape[:2], jnp.int32, target)

    def loss(q, k, v, g, seg):
        o, _ = chunked_linear_attention(q, k, v, log_gate=g, implementation="pallas",
                                        segment_ids=None if g is None else seg)
        return jnp.sum(o.astype(jnp.float32))

    with _dispatch.gpu_backend("mosaic"):
        compiled, _ = _aot.compile(jax.grad(loss, argnums=(0, 1, 2)), q, q, v, g, seg)
    return [k["kind"] for k in _aot.report(compiled)["kernels"]]


@pytest.mark.compile
@pytest.mark.parametrize("target,key_dim,kind", [
    ("h100", 256, None), ("h200", 64, "scalar"), ("h100", 128, "vector")])
def test_backward_compiles_for_hopper(target, key_dim, kind):
    """Forward and backward kernels lowered by Mosaic GPU and compiled by ptxas for sm_90a
    (key dim 256: one stage; 128: two)."""
    _cpu_host()
    assert _backward_kernels(target, key_dim, kind) == ["mosaic_gpu"] * 2


# float32 inputs (q, k, v as 3 bf16 pieces, 6 piece products per float32 product, o in float32)
# and gated key dims above 128 (the key dim split over programs, partial outputs summed in XLA):
# mosaic_gpu._plan picks the key block and stages that fit SMEM. float32 results at the float32
# Triton path's tolerance (test_chunked_linear_attention's F32_TOL), states at STATE_TOL.
F32_TOL = 1e-5


def _f32_case(shape, kind, seed, dtype=jnp.float32):
    """q (float32, scaled), k, v in `dtype`, h0, and with a `kind` gate its segment starts
    (kind None: neither, the plain kernel)."""
    batch, length, heads, kdim, vdim = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (batch, length, heads, kdim)) * kdim ** -0.5
    k = jax.random.normal(ks[1], q.shape).astype(dtype)
    v = jax.random.normal(ks[2], (batch, length, heads, vdim)).astype(dtype)
    h0 = jax.random.normal(ks[3], (batch, heads, kdim, vdim))
    g = None if kind is None else _gate(shape, kind, seed + 1)
    g = g[..., None] if kind == "scalar" else g
    runs = None
    if kind is not None:
        runs = jnp.zeros(shape[:2], jnp.int32).at[:, jnp.array(_STARTS)].set(1)
    return q, k, v, g, h0, runs


@pytest.mark.parametrize("shape,kind,dtype,key_block", [
    ((1, 70, 1, 64, 64), None, jnp.float32, 64),
    ((1, 70, 1, 128, 64), "vector", jnp.float32, 64),
    ((1, 70, 1, 256, 64), "scalar", jnp.bfloat16, 128)],
    ids=["f32-K64", "f32-vector-segments-K128-split", "bf16-scalar-segments-K256-split"])
def test_f32_and_split_key_forward_kernel_in_gpu_interpret_mode(shape, kind, dtype, key_block):
    """The forward kernel (plain: two pipeline stages; gated with segment starts: one):
    outputs, final state and every chunk's start state against xla.py's float64 chunked
    form. The split cases run two programs per (head, value block), each on its key rows."""
    q, k, v, g, h0, runs = _f32_case(shape, kind, 31, dtype)
    assert cla_mgpu.supports(q, k, v, g, runs)
    assert cla_mgpu._plan(cla_mgpu._mode(g, runs), shape[3], dtype, g is not None)[0] == key_block
    o, final, starts = jax.jit(lambda *a: cla_mgpu.forward(
        *a, interpret=cla_mgpu.interpret_params()))(q, k, v, g, h0, runs)
    ref = kt.float64_run(cla_xla.forward_with_states, q, k, v, g, h0, runs)
    assert o.dtype == dtype
    kt.assert_close(o, ref[0], F32_TOL if dtype == jnp.float32 else BF16_TOL, "o")
    kt.assert_close(final, ref[1], STATE_TOL, "final_state")
    kt.assert_close(starts, ref[2], STATE_TOL, "chunk start states")


def test_f32_backward_kernel_in_gpu_interpret_mode():
    """float32 do as 3 bf16 pieces in the reverse scan (one pipeline stage at K256): dS at
    every chunk end, d initial_state and every gradient against xla.py's float64 backward."""
    q, k, v, g, h0, runs = _f32_case((1, 70, 1, 256, 64), "scalar", 41)
    ks = jax.random.split(jax.random.PRNGKey(42), 2)
    do, dfinal = jax.random.normal(ks[0], v.shape), jax.random.normal(ks[1], h0.shape)
    assert cla_mgpu.supports_backward(q, k, v, g, runs, do)
    starts = kt.float64_run(cla_xla.forward_with_states, q, k, v, g, h0, runs)[2]
    params = cla_mgpu.interpret_params()
    ends, dh0 = jax.jit(lambda *a: cla_mgpu.state_cotangents(*a, interpret=params))(
        q, k, g, runs, do, dfinal)
    ref = kt.float64_run(cla_xla.state_cotangents, q, g, runs, do, dfinal)
    kt.assert_close(ends, ref[0], STATE_TOL, "chunk end cotangents")
    kt.assert_close(dh0, ref[1], STATE_TOL, "d initial_state")
    args = (q, k, v, g, h0, runs, starts.astype(jnp.float32), do, dfinal)
    grads = jax.jit(lambda *a: cla_mgpu.backward(*a, interpret=params))(*args)
    ref = kt.float64_run(cla_xla.backward, *args[:6], starts, *args[7:])
    for name, x, r in zip(["dq", "dk", "dv", "dg", "dh0"], grads, ref):
        assert x.dtype == jnp.float32, name
        kt.assert_close(x, r, F32_TOL, name)


def test_f32_op_runs_mosaic_kernels_with_gradients():
    """The public op with float32 inputs inside pallas_interpret("gpu"), with a scalar gate,
    segment_ids and an initial state: both kernels are Mosaic GPU (no Triton kernel in the
    program), and o, the final state and every gradient match float64 autodiff of the
    reference."""
    shape = (1, 40, 1, 16, 16)
    q, k, v, h0 = (x.astype(jnp.float32) for x in _inputs(shape, seed=43))
    g = _gate(shape, "scalar", 44)
    seg = jnp.repeat(jnp.arange(2), 20)[None]

    def loss(impl):
        def f(q, k, v, g, h0):
            o, s = chunked_linear_attention(q, k, v, log_gate=g, initial_state=h0,
                                            segment_ids=seg, implementation=impl)
            return jnp.sum(jnp.sin(o)) + jnp.sum(s ** 2), (o, s)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(5)), has_aux=True))

    ref = kt.float64_run(loss("reference"), q, k, v, g, h0)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(q, k, v, g, h0))
        (_, (o, s)), grads = loss("pallas")(q, k, v, g, h0)
    assert jaxpr.count("mpmd_map") + jaxpr.count("core_map") == 2, "not two Mosaic GPU kernels"
    assert "pallas_call" not in jaxpr, "a Triton kernel in the program"
    assert o.dtype == jnp.float32
    kt.assert_close(o, ref[0][1][0], F32_TOL, "o")
    kt.assert_close(s, ref[0][1][1], STATE_TOL, "final_state")
    kt.assert_tree_close(grads, ref[1], F32_TOL, "grads")


@pytest.mark.compile
@pytest.mark.parametrize("target,key_dim,kind,dtype", [
    ("h100", 128, "scalar", jnp.float32), ("h200", 256, "vector", jnp.bfloat16)],
    ids=["h100-f32-scalar-K128", "h200-bf16-vector-K256"])
def test_f32_and_split_key_compile_for_hopper(target, key_dim, kind, dtype):
    """Forward (key dim split over programs of 64 / 128 key rows) and backward kernels lowered
    by Mosaic GPU and compiled by ptxas for sm_90a, shared memory within the 227 KiB a block
    may use: float32 inputs, and a gated key dim 256 that used to run Triton."""
    _cpu_host()
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    shape = (2, 512, 4, key_dim)
    q = _aot.abstract(shape, dtype, target)
    v = _aot.abstract(shape[:3] + (128,), dtype, target)
    g = _aot.abstract(shape[:3] if kind == "scalar" else shape, jnp.float32, target)
    seg = _aot.abstract(shape[:2], jnp.int32, target)

    def loss(q, k, v, g, seg):
        o, _ = chunked_linear_attention(q, k, v, log_gate=g, segment_ids=seg,
                                        implementation="pallas")
        return jnp.sum(o.astype(jnp.float32))

    with _dispatch.gpu_backend("mosaic"):
        compiled, _ = _aot.compile(jax.grad(loss, argnums=(0, 1, 2)), q, q, v, g, seg)
    assert [k["kind"] for k in _aot.report(compiled)["kernels"]] == ["mosaic_gpu"] * 2



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
def test_linear_scan_dispatch_picks_triton_off_hopper_and_when_asked():
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


def test_selective_scan_16bit_tiles_in_gpu_interpret_mode():
    """16-bit tiles (dt, u bf16; B, C f16: N=4 padded to 8 for 16-byte TMA rows), widened to
    float32 as they leave SMEM: exact widening, so float32 accuracy against xla.py's forward in
    float64 on the same values (T=70: a reset at t=37 and a mostly padded second segment)."""
    u, delta, a, b, c, h0 = _s6_inputs(1, 70, 8, 1, 4, seed=2)
    dt = jax.nn.softplus(delta).astype(jnp.bfloat16)
    u, b, c = u.astype(jnp.bfloat16), b.astype(jnp.float16), c.astype(jnp.float16)
    keep = jnp.ones((1, 70)).at[:, 37].set(0.0)
    assert s6_mgpu.supports(u, b, h0)
    out = jax.jit(lambda *x: s6_mgpu.selective_scan_forward(
        *x, interpret=s6_mgpu.interpret_params()))(dt, u, b, c, a, h0, keep)
    wide = [x.astype(jnp.float32) for x in (dt, u, b, c)]
    ref = kt.float64_run(lambda *x: s6_xla.selective_scan_forward(*x, save_states=True),
                         *wide, a, h0, keep)
    for got, want, what in zip(out, ref, ("y", "final_state", "checkpoints")):
        assert got.shape == want.shape and got.dtype == jnp.float32, what
        kt.assert_close(got, want, 1e-6, what)


def test_selective_scan_bf16_op_runs_mosaic_kernel_with_gradients(monkeypatch):
    """A bf16 op call (u, delta, B, C, z bf16; D, delta bias, A, h0 float32; segment_ids) in
    pallas_interpret("gpu"): the Mosaic GPU kernel runs on bf16 u, B, C tiles (dt float32, formed
    by the op), y comes out bf16; against float64 autodiff of the reference at the Triton bf16
    tests' tolerance (test_selective_scan's BF16_TOL)."""
    seen, kernel = [], s6_mgpu.selective_scan_forward

    def spy(dt, u, b, c, *rest, **kw):
        seen.append(tuple(jnp.dtype(x.dtype).name for x in (dt, u, b, c)))
        return kernel(dt, u, b, c, *rest, **kw)

    monkeypatch.setattr(s6_mgpu, "selective_scan_forward", spy)
    u, delta, a, b, c, h0 = _s6_inputs(1, 24, 8, 1, 4, seed=3)
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    d, bias = jax.random.normal(ks[0], (8,)), jax.random.normal(ks[1], (8,))
    z = jax.random.normal(ks[2], u.shape).astype(jnp.bfloat16)
    u, delta, b, c = (x.astype(jnp.bfloat16) for x in (u, delta, b, c))
    seg = jnp.repeat(jnp.arange(2), 12)[None]

    def loss(impl):
        def f(u, delta, a, b, c, h0):
            y, last = selective_scan(u, delta, a, b, c, D=d, z=z, delta_bias=bias,
                                     delta_softplus=True, initial_state=h0, segment_ids=seg,
                                     implementation=impl)
            return (jnp.sum(jnp.sin(y.astype(jnp.float32))) + jnp.sum(last ** 2)), (y, last)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))

    ref = kt.float64_run(loss("reference"), u, delta, a, b, c, h0)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(u, delta, a, b, c, h0))
        (_, (y, last)), grads = loss("pallas")(u, delta, a, b, c, h0)
    assert "mpmd_map" in jaxpr or "core_map" in jaxpr, "no Mosaic GPU kernel in the program"
    assert set(seen) == {("float32", "bfloat16", "bfloat16", "bfloat16")}
    assert y.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    kt.assert_close(y, ref[0][1][0], BF16_TOL, "y")
    kt.assert_close(last, ref[0][1][1], BF16_TOL, "final_state")
    kt.assert_tree_close(grads, ref[1], BF16_TOL, "grads")


def test_selective_scan_uncovered_calls():
    """Grouped B, C whose groups are narrower than a 128-channel block, 64-bit activations and
    N > 64 are outside the kernel (the op runs Triton); a direct call says so."""
    u, _, a, b, c, h0 = _s6_inputs(1, 8, 8, 2, 4)
    assert not s6_mgpu.supports(u, b, h0)
    assert not s6_mgpu.supports(jax.ShapeDtypeStruct(u.shape, jnp.float64), b[:, :, :1], h0)
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
def test_selective_scan_16bit_compiles_for_h100():
    """A bf16 op call lowers to the Mosaic GPU kernel under gpu_backend "auto" on an H100 and to
    Triton on an A100; the kernel on 16-bit tiles (bf16 dt, u, B, C) compiles for sm_90a."""
    _cpu_host()
    make = lambda: lambda u, dt, a, b: selective_scan(u, dt, a, b, b, implementation="pallas")[0]
    args = [((1, 64, 128), _BF), ((1, 64, 128), _BF), ((128, 16), jnp.float32),
            ((1, 64, 1, 16), _BF)]
    assert _lowered_kinds("h100", make, args) == ["mosaic_gpu"]
    assert _lowered_kinds("a100", make, args) == ["triton"]
    batch, length, channels, state = 2, 512, 256, 16
    x = lambda *shape: _aot.abstract(shape, jnp.bfloat16, "h100")
    f = lambda *shape: _aot.abstract(shape, jnp.float32, "h100")
    compiled, _ = _aot.compile(
        s6_mgpu.selective_scan_forward, x(batch, length, channels), x(batch, length, channels),
        x(batch, length, 1, state), x(batch, length, 1, state), f(channels, state),
        f(batch, channels, state), f(batch, length))
    assert [k["kind"] for k in _aot.report(compiled)["kernels"]] == ["mosaic_gpu"]


@pytest.mark.compile
def test_selective_scan_dispatch_picks_triton_off_hopper_and_when_asked():
    _cpu_host()
    assert _s6_kernels("a100", 1, "mosaic") == ["triton"]
    assert _s6_kernels("h100", 1, "triton") == ["triton"]


# ---------------------------------------------------------------------------------------------
# delta_rule: the chunk's triangular work in XLA, the state recurrence in the kernel.

from pallas_kernels import delta_rule  # noqa: E402
from pallas_kernels._chunks import segment_starts  # noqa: E402
from pallas_kernels.delta_rule import mosaic_gpu as delta_mgpu  # noqa: E402
from pallas_kernels.delta_rule import xla as delta_xla  # noqa: E402

# The state goes through W S and Kd^T u every chunk, each operand a 16-bit head + remainder
# (~16 bits of mantissa, the remainder x remainder term dropped): ~2^-17 relative per product.
DELTA_STATE_TOL = 2e-5


def _delta_inputs(shape, dtype, seed=0):
    batch, length, heads, kdim, vdim = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (batch, length, heads, kdim)).astype(dtype)
    k = jax.random.normal(ks[1], (batch, length, heads, kdim))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)   # as the modules do
    v = jax.random.normal(ks[2], (batch, length, heads, vdim)).astype(dtype)
    beta = jax.random.uniform(ks[3], (batch, length, heads), minval=0.0, maxval=2.0)
    g = jnp.log(jax.random.uniform(ks[4], (batch, length, heads), minval=0.8, maxval=1.0))
    h0 = jax.random.normal(ks[5], (batch, heads, kdim, vdim))
    return q, k, v, beta, g, h0


@pytest.mark.parametrize("shape,dtype,gated,segmented", [
    ((1, 100, 1, 64, 80), jnp.bfloat16, False, False),
    ((1, 70, 1, 128, 64), jnp.float16, True, True)], ids=["T100-K64-V80-bf16", "T70-K128-f16-gated-segments"])
def test_delta_rule_kernel_in_gpu_interpret_mode(shape, dtype, gated, segmented):
    """The kernel itself: outputs, final state and every chunk's start state (what the XLA /
    Triton backward reads) against xla.py's chunked form in float64. T is not a multiple of
    the chunk, V=80 not of the value block; the second case has a reset inside a chunk."""
    q, k, v, beta, g, h0 = _delta_inputs(shape, dtype)
    if not gated:
        g = jnp.zeros_like(g)
    seg = jnp.repeat(jnp.arange(3), 40)[None, :shape[1]]
    reset = (segment_starts(seg) if segmented else jnp.zeros(seg.shape, bool)).astype(jnp.float32)
    static = dict(scale=shape[3] ** -0.5, gated=gated, segmented=segmented)
    assert delta_mgpu.supports(q, k, v, h0, 64)
    got = jax.jit(lambda *a: delta_mgpu.forward(
        *a, chunk_size=64, interpret=delta_mgpu.interpret_params(), **static))(
        q, k, v, beta, g, h0, reset)
    ref = kt.float64_run(lambda *a: delta_xla.chunk_forward(*a, chunk=64, **static),
                         q, k, v, beta, g, h0, reset)
    assert got[0].dtype == dtype and got[2].shape == ref[2].shape
    kt.assert_close(got[0], ref[0], BF16_TOL, "o")
    kt.assert_close(got[1], ref[1], DELTA_STATE_TOL, "final_state")
    kt.assert_close(got[2], ref[2], DELTA_STATE_TOL, "chunk start states")


def test_delta_rule_op_runs_mosaic_kernel_with_gradients():
    """The public op inside pallas_interpret("gpu") with a gate, segment_ids, an initial state
    and chunk_size=16 (chunks padded to the kernel's 64 rows), two batch rows with different
    segments and two heads (one program each): the Mosaic GPU forward, and every
    gradient through the custom VJP's backward (its reverse scan the Mosaic GPU kernel), which
    reads the chunk states the forward kernel wrote, against float64 autodiff of the reference."""
    q, k, v, beta, g, h0 = _delta_inputs((2, 40, 2, 16, 16), jnp.bfloat16, seed=1)
    seg = jnp.stack([jnp.repeat(jnp.arange(2), 20), jnp.repeat(jnp.arange(4), 10)])

    def loss(impl):
        def f(q, k, v, beta, g, h0):
            o, s = delta_rule(q, k, v, beta, log_gate=g, initial_state=h0, segment_ids=seg,
                              chunk_size=16, implementation=impl)
            return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(s ** 2), (o, s)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))

    ref = kt.float64_run(loss("reference"), q, k, v, beta, g, h0)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(q, k, v, beta, g, h0))
        (_, (o, s)), grads = loss("pallas")(q, k, v, beta, g, h0)
    assert "mpmd_map" in jaxpr or "core_map" in jaxpr, "no Mosaic GPU kernel in the program"
    kt.assert_close(o, ref[0][1][0], BF16_TOL, "o")
    kt.assert_close(s, ref[0][1][1], DELTA_STATE_TOL, "final_state")
    kt.assert_tree_close(grads, ref[1], BF16_TOL, "grads")


def test_delta_rule_uncovered_calls():
    """Mixed dtypes, key dims above 256 and chunks over 64 rows are outside the kernel (the op
    runs Triton / XLA); a direct call says so. float32 at key dim 256 is in (the K, T plan)."""
    q, k, v, _, _, h0 = _delta_inputs((1, 8, 1, 16, 16), jnp.bfloat16)
    assert delta_mgpu.supports(q, k, v, h0, 64)
    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
    assert delta_mgpu.supports(*f32(q, k, v), h0, 64)
    mid = jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
    assert delta_mgpu.supports(mid, mid, v, jnp.zeros((1, 1, 128, 16)), 64)
    assert delta_mgpu.supports(*f32(mid, mid, v), jnp.zeros((1, 1, 128, 16)), 64)
    assert not delta_mgpu.supports(q, k, v.astype(jnp.float16), h0, 64)
    wide = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
    assert delta_mgpu.supports(wide, wide, v, jnp.zeros((1, 1, 256, 16)), 64)
    assert delta_mgpu.supports(*f32(wide, wide, v), jnp.zeros((1, 1, 256, 16)), 64)
    wider = jnp.zeros((1, 8, 1, 320), jnp.bfloat16)
    assert not delta_mgpu.supports(wider, wider, v, jnp.zeros((1, 1, 320, 16)), 64)
    assert not delta_mgpu.supports(*f32(wider, wider, v), jnp.zeros((1, 1, 320, 16)), 64)
    long = jnp.zeros((1, 256, 1, 16), jnp.bfloat16)
    assert not delta_mgpu.supports(long, long, long, h0, 128)
    with pytest.raises(ValueError, match="Mosaic GPU kernel"):
        delta_mgpu.forward(q, k, v.astype(jnp.float16), None, None, h0, None, scale=1.0,
                           chunk_size=64, gated=False, segmented=False)


def _delta_kernels(target, key_dim, gated, backend, compile_=True):
    """The kinds of the Pallas kernels in delta_rule's forward for `target`: compiled (ptxas
    for sm_90a, shared memory checked) or only lowered (the dispatch choice)."""
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    shape = (2, 512, 4, key_dim)
    q = _aot.abstract(shape, jnp.bfloat16, target)
    v = _aot.abstract(shape[:3] + (128,), jnp.bfloat16, target)
    b = _aot.abstract(shape[:3], jnp.float32, target)

    def fwd(q, k, v, beta, g):
        return delta_rule(q, k, v, beta, log_gate=g if gated else None, implementation="pallas")

    with _dispatch.gpu_backend(backend):
        if compile_:
            compiled, _ = _aot.compile(fwd, q, q, v, b, b)
            return [k["kind"] for k in _aot.report(compiled)["kernels"]]
        with _aot.lowering(_aot.devices(target)):
            text = jax.jit(fwd).lower(q, q, v, b, b).as_text()
    return sorted({kind for name, kind in (("mosaic_gpu", "mosaic_gpu"),
                                           ("__gpu$xla.gpu.triton", "triton")) if name in text})


@pytest.mark.compile
@pytest.mark.parametrize("target,key_dim,gated", [
    ("h100", 64, False), ("h100", 128, True), ("h200", 128, True)])
def test_delta_rule_forward_compiles_for_hopper(target, key_dim, gated):
    """Lowered by Mosaic GPU and compiled by ptxas for sm_90a (shared memory checked against
    the 227 KiB a block may use): two pipeline stages at key dim 64, one at 128."""
    _cpu_host()
    assert _delta_kernels(target, key_dim, gated, "mosaic") == ["mosaic_gpu"]


@pytest.mark.compile
def test_delta_rule_dispatch_picks_mosaic_on_hopper_and_triton_off_it():
    _cpu_host()
    assert _delta_kernels("a100", 64, True, "mosaic", compile_=False) == ["triton"]
    assert _delta_kernels("a100", 64, True, "auto", compile_=False) == ["triton"]
    assert _delta_kernels("h100", 64, True, "triton", compile_=False) == ["triton"]
    assert _delta_kernels("h100", 64, True, "mosaic", compile_=False) == ["mosaic_gpu"]
    assert _delta_kernels("h100", 64, True, "auto", compile_=False) == ["mosaic_gpu"]


# delta_rule's backward: xla.delta_rule_backward with its reverse scan over chunks (dS -> dU -> dS)
# as the Mosaic GPU kernel (mosaic_gpu.reverse_scan).

import functools  # noqa: E402

import numpy as np  # noqa: E402


def _delta_bwd_scan(dtype, gated, interpret):
    return functools.partial(delta_mgpu.reverse_scan, dtype=dtype, split_kd=gated,
                             interpret=interpret)


@pytest.mark.parametrize("shape,dtype,gated,segmented", [
    ((1, 100, 1, 64, 64), jnp.bfloat16, False, False),
    ((1, 70, 1, 128, 48), jnp.float16, True, True)],
    ids=["T100-K64-bf16", "T70-K128-V48-f16-gated-segments"])
def test_delta_rule_backward_kernel_in_gpu_interpret_mode(shape, dtype, gated, segmented):
    """Every cotangent (dq, dk, dv, dbeta, dg, dh0) of the backward with the Mosaic reverse scan
    against xla.py's backward in float64 (the same chunk states in): T not a multiple of the
    chunk; the second case with V=48 (a padded value block), a gate and a reset in a chunk."""
    q, k, v, beta, g, h0 = _delta_inputs(shape, dtype, seed=2)
    if not gated:
        g = jnp.zeros_like(g)
    seg = jnp.repeat(jnp.arange(3), 40)[None, :shape[1]]
    reset = (segment_starts(seg) if segmented else jnp.zeros(seg.shape, bool)).astype(jnp.float32)
    static = dict(scale=shape[3] ** -0.5, gated=gated, segmented=segmented)
    states = jnp.asarray(kt.float64_run(lambda *a: delta_xla.chunk_forward(*a, chunk=64, **static),
                                        q, k, v, beta, g, h0, reset)[2], jnp.float32)
    ks = jax.random.split(jax.random.PRNGKey(3), 2)
    do = jax.random.normal(ks[0], v.shape).astype(dtype)
    dfinal = jax.random.normal(ks[1], h0.shape)
    scan = _delta_bwd_scan(dtype, gated, delta_mgpu.interpret_params())
    got = jax.jit(lambda *a: delta_xla.delta_rule_backward(
        *a, chunk_size=64, reverse_scan=scan, **static))(
        q, k, v, beta, g, h0, reset, states, do, dfinal)
    ref = kt.float64_run(lambda *a: delta_xla.delta_rule_backward(*a, chunk_size=64, **static),
                         q, k, v, beta, g, h0, reset, states, do, dfinal)
    names = ["dq", "dk", "dv", "dbeta", "dg", "dh0"]
    for name, x, r in zip(names[:3], got, ref):
        assert x.dtype == dtype
        kt.assert_close(x, r, BF16_TOL, name)
    for name, x, r in zip(names[3:], got[3:], ref[3:]):
        kt.assert_close(x, r, DELTA_STATE_TOL, name)
    if not gated:
        assert not np.any(np.asarray(got[4])), "dg of an ungated call"


def test_delta_rule_op_backward_is_the_mosaic_kernel():
    """The op's custom VJP inside pallas_interpret("gpu") runs the Mosaic reverse scan (float32
    key dim 256: the K, T one); a call outside the kernel's cover (key dim 320) keeps the
    Triton backward."""
    def grad_jaxpr(dtype, key_dim):
        q, k, v, beta, g, h0 = _delta_inputs((1, 24, 1, key_dim, 16), dtype)
        f = jax.grad(lambda q: jnp.sum(delta_rule(
            q, k, v, beta, log_gate=g, initial_state=h0, implementation="pallas")[0]
            .astype(jnp.float32)))
        with _dispatch.pallas_interpret("gpu"):
            return str(jax.make_jaxpr(f)(q))

    assert "delta_rule_bwd_kernel" in grad_jaxpr(jnp.bfloat16, 128)
    assert "delta_rule_bwd_factored_kernel" in grad_jaxpr(jnp.float32, 256)
    wider = grad_jaxpr(jnp.float32, 320)
    assert "delta_rule_bwd_kernel" not in wider and "factored" not in wider


@pytest.mark.compile
@pytest.mark.parametrize("target,key_dim,gated", [("h100", 64, True), ("h200", 128, True)])
def test_delta_rule_backward_kernel_compiles_for_hopper(target, key_dim, gated):
    """The reverse-scan kernel lowered by Mosaic GPU and compiled by ptxas for sm_90a (shared
    memory checked against the 227 KiB a block may use); the op's gradient lowered for
    Hopper inside gpu_backend("mosaic") holds it, and not inside "triton"."""
    _cpu_host()
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    b, h, n, c, vd = 1, 2, 3, 64, 128
    f32 = lambda s: _aot.abstract(s, jnp.float32, target)
    scan = _delta_bwd_scan(jnp.bfloat16, gated, None)
    compiled, _ = _aot.compile(scan, f32((b, h, n, c, vd)), f32((b, h, n, key_dim, vd)),
                               f32((b, h, n, c, key_dim)), f32((b, h, n, c, key_dim)),
                               f32((b, h, n)), f32((b, h, key_dim, vd)))
    assert [k["kind"] for k in _aot.report(compiled)["kernels"]] == ["mosaic_gpu"]

    q = _aot.abstract((1, 128, 2, key_dim), jnp.bfloat16, target)
    beta = _aot.abstract((1, 128, 2), jnp.float32, target)

    for backend, has in (("mosaic", True), ("triton", False)):
        def grad(q, beta):    # a fresh function per backend: jit's trace cache ignores it
            return jax.grad(lambda q: jnp.sum(delta_rule(
                q, q, q, beta, log_gate=-beta, implementation="pallas")[0]
                .astype(jnp.float32)))(q)

        with _dispatch.gpu_backend(backend), _aot.lowering(_aot.devices(target)):
            text = jax.jit(grad).lower(q, beta).as_text()
        assert ("delta_rule_bwd_kernel" in text) == has, backend


# ---------------------------------------------------------------------------------------------
# gpu_backend("auto") (the default): Mosaic GPU where the GPU is known to be Hopper, Triton on an
# A100, where the GPU is unknown, and inside gpu_backend("triton").

import contextlib  # noqa: E402

_KINDS = {"mosaic_gpu_v2": "mosaic_gpu", "__gpu$xla.gpu.triton": "triton"}


def _lowered_kinds(target, make, args, backend=None):
    """The Pallas kernels (in program order) of `make()` lowered for `target` (its abstract
    device is what the dispatch reads), inside gpu_backend(backend) if one is given."""
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    abstract = [_aot.abstract(s, d, target) for s, d in args]
    ctx = _dispatch.gpu_backend(backend) if backend else contextlib.nullcontext()
    # A fresh function each time: jit's trace cache does not see gpu_backend.
    with ctx, _aot.lowering(_aot.devices(target)):
        text = jax.jit(make()).lower(*abstract).as_text()
    return [_KINDS[c] for c in kt.custom_calls(text) if c in _KINDS]


def _grad_of(op, **kw):
    def make():
        def loss(*xs):
            return jnp.sum(op(*xs, implementation="pallas", **kw)[0].astype(jnp.float32))
        return jax.grad(loss)
    return make


_BF = jnp.bfloat16
_DISPATCH_CASES = {
    # op: (make, args, kernels on h100 under "auto", on a100, on h100 under "triton")
    "chunked_linear_attention": (
        _grad_of(chunked_linear_attention), [((1, 128, 2, 64), _BF)] * 3,
        ["mosaic_gpu", "mosaic_gpu"], ["triton", "triton"], ["triton", "triton"]),
    "delta_rule": (
        _grad_of(lambda q, b, **kw: delta_rule(q, q, q, b, log_gate=-b, **kw)),
        [((1, 128, 2, 64), _BF), ((1, 128, 2), jnp.float32)],
        # A100: the Triton backward kernel is built from Hopper on (XLA's backward there).
        ["mosaic_gpu", "mosaic_gpu"], ["triton"], ["triton", "triton"]),
    "linear_scan": (
        _grad_of(lambda a, **kw: linear_scan(a, a, **kw)),
        [((1, 64, 128), jnp.float32)],
        # no Mosaic GPU backward: the Triton transposed scan
        ["mosaic_gpu", "triton"], ["triton", "triton"], ["triton", "triton"]),
    "selective_scan": (
        lambda: lambda u, dt, a, b: selective_scan(u, dt, a, b, b, implementation="pallas")[0],
        [((1, 64, 128), jnp.float32), ((1, 64, 128), jnp.float32), ((128, 16), jnp.float32),
         ((1, 64, 1, 16), jnp.float32)],
        ["mosaic_gpu"], ["triton"], ["triton"]),
}


@pytest.mark.compile
@pytest.mark.parametrize("op", list(_DISPATCH_CASES))
def test_auto_backend_picks_mosaic_on_hopper_and_triton_elsewhere(op):
    """Forward and backward decide alike: the h100 program holds the op's Mosaic GPU kernels
    (the backward's too, where there is one, reading what the Mosaic forward wrote), the a100
    one the Triton kernels, and gpu_backend("triton") keeps Triton on the h100."""
    _cpu_host()
    make, args, hopper, a100, triton = _DISPATCH_CASES[op]
    assert _lowered_kinds("h100", make, args) == hopper
    assert _lowered_kinds("a100", make, args) == a100
    assert _lowered_kinds("h100", make, args, backend="triton") == triton


def test_auto_backend_keeps_triton_where_the_gpu_is_unknown():
    """A CPU host lowering for "cuda" with no mesh (an export that may run on any GPU): Triton
    under "auto"; gpu_backend("mosaic") assumes Hopper there, as JAX's Triton lowering does."""
    _cpu_host()
    assert _dispatch.cuda_compute_capability() is None
    assert not _dispatch.use_mosaic_gpu(None)
    with _dispatch.gpu_backend("mosaic"):
        assert _dispatch.use_mosaic_gpu(None)
        assert not _dispatch.use_mosaic_gpu(True)     # the generic interpreter: Triton
    with _dispatch.gpu_backend("triton"):
        assert not _dispatch.use_mosaic_gpu(None)
    assert _dispatch.use_mosaic_gpu(_dispatch.gpu_interpret_params())


# ---------------------------------------------------------------------------------------------
# delta_rule with float32 inputs: every float32 operand of a WGMMA as 3 bf16 pieces (24 bits of
# mantissa, float32's): key dim 64 with one pipeline stage, 128 on narrower value blocks
# (the wide-key tests below).

# The Triton float32 path's tolerance (tests/pallas_kernels/test_delta_rule.py).
DELTA_F32_TOL = 1e-5


def _check_delta_op(inputs, seg, *, chunk_size, tol, state_tol, kernels):
    """The public delta_rule op inside pallas_interpret("gpu") (race detection on) against
    float64 autodiff of the reference: o (in v's dtype), the final state and the gradient of
    every input the call reads. With `seg`, the call is gated (g), segmented and starts from
    h0; without, none of them. `kernels`: the Mosaic kernels its program must hold."""
    q, k, v, beta, g, h0 = inputs
    kw = lambda g, h0: {} if seg is None else dict(log_gate=g, initial_state=h0,
                                                      segment_ids=seg)

    def loss(impl):
        def f(q, k, v, beta, g, h0):
            o, s = delta_rule(q, k, v, beta, chunk_size=chunk_size, implementation=impl,
                              **kw(g, h0))
            return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(s ** 2), (o, s)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))

    ref = kt.float64_run(loss("reference"), *inputs)
    with _dispatch.pallas_interpret("gpu"):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(*inputs))
        (_, (o, s)), grads = loss("pallas")(*inputs)
    assert all(name in jaxpr for name in kernels), kernels
    assert o.dtype == v.dtype
    kt.assert_close(o, ref[0][1][0], tol, "o")
    kt.assert_close(s, ref[0][1][1], state_tol, "final_state")
    names = ["dq", "dk", "dv", "dbeta"] + ([] if seg is None else ["dg", "dh0"])
    for name, x, r in zip(names, grads, ref[1]):
        kt.assert_close(x, r, tol, name)


def test_delta_rule_float32_op_in_gpu_interpret_mode():
    """The public op with float32 inputs inside pallas_interpret("gpu") (race detection on):
    the Mosaic forward and the Mosaic reverse scan of its backward, with a gate, segment_ids
    (resets inside chunks, different per batch row), an initial state and chunk_size=16. The
    outputs, final state and every gradient against float64 autodiff of the reference."""
    q, k, v, beta, g, h0 = _delta_inputs((2, 40, 1, 16, 16), jnp.float32, seed=1)
    seg = jnp.stack([jnp.repeat(jnp.arange(2), 20), jnp.repeat(jnp.arange(4), 10)])
    assert delta_mgpu.supports(q, k, v, h0, 16)

    _check_delta_op((q, k, v, beta, g, h0), seg, chunk_size=16, tol=DELTA_F32_TOL,
                    state_tol=DELTA_F32_TOL, kernels=("delta_rule_fwd_kernel",
                                                       "delta_rule_bwd_kernel"))


# Wide keys: S [Kd, vb] must hold every key row (u = U~ - W S sums over them), so these calls
# narrow the value block per program instead (`mosaic_gpu._plan`: 32 or 16 columns).
_WIDE_CASES = [((1, 24, 1, 256, 24), jnp.bfloat16), ((1, 24, 1, 128, 24), jnp.float32)]


@pytest.mark.parametrize("shape,dtype", _WIDE_CASES, ids=["K256-bf16", "K128-f32"])
def test_delta_rule_wide_key_op_in_gpu_interpret_mode(shape, dtype):
    """Key dim 256 bf16 (forward and reverse scan on 16 value columns a program) and 128 float32
    (forward 16, reverse scan 32): the public op inside pallas_interpret("gpu") (race detection
    on) with a gate, segment_ids (resets inside chunks), an initial state and chunk_size=16;
    V=24 leaves a padded value block. Outputs, final state and every gradient against float64
    autodiff of the reference."""
    q, k, v, beta, g, h0 = _delta_inputs(shape, dtype, seed=4)
    seg = jnp.repeat(jnp.arange(3), 10)[None, :shape[1]]
    assert delta_mgpu.supports(q, k, v, h0, 16)
    vb = [delta_mgpu._plan(kernel, shape[3], dtype, True)[0] for kernel in ("fwd", "bwd")]
    assert vb == ([16, 16] if dtype == jnp.bfloat16 else [16, 32])

    tol, state_tol = ((BF16_TOL, DELTA_STATE_TOL) if dtype == jnp.bfloat16
                      else (DELTA_F32_TOL, DELTA_F32_TOL))
    _check_delta_op((q, k, v, beta, g, h0), seg, chunk_size=16, tol=tol, state_tol=state_tol,
                    kernels=("delta_rule_fwd_kernel", "delta_rule_bwd_kernel"))


# float32 at key dim 256 (`mosaic_gpu._state_walk` / `_reverse_walk`): W = T diag(bg) K and
# Kd = diag(dec) K, so the kernels take K and T in pieces plus two row vectors (W, Qg, Kd in
# pieces do not fit the SMEM), the forward writes only the chunk states and XLA makes o.
@pytest.mark.parametrize("decays", [True, False], ids=["gated-segments-h0", "plain"])
def test_delta_rule_float32_key_dim_256_op_in_gpu_interpret_mode(decays):
    """The public op, float32 key dim 256, inside pallas_interpret("gpu") (race detection on):
    T 128 in two chunks of 64, V=24 (padded value blocks: 32 columns a forward program, 16 a
    reverse-scan one); with a gate, segment_ids (a reset inside each chunk) and an initial
    state, or none of them. Outputs, final state and every gradient against float64 autodiff
    of the reference."""
    q, k, v, beta, g, h0 = _delta_inputs((1, 128, 1, 256, 24), jnp.float32, seed=5)
    seg = jnp.repeat(jnp.arange(3), 48)[None, :128]
    assert delta_mgpu.supports(q, k, v, h0, 64)
    assert [delta_mgpu._plan(kernel, 256, jnp.float32, True) for kernel in ("fwd", "bwd")] == [
        (32, 1, True), (16, 1, True)]
    _check_delta_op((q, k, v, beta, g, h0), seg if decays else None, chunk_size=64,
                    tol=DELTA_F32_TOL, state_tol=DELTA_F32_TOL,
                    kernels=("delta_rule_fwd_factored_kernel", "delta_rule_bwd_factored_kernel"))


@pytest.mark.compile
@pytest.mark.parametrize("target,gated", [("h100", True), ("h200", False)])
def test_delta_rule_float32_compiles_for_hopper(target, gated):
    """float32 forward and backward kernels (key dim 64, 3 bf16 pieces per operand, one
    pipeline stage) lowered by Mosaic GPU and compiled by ptxas for sm_90a (shared memory
    checked against the 227 KiB a block may use), chosen by the default gpu_backend."""
    _cpu_host()
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    q = _aot.abstract((2, 512, 4, 64), jnp.float32, target)
    v = _aot.abstract((2, 512, 4, 128), jnp.float32, target)
    beta = _aot.abstract((2, 512, 4), jnp.float32, target)

    def grad(q, v, beta):
        return jax.grad(lambda q: jnp.sum(delta_rule(
            q, q, v, beta, log_gate=-beta if gated else None, implementation="pallas")[0]))(q)

    compiled, _ = _aot.compile(grad, q, v, beta)
    assert [k["kind"] for k in _aot.report(compiled)["kernels"]] == ["mosaic_gpu"] * 2


@pytest.mark.compile
@pytest.mark.parametrize("key_dim,dtype,gated", [
    (256, jnp.bfloat16, False), (256, jnp.bfloat16, True), (128, jnp.float32, True),
    (256, jnp.float32, True)],
    ids=["K256-bf16", "K256-bf16-gated", "K128-f32-gated", "K256-f32-gated"])
def test_delta_rule_wide_key_compiles_for_hopper(key_dim, dtype, gated):
    """The narrow value blocks of the wide-key plans (forward / reverse scan: 32 / 32, 16 / 16,
    16 / 32, and float32 K256's K, T kernels 32 / 16 value columns, one stage, 64- and 32-byte
    swizzles) lowered by Mosaic GPU and compiled by ptxas for sm_90a (shared memory checked
    against the 227 KiB a block may use), chosen by the default gpu_backend."""
    _cpu_host()
    if not _aot.available("h100"):
        pytest.skip("no compiler plugin for h100")
    q = _aot.abstract((2, 512, 4, key_dim), dtype, "h100")
    v = _aot.abstract((2, 512, 4, 128), dtype, "h100")
    beta = _aot.abstract((2, 512, 4), jnp.float32, "h100")

    def grad(q, v, beta):
        return jax.grad(lambda q: jnp.sum(delta_rule(
            q, q, v, beta, log_gate=-beta if gated else None, implementation="pallas")[0]
            .astype(jnp.float32)))(q)

    compiled, _ = _aot.compile(grad, q, v, beta)
    assert [k["kind"] for k in _aot.report(compiled)["kernels"]] == ["mosaic_gpu"] * 2
