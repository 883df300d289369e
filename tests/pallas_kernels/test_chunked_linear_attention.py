"""The kernel contract for `chunked_linear_attention` (WORKSPACE.md, "What every op's tests show")."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import chunked_linear_attention
from pallas_kernels import _testing as kt
from pallas_kernels.chunked_linear_attention import pallas as clap

pytestmark = pytest.mark.kernel

F32_TOL = 1e-5
BF16_TOL = 1e-2
GATES = [None, "scalar", "vector"]


def make_inputs(key, shape, gate, *, dtype=jnp.float32, segments=False, initial=True,
                gate_range=(0.8, 1.0)):
    """q, k, v ~ N(0, 1); decays exp(g) uniform in `gate_range` (or a constant log gate)."""
    batch, length, heads, kdim, vdim = shape
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (batch, length, heads, kdim)).astype(dtype)
    k = jax.random.normal(ks[1], (batch, length, heads, kdim)).astype(dtype)
    v = jax.random.normal(ks[2], (batch, length, heads, vdim)).astype(dtype)
    g = None
    if gate is not None:
        gshape = (batch, length, heads) + ((kdim,) if gate == "vector" else ())
        if isinstance(gate_range, float):
            g = jnp.full(gshape, gate_range, jnp.float32)
        else:
            g = jnp.log(jax.random.uniform(ks[3], gshape, minval=gate_range[0],
                                           maxval=gate_range[1]))
    h0 = jax.random.normal(ks[4], (batch, heads, kdim, vdim)) if initial else None
    seg = None
    if segments:
        seg = jnp.cumsum(jax.random.bernoulli(ks[5], 0.08, (batch, length)), axis=1).astype(jnp.int32)
    return q, k, v, g, h0, seg


def forward_and_grads(implementation, q, k, v, g, h0, seg, weights, chunk_size=None):
    """Outputs and the gradient of a weighted sum of both outputs in q, k, v, log_gate, h0."""
    w_o, w_s = weights

    def loss(q, k, v, g, h0):
        o, s = chunked_linear_attention(q, k, v, log_gate=g, initial_state=h0, segment_ids=seg,
                                        chunk_size=chunk_size, implementation=implementation)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)

    out = chunked_linear_attention(q, k, v, log_gate=g, initial_state=h0, segment_ids=seg,
                                   chunk_size=chunk_size, implementation=implementation)
    return out, jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, h0)


def weights_for(key, shape):
    batch, length, heads, kdim, vdim = shape
    k1, k2 = jax.random.split(key)
    return (jax.random.normal(k1, (batch, length, heads, vdim)),
            jax.random.normal(k2, (batch, heads, kdim, vdim)))


def check(implementation, shape, gate, *, seed=0, dtype=jnp.float32, segments=False,
          chunk_size=None, gate_range=(0.8, 1.0), tol=None, ctx=None):
    key = jax.random.PRNGKey(seed)
    q, k, v, g, h0, seg = make_inputs(key, shape, gate, dtype=dtype, segments=segments,
                                      gate_range=gate_range)
    weights = weights_for(jax.random.fold_in(key, 1), shape)
    # jit: one compiled program for the outputs and the gradients (op-by-op dispatch of the
    # chunked algebra and of the reference's scan cost far more CPU than one compile).
    ref_out, ref_grads = kt.float64_run(
        jax.jit(functools.partial(forward_and_grads, "reference", chunk_size=chunk_size)),
        q, k, v, g, h0, seg, weights)
    with ctx or kt.IMPLEMENTATION_RUNNERS["xla"][0]():
        run = functools.partial(forward_and_grads, implementation, chunk_size=chunk_size)
        out, grads = jax.jit(run)(q, k, v, g, h0, seg, weights)
    tol = tol or (BF16_TOL if dtype == jnp.bfloat16 else F32_TOL)
    assert out[0].dtype == dtype and out[1].dtype == jnp.float32
    kt.assert_close(out[0], ref_out[0], tol, "o")
    kt.assert_close(out[1], ref_out[1], tol, "final_state")
    for name, gr, r in zip(["dq", "dk", "dv", "dlog_gate", "dinitial_state"], grads, ref_grads):
        if r is None:
            assert gr is None
            continue
        assert gr.dtype == (dtype if name in ("dq", "dk", "dv") else jnp.float32), name
        kt.assert_close(gr, r, tol, name)
    return ref_out, ref_grads


XLA_SHAPES = [(1, 1, 2, 8, 4), (2, 37, 3, 8, 5), (1, 150, 2, 16, 8)]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", XLA_SHAPES, ids=str)
def test_xla_matches_float64_reference(shape, gate):
    # T=1 (the decoding step), one chunk shorter than the default, and T not a multiple of 64
    # with segments resetting inside chunks.
    check("xla", shape, gate, seed=shape[1], segments=shape[1] > 1)


@pytest.mark.parametrize("gate", GATES)
def test_xla_small_chunks_match(gate):
    # Many chunks, vector-gate sub-chunks of 8 inside chunks of 24 (not a power of two).
    check("xla", (1, 100, 2, 8, 4), gate, seed=3, chunk_size=24, segments=True)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("log_gate", [-20.0, -29.0, -1e4, -1e-6], ids=["-20", "-29", "-1e4", "-1e-6"])
def test_strong_and_weak_gates(gate, log_gate):
    """Decays near 0 and near 1: no overflow, no NaN, gradients (including the tiny gate
    gradients of strong decays) still accurate. At -1e4 every exp underflows even in float64, so
    the gate gradient is exactly 0 there (checked as such; the fast paths clamp gates at
    xla.GATE_FLOOR = -30, whose gradient is 0 by contract); at -20 and -29, just above the
    floor (decays of 2e-9 and 3e-13), the reference's gate gradient is not zero and its tiny
    values are checked to the relative tolerance."""
    _, ref_grads = check("xla", (1, 140, 2, 8, 4), gate, seed=5, gate_range=log_gate)
    assert (np.linalg.norm(ref_grads[3]) > 0) == (log_gate > -1e3), "reference gate gradient"


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_mixed_strong_and_weak_gates(gate):
    """A few -1e4 gates among weak ones inside the same chunks. The cumulative gates of the
    chunked form then cancel in float32: a documented ~2e-5 in the gradients, the contract's
    chunked-form bound (well under 1e-4) rather than the recurrent one."""
    q, k, v, g, h0, _ = make_inputs(jax.random.PRNGKey(6), (1, 140, 2, 8, 4), gate)
    g = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(7), 0.1, g.shape), -1e4, g)
    weights = weights_for(jax.random.PRNGKey(8), (1, 140, 2, 8, 4))
    ref = kt.float64_run(jax.jit(functools.partial(forward_and_grads, "reference")),
                         q, k, v, g, h0, None, weights)
    got = jax.jit(functools.partial(forward_and_grads, "xla"))(q, k, v, g, h0, None, weights)
    kt.assert_tree_close(got[0], ref[0], F32_TOL, "outputs")
    kt.assert_tree_close(got[1], ref[1], 5e-5, "grads")


@pytest.mark.parametrize("gate", GATES)
def test_bfloat16_inputs(gate):
    check("xla", (2, 70, 2, 16, 8), gate, seed=9, dtype=jnp.bfloat16)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_long_sequence_stays_finite(gate):
    """T=16384 with decays near 1 and near 0: finite and equal to the float64 recurrence."""
    q, k, v, g, h0, _ = make_inputs(jax.random.PRNGKey(10), (1, 16384, 1, 8, 4), gate,
                                    gate_range=(0.0, 1.0))
    run = lambda impl: jax.jit(lambda q, k, v, g, h0: chunked_linear_attention(
        q, k, v, log_gate=g, initial_state=h0, implementation=impl))
    ref = kt.float64_run(run("reference"), q, k, v, g, h0)
    got = run("xla")(q, k, v, g, h0)
    kt.assert_tree_close(got, ref, F32_TOL, "T=16384")


@pytest.mark.parametrize("gate", GATES)
def test_step_by_step_and_split_carry_equal_whole(gate):
    q, k, v, g, h0, _ = make_inputs(jax.random.PRNGKey(11), (2, 40, 2, 8, 4), gate)
    # one jitted call per distinct length: whole (40), steps (1), the split (23 and 17)
    f = jax.jit(lambda q, k, v, g, s: chunked_linear_attention(
        q, k, v, log_gate=g, initial_state=s, implementation="xla", chunk_size=16))
    part = lambda x, s: None if x is None else x[:, s]
    whole, final = f(q, k, v, g, h0)
    state, outs = h0, []
    for t in range(40):
        o, state = f(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], part(g, slice(t, t + 1)), state)
        outs.append(o)
    kt.assert_close(jnp.concatenate(outs, 1), whole, 1e-6, "step-by-step")
    kt.assert_close(state, final, 1e-6, "step-by-step final state")
    first, carry = f(q[:, :23], k[:, :23], v[:, :23], part(g, slice(None, 23)), h0)
    second, final_split = f(q[:, 23:], k[:, 23:], v[:, 23:], part(g, slice(23, None)), carry)
    kt.assert_close(jnp.concatenate([first, second], 1), whole, 1e-6, "split-and-carry")
    kt.assert_close(final_split, final, 1e-6, "split-and-carry final state")


@pytest.mark.parametrize("gate", GATES)
def test_segment_ids_equal_separate_documents(gate):
    q, k, v, g, _, _ = make_inputs(jax.random.PRNGKey(12), (1, 90, 2, 8, 4), gate)
    seg = jnp.array([[3] * 7 + [1] * 60 + [3] * 23], jnp.int32)   # ids change, not only grow
    f = functools.partial(chunked_linear_attention, implementation="xla", chunk_size=32)
    bounds = [(0, 7), (7, 67), (67, 90)]
    sl = lambda x, s, e: None if x is None else x[:, s:e]

    @jax.jit
    def run(q, k, v, g):
        packed, _ = f(q, k, v, log_gate=g, segment_ids=seg)
        return packed, jnp.concatenate(
            [f(sl(q, s, e), sl(k, s, e), sl(v, s, e), log_gate=sl(g, s, e))[0]
             for s, e in bounds], axis=1)

    packed, separate = run(q, k, v, g)
    kt.assert_close(packed, separate, 1e-6, "packed vs separate")


def test_scale_default_and_traced_scale_gradient():
    q, k, v, g, _, _ = make_inputs(jax.random.PRNGKey(13), (1, 20, 1, 16, 4), "scalar")
    o_default, _ = chunked_linear_attention(q, k, v, log_gate=g)
    o_explicit, _ = chunked_linear_attention(q, k, v, log_gate=g, scale=0.25)
    kt.assert_close(o_default, o_explicit, 1e-7, "scale = key_dim ** -0.5")
    d = jax.grad(lambda s: jnp.sum(chunked_linear_attention(q, k, v, log_gate=g, scale=s)[0]))(0.25)
    kt.assert_close(d, jnp.sum(o_default) / 0.25, 1e-5, "d scale")


def test_vmap_jit_grad_compose():
    # The vector gate under jit(vmap(grad)) is the case that once crashed XLA CPU (YNNPACK
    # fusions on rank-8 intermediates, see xla._vector_gate_scores): keep it.
    q, k, v, g, h0, _ = make_inputs(jax.random.PRNGKey(14), (2, 30, 2, 8, 4), "vector")
    f = lambda q, k, v, g: chunked_linear_attention(q, k, v, log_gate=g, chunk_size=16)[0]
    stacked = [jnp.stack([x, 0.5 * x]) for x in (q, k, v, g)]
    got = jax.jit(jax.vmap(f))(*stacked)
    for i in range(2):
        kt.assert_close(got[i], f(*(x[i] for x in stacked)), 1e-6, f"vmap[{i}]")
    loss = lambda impl: lambda q, k, v, g: jnp.sum(chunked_linear_attention(
        q, k, v, log_gate=g, implementation=impl, chunk_size=16)[0] ** 2)
    grads = jax.jit(jax.vmap(jax.grad(loss("xla"), argnums=(0, 1, 2, 3))))(*stacked)
    ref = kt.float64_run(jax.grad(loss("reference"), argnums=(0, 1, 2, 3)),
                         *(x[1] for x in stacked))
    kt.assert_tree_close([x[1] for x in grads], list(ref), 1e-5, "vmap(grad)")


def test_grad_of_grad_agrees_with_reference():
    q, k, v, g, _, _ = make_inputs(jax.random.PRNGKey(15), (1, 12, 1, 4, 3), "scalar")
    f = lambda impl: jax.jit(jax.grad(lambda v: jnp.sum(jax.grad(lambda q: jnp.sum(
        chunked_linear_attention(q, k, v, log_gate=g, implementation=impl,
                                 chunk_size=8)[0] ** 2))(q) ** 2)))(v)
    kt.assert_close(f("xla"), f("reference"), 1e-5, "grad of grad")


PALLAS_CASES = {
    # three chunks, the last one partial; value blocks of 8 (two on TPU) or 16 (GPU minimum)
    "vector-segments-T40-chunk16": ((1, 40, 2, 8, 16), "vector", 16),
    "scalar-segments-T40-chunk16": ((1, 40, 2, 16, 8), "scalar", 16),
    # chunks of 24 are padded to 32 rows on GPU: the per-chunk padding; two GPU value blocks
    "vector-segments-T40-chunk24": ((1, 40, 2, 8, 32), "vector", 24),
    "plain-segments-T40-chunk16": ((1, 40, 2, 8, 16), None, 16),
    # one chunk of 5 padded to the hardware tile, the default chunk size, no segments
    "scalar-T5-one-padded-chunk": ((1, 5, 1, 8, 8), "scalar", None),
}
# Interpreters are slow: a segmented multi-chunk case in every runner, each gate kind in the TPU
# and in the GPU kernels (their bodies are shared, their operand layouts differ).
PALLAS_RUNS = [("pallas_gpu_interpret", "vector-segments-T40-chunk24"),
               ("pallas_gpu_interpret", "scalar-segments-T40-chunk16"),
               ("pallas_tpu_generic_interpret", "plain-segments-T40-chunk16"),
               ("pallas_tpu_interpret", "vector-segments-T40-chunk16"),
               ("pallas_tpu_interpret", "scalar-T5-one-padded-chunk")]
# On a GPU or TPU machine, every case through the compiled kernels too.
PALLAS_RUNS += [("pallas_native", case) for case in PALLAS_CASES
                if "pallas_native" in kt.IMPLEMENTATION_RUNNERS]


def _narrow_value_blocks(monkeypatch):
    # So the tiny test shapes still span several programs along V.
    monkeypatch.setattr(clap.BlockSizes, "get_default", classmethod(lambda cls, t: cls(block_v=8)))


@pytest.mark.parametrize("runner,case", PALLAS_RUNS, ids=[f"{r}-{c}" for r, c in PALLAS_RUNS])
def test_pallas_matches_float64_reference(runner, case, monkeypatch):
    """Forward, final state and every gradient (q, k, v, log_gate, initial_state) of the Pallas
    forward and backward kernels against the float64 recurrence."""
    _narrow_value_blocks(monkeypatch)
    ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    shape, gate, chunk = PALLAS_CASES[case]
    check(implementation, shape, gate, seed=21, segments="segments" in case,
          chunk_size=chunk, ctx=ctx())


def test_pallas_mixed_strong_and_weak_vector_gates(monkeypatch):
    """-1e4 log gates among weak ones: the kernels exponentiate only differences <= 0 (no
    overflow, no NaN), and the gradients keep the chunked form's bound (see the XLA test)."""
    _narrow_value_blocks(monkeypatch)
    shape = (1, 40, 2, 8, 8)
    q, k, v, g, h0, _ = make_inputs(jax.random.PRNGKey(22), shape, "vector")
    g = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(23), 0.1, g.shape), -1e4, g)
    weights = weights_for(jax.random.PRNGKey(24), shape)
    run = lambda impl: functools.partial(forward_and_grads, impl, chunk_size=16)
    ref = kt.float64_run(run("reference"), q, k, v, g, h0, None, weights)
    with kt.IMPLEMENTATION_RUNNERS["pallas_gpu_interpret"][0]():
        got = jax.jit(run("pallas"))(q, k, v, g, h0, None, weights)
    kt.assert_tree_close(got[0], ref[0], F32_TOL, "outputs")
    kt.assert_tree_close(got[1], ref[1], 5e-5, "grads")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("gate", GATES)
def test_lowers_for_accelerators(platform, gate):
    """The kernels lower for the platform ("auto" picks them where _dispatch.AUTO_ON_CUDA says
    so): one custom call for the forward, a second for the backward."""
    q, k, v, g, h0, seg = make_inputs(jax.random.PRNGKey(0), (2, 150, 2, 64, 128), gate,
                                      dtype=jnp.bfloat16, segments=True)

    def fwd(implementation):
        return lambda q, k, v, g, h0: chunked_linear_attention(
            q, k, v, log_gate=g, initial_state=h0, segment_ids=seg,
            implementation=implementation)

    def fwd_bwd(implementation):
        def loss(q, k, v, g, h0):
            o, s = fwd(implementation)(q, k, v, g, h0)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s ** 2)
        argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
        return jax.grad(loss, argnums=argnums)

    args = (q, k, v, g, h0)
    kt.assert_auto_lowers(fwd, *args, op="chunked_linear_attention", platform=platform, count=1)
    kt.assert_auto_lowers(fwd_bwd, *args, op="chunked_linear_attention", platform=platform,
                          count=2)


def test_pallas_rejects_64_bit_and_auto_keeps_it_on_xla():
    q, k, v, g, _, _ = make_inputs(jax.random.PRNGKey(0), (1, 8, 1, 4, 4), "scalar")
    with jax.enable_x64(True):
        q, k, v, g = (x.astype(jnp.float64) for x in (q, k, v, g))
        text = kt.lower_for(lambda *a: chunked_linear_attention(*a[:3], log_gate=a[3]),
                            q, k, v, g, platform="tpu")
        assert not kt.custom_calls(text)
        with pytest.raises(ValueError, match="accumulate in float32"):
            with kt.IMPLEMENTATION_RUNNERS["pallas_gpu_interpret"][0]():
                chunked_linear_attention(q, k, v, log_gate=g, implementation="pallas")


def test_auto_on_cpu_uses_no_custom_call():
    q, k, v, g, _, _ = make_inputs(jax.random.PRNGKey(0), (1, 16, 1, 8, 8), "scalar")
    text = kt.lower_for(lambda q, k, v, g: chunked_linear_attention(q, k, v, log_gate=g),
                        q, k, v, g, platform="cpu")
    assert not kt.custom_calls(text)


_Q = np.ones((2, 5, 3, 4), np.float32)
_V = np.ones((2, 5, 3, 6), np.float32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q=np.ones((2, 5, 4), np.float32)), "`q` must have rank 4"),
    (dict(k=np.ones((2, 5, 3, 5), np.float32)), "`k` must have the shape of `q`"),
    (dict(v=np.ones((2, 4, 3, 6), np.float32)), "`v` must have shape"),
    (dict(q=np.ones((2, 5, 3, 4), np.int32)), "`q` must have a floating"),
    (dict(v=np.ones((2, 5, 3, 6), np.complex64)), "`v` must have a real floating"),
    (dict(log_gate=np.zeros((2, 5, 4), np.float32)), "`log_gate` must have shape"),
    (dict(log_gate=np.zeros((2, 5, 3, 6), np.float32)), "`log_gate` must have shape"),
    (dict(log_gate=np.zeros((2, 5, 3), np.int32)), "`log_gate` must have a floating"),
    (dict(initial_state=np.zeros((2, 3, 6, 4), np.float32)), "`initial_state` must have shape"),
    (dict(initial_state=np.zeros((2, 3, 4), np.float32)), "`initial_state` must have rank 4"),
    (dict(segment_ids=np.zeros((2, 5), np.float32)), "`segment_ids` must be an integer"),
    (dict(segment_ids=np.zeros((2, 4), np.int32)), "`segment_ids` must have shape"),
    (dict(scale=np.ones(2, np.float32)), "`scale` must be"),
    (dict(chunk_size=0), "`chunk_size` must be a positive integer"),
    (dict(implementation="triton"), "implementation must be one of"),
])
def test_bad_input_raises_clear_value_error(kwargs, message):
    q, k, v = kwargs.pop("q", _Q), kwargs.pop("k", _Q), kwargs.pop("v", _V)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda q, k, v: chunked_linear_attention(q, k, v, **kwargs))(q, k, v)


# ---- bonus=u: RWKV-6's read of the previous state plus the current token ----------------------

def rwkv6_recurrence(q, k, v, g, u, h0, seg, scale):
    """RWKV-6 (Eagle and Finch) token by token, written out here independently of the op:
    o_t = scale * q_t^T (S_{t-1} + diag(u) k_t v_t^T), S_t = diag(exp g_t) S_{t-1} + k_t v_t^T,
    S_{t-1} = 0 at a document's first token (segment ids), h0 before the first token."""
    def step(s, xs):
        q_t, k_t, v_t, g_t, start_t = xs
        s = jnp.where(start_t[:, None, None, None], jnp.zeros_like(s), s)
        kv = k_t[..., :, None] * v_t[..., None, :]
        read = s + u[None, :, :, None] * kv
        o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, read)
        decay = jnp.ones_like(k_t) if g_t is None else jnp.exp(
            g_t if g_t.ndim == 3 else g_t[..., None] * jnp.ones_like(k_t))
        return decay[..., None] * s + kv, o_t

    B, T = q.shape[:2]
    starts = jnp.zeros((B, T), bool) if seg is None else jnp.concatenate(
        [jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    s, o = jax.lax.scan(step, h0, tuple(map(tm, (q, k, v, g, starts))))
    return jnp.swapaxes(o, 0, 1), s


def _bonus_inputs(key, shape, gate, segments=True):
    q, k, v, g, h0, seg = make_inputs(key, shape, gate, segments=segments, gate_range=(0.5, 1.0))
    u = jax.random.normal(jax.random.fold_in(key, 9), shape[2:4])
    return q, k, v, g, h0, seg, u


def _bonus_loss_and_grads(fn, q, k, v, g, h0, u, weights):
    w_o, w_s = weights

    def loss(q, k, v, g, h0, u):
        o, s = fn(q, k, v, g, h0, u)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s)
    return fn(q, k, v, g, h0, u), jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, g, h0, u)


BONUS_CASES = [((2, 37, 2, 8, 5), gate, "xla") for gate in GATES] + [
    ((2, 37, 2, 8, 5), "vector", "reference"), ((1, 1, 2, 8, 4), "scalar", "xla")]


@pytest.mark.parametrize("shape,gate,implementation", BONUS_CASES, ids=str)
def test_bonus_matches_rwkv6_recurrence(shape, gate, implementation):
    """Outputs, final state and every gradient (q, k, v, log_gate, initial_state, bonus) against
    the float64 RWKV-6 loop, with documents packed by segment ids and chunks of 16 (and T = 1,
    the decoding step)."""
    key = jax.random.PRNGKey(30 + shape[1])
    q, k, v, g, h0, seg, u = _bonus_inputs(key, shape, gate, segments=shape[1] > 1)
    weights = weights_for(jax.random.fold_in(key, 1), shape)
    ref = kt.float64_run(jax.jit(lambda *a: _bonus_loss_and_grads(
        lambda q, k, v, g, h0, u: rwkv6_recurrence(q, k, v, g, u, h0, seg, shape[3] ** -0.5),
        *a)), q, k, v, g, h0, u, weights)
    op = lambda q, k, v, g, h0, u: chunked_linear_attention(
        q, k, v, log_gate=g, initial_state=h0, segment_ids=seg, bonus=u, chunk_size=16,
        implementation=implementation)
    got = jax.jit(lambda *a: _bonus_loss_and_grads(op, *a))(q, k, v, g, h0, u, weights)
    (o, s), grads = got
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    kt.assert_close(o, ref[0][0], F32_TOL, "o")
    kt.assert_close(s, ref[0][1], F32_TOL, "final_state")
    for name, gr, r in zip(["dq", "dk", "dv", "dlog_gate", "dinitial_state", "dbonus"],
                           grads, ref[1]):
        if r is None:
            assert gr is None, name
            continue
        kt.assert_close(gr, r, F32_TOL, name)


def test_bonus_split_and_continue_equals_whole(gate="vector"):
    """The final state is S_{T-1} (the last token written), so a split call, and token-by-token
    decoding, continue exactly; a document starting exactly at the split is cut there."""
    q, k, v, g, h0, _, u = _bonus_inputs(jax.random.PRNGKey(40), (2, 30, 2, 8, 4), gate,
                                         segments=False)
    seg = jnp.array([[0] * 30, [0] * 19 + [1] * 11], jnp.int32)
    f = jax.jit(lambda q, k, v, g, s, seg: chunked_linear_attention(
        q, k, v, log_gate=g, initial_state=s, segment_ids=seg, bonus=u, chunk_size=8,
        implementation="xla"))
    whole, final = f(q, k, v, g, h0, seg)
    first, carry = f(q[:, :19], k[:, :19], v[:, :19], g[:, :19], h0, seg[:, :19])
    # The second row's document starts at the split: its carried state must not enter.
    carry = carry.at[1].set(0.0)
    second, final_split = f(q[:, 19:], k[:, 19:], v[:, 19:], g[:, 19:], carry, seg[:, 19:])
    kt.assert_close(jnp.concatenate([first, second], 1), whole, 1e-6, "split outputs")
    kt.assert_close(final_split, final, 1e-6, "split final state")
    state, outs = h0[:1], []
    for t in range(30):
        o, state = f(q[:1, t:t + 1], k[:1, t:t + 1], v[:1, t:t + 1], g[:1, t:t + 1], state,
                     seg[:1, t:t + 1])
        outs.append(o)
    kt.assert_close(jnp.concatenate(outs, 1), whole[:1], 1e-6, "step-by-step outputs")
    kt.assert_close(state, final[:1], 1e-6, "step-by-step final state")


@pytest.mark.parametrize("bonus,message", [
    (np.ones((3, 5), np.float32), r"`bonus` must have shape \[heads, key_dim\]"),
    (np.ones((2, 3, 4), np.float32), "`bonus` must have rank 2"),
    (np.ones((3, 4), np.int32), "`bonus` must have a floating"),
    (np.ones((3, 4), np.complex64), "`bonus` must have a real floating"),
])
def test_bad_bonus_raises_clear_value_error(bonus, message):
    with pytest.raises(ValueError, match=message):
        chunked_linear_attention(_Q, _Q, _V, bonus=bonus)


def test_bonus_under_sequence_parallel_equals_whole():
    """The shift happens on the whole sequence before the op's sequence-parallel split, so with
    time over 4 shards (segments across and at shard boundaries) outputs, final state and every
    gradient (bonus included) equal the unsplit call."""
    from tests.pallas_kernels import test_sequence_parallel as sp_test
    B_, T_, H_, K_, V_ = sp_test.B, sp_test.T, sp_test.H, sp_test.K, sp_test.V
    ks = jax.random.split(jax.random.PRNGKey(42), 6)
    q, k = (jax.random.normal(ks[i], (B_, T_, H_, K_)) for i in range(2))
    v = jax.random.normal(ks[2], (B_, T_, H_, V_))
    s0 = jax.random.normal(ks[3], (B_, H_, K_, V_))
    g = -0.3 * jnp.abs(jax.random.normal(ks[4], (B_, T_, H_, K_)))
    u = jax.random.normal(ks[5], (H_, K_))
    seg = sp_test._segments()

    def fn(q, k, v, s0, g, u):
        return chunked_linear_attention(q, k, v, log_gate=g, initial_state=s0, segment_ids=seg,
                                        bonus=u, chunk_size=2, implementation="xla")
    sp_test._check_split_equals_whole(fn, (q, k, v, s0, g, u), (0, 1, 2, 3, 4, 5),
                                      "chunked_linear_attention")
