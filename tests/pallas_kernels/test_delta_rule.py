"""The kernel contract for `delta_rule` (WORKSPACE.md, "What every op's tests show")."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels import _testing as kt
from pallas_kernels import delta_rule
from pallas_kernels.delta_rule import pallas as drp

pytestmark = pytest.mark.kernel

F32_TOL = kt.F32_TOL


def make_inputs(key, shape, dtype=jnp.float32, *, gated=True, segments=False, beta=(0.0, 1.0),
                gate=(0.0, 0.5), initial=True):
    """L2-normalised keys (as modules feed them); beta ~ U(beta); log gates ~ -U(gate)."""
    batch, length, heads, key_dim, value_dim = shape
    ks = jax.random.split(key, 8)
    q = jax.random.normal(ks[0], (batch, length, heads, key_dim))
    k = jax.random.normal(ks[1], (batch, length, heads, key_dim))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (batch, length, heads, value_dim))
    b = jax.random.uniform(ks[3], (batch, length, heads), minval=beta[0], maxval=beta[1])
    g = -jax.random.uniform(ks[4], (batch, length, heads), minval=gate[0], maxval=gate[1]) \
        if gated else None
    h0 = jax.random.normal(ks[5], (batch, heads, key_dim, value_dim)) if initial else None
    seg = (jnp.cumsum(jax.random.bernoulli(ks[6], 0.1, (batch, length)), axis=1).astype(jnp.int32)
           if segments else None)
    return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), beta=b, log_gate=g,
                initial_state=h0, segment_ids=seg)


NAMES = ("q", "k", "v", "beta", "log_gate", "initial_state")
_split = functools.partial(kt.given_inputs, names=NAMES)
forward_and_grads = functools.partial(kt.forward_and_grads, delta_rule)
check_against_reference = functools.partial(kt.check_matrix_state_op, delta_rule, names=NAMES)


XLA_CASES = {
    # name: (shape B T H K V, dtype, chunk, make_inputs options)
    "gated-segments-T37-chunk16": ((2, 37, 2, 8, 6), jnp.float32, 16, dict(segments=True)),
    "plain-segments-T50-chunk8": ((1, 50, 2, 8, 8), jnp.float32, 8, dict(gated=False, segments=True)),
    "T1-decode": ((2, 1, 2, 8, 8), jnp.float32, None, {}),
    "T5-recurrent-segments-no-initial-state": ((1, 5, 1, 4, 4), jnp.float32, None,
                                               dict(segments=True, initial=False)),
    "bf16-T100-default-chunk": ((2, 100, 2, 16, 16), jnp.bfloat16, None, dict(segments=True)),
}


@pytest.mark.parametrize("case", list(XLA_CASES))
def test_xla_matches_float64_reference(case):
    shape, dtype, chunk, options = XLA_CASES[case]
    inputs = make_inputs(jax.random.PRNGKey(len(case)), shape, dtype, **options)
    check_against_reference("xla", inputs, chunk_size=chunk, seed=3)


# One batch row per extreme, compared row by row (one compilation for all of them).
EXTREMES = {
    "beta near 0": dict(beta=(0.0, 1e-3)),
    "beta near 1": dict(beta=(0.99, 1.0)),
    "beta in [1, 2] (negative eigenvalues)": dict(beta=(1.0, 2.0)),
    "gate near 1": dict(gate=(0.0, 1e-4)),
    "gate near 0": dict(gate=(5.0, 30.0)),
}


def test_xla_extremes_of_beta_and_gate():
    rows = [make_inputs(jax.random.PRNGKey(i), (1, 40, 2, 8, 8), **options)
            for i, options in enumerate(EXTREMES.values())]
    inputs = {n: (None if rows[0][n] is None else jnp.concatenate([r[n] for r in rows]))
              for n in rows[0]}
    check_against_reference("xla", inputs, chunk_size=16, seed=4)


def test_reference_matches_naive_numpy_loop():
    inputs = make_inputs(jax.random.PRNGKey(0), (2, 9, 3, 4, 5), beta=(0.0, 2.0))
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2]] * 2, np.int32)
    names, arrays = _split(inputs)
    o, s = kt.float64_run(jax.jit(lambda *a: delta_rule(**dict(zip(names, a)), segment_ids=seg,
                                                        implementation="reference")), *arrays)
    q, k, v, beta, g, s0 = (np.asarray(x, np.float64) for x in arrays)
    want = np.zeros(v.shape)
    state = s0.copy()
    for t in range(q.shape[1]):
        for b in range(q.shape[0]):
            for h in range(q.shape[2]):
                if t > 0 and seg[b, t] != seg[b, t - 1]:
                    state[b, h] = 0
                st = np.exp(g[b, t, h]) * state[b, h]
                st = st + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h] - st.T @ k[b, t, h])
                state[b, h] = st
                want[b, t, h] = q.shape[3] ** -0.5 * st.T @ q[b, t, h]
    kt.assert_close(o, want, 1e-12, "o")
    kt.assert_close(s, state, 1e-12, "final_state")


PALLAS_CASES = {
    "gated-segments-T37-chunk16": ((1, 37, 1, 8, 6), 16, dict(segments=True)),
    # Chunks of 13 (not a multiple of 8, not a power of two): every chunk is padded to the tile
    # (16 rows on TPU and GPU), the last chunk (11 tokens) too.
    "gated-segments-T37-chunk13": ((1, 37, 1, 8, 6), 13, dict(segments=True)),
    # Chunks of 20 -> 24 rows on TPU, 32 on GPU, no gate, no initial state.
    "plain-T45-chunk20": ((1, 45, 1, 4, 4), 20, dict(gated=False, initial=False)),
    "plain-T5-one-padded-chunk": ((1, 5, 1, 4, 4), 64, dict(gated=False)),
}
# Interpreters are slow, so the table is pairwise rather than the full product: the tricky
# case (padded chunks, segments, gates, two value blocks) in every runner, each other case in
# the GPU kernel and the TPU kernel once.
PALLAS_RUNS = [(runner, "gated-segments-T37-chunk13") for runner in
               ("pallas_gpu_interpret", "pallas_tpu_generic_interpret", "pallas_tpu_interpret")] + [
    ("pallas_tpu_interpret", "gated-segments-T37-chunk16"),
    ("pallas_gpu_interpret", "plain-T45-chunk20"),
    ("pallas_tpu_interpret", "plain-T45-chunk20"),
    ("pallas_gpu_interpret", "plain-T5-one-padded-chunk"),
    ("pallas_tpu_interpret", "plain-T5-one-padded-chunk")]
PALLAS_RUNS += [("pallas_native", case) for case in PALLAS_CASES
                if "pallas_native" in kt.IMPLEMENTATION_RUNNERS]


@pytest.mark.parametrize("runner,case", PALLAS_RUNS, ids=[f"{r}-{c}" for r, c in PALLAS_RUNS])
def test_pallas_matches_float64_reference(runner, case, monkeypatch):
    ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    # Narrow value blocks so the tiny test shapes still span several programs.
    monkeypatch.setattr(drp.BlockSizes, "get_default", classmethod(lambda cls, t: cls(block_v=4)))
    shape, chunk, options = PALLAS_CASES[case]
    inputs = make_inputs(jax.random.PRNGKey(1), shape, **options)
    check_against_reference(implementation, inputs, chunk_size=chunk, seed=5, ctx=ctx())


def test_64_bit_inputs_auto_takes_xla_and_pallas_refuses():
    """The kernels accumulate in float32: "auto" runs 64-bit inputs on the XLA path (exact to
    the float64 reference, even inside the interpreter context that sends "auto" to the
    kernels, and no custom call when lowered for an accelerator); "pallas" says why it refuses."""
    with jax.enable_x64(True):
        inputs = {n: (None if x is None else x.astype(jnp.float64) if x.dtype == jnp.float32
                      else x)
                  for n, x in make_inputs(jax.random.PRNGKey(8), (1, 21, 1, 4, 4),
                                          segments=True).items()}
        names, arrays = _split(inputs)
        seg = inputs["segment_ids"]
        key = jax.random.PRNGKey(9)
        weights = (jax.random.normal(key, (1, 21, 1, 4), jnp.float64),
                   jax.random.normal(key, (1, 1, 4, 4), jnp.float64))
        run = lambda impl: jax.jit(functools.partial(forward_and_grads, impl, 8, tuple(names)))
        ref = run("reference")(seg, weights, *arrays)
        with kt.IMPLEMENTATION_RUNNERS["pallas_tpu_interpret"][0]():
            got = run("auto")(seg, weights, *arrays)
        assert got[0][0].dtype == jnp.float64 and got[0][1].dtype == jnp.float64
        kt.assert_tree_close(got, ref, 1e-12, "float64 under auto")
        text = kt.lower_for(lambda *a: delta_rule(**dict(zip(names, a)), chunk_size=8), *arrays,
                            platform="tpu")
        assert not kt.custom_calls(text)
        with pytest.raises(ValueError, match=r"implementation='pallas' .* accumulate in float32; "
                                             r"these inputs accumulate in float64"):
            delta_rule(**dict(zip(names, arrays)), implementation="pallas")


def test_long_sequence_stays_finite_and_accurate():
    """T = 16384 through the XLA path: no overflow from the gates, no drift from the chunks, in
    the outputs and in every gradient. The gradients' reference is the same chunked XLA path in
    float64 (the float64 reference recurrence's autodiff over 16384 steps is not affordable;
    the XLA path's float64 gradients equal the reference's at the short lengths above)."""
    inputs = make_inputs(jax.random.PRNGKey(2), (1, 16384, 1, 16, 16), gate=(0.0, 0.05),
                         beta=(0.0, 1.5))
    names, arrays = _split(inputs)
    f = lambda impl: (lambda *a: delta_rule(**dict(zip(names, a)), implementation=impl))
    ref = kt.float64_run(f("reference"), *arrays)
    out = jax.jit(f("xla"))(*arrays)
    kt.assert_tree_close(out, ref, F32_TOL, "T=16384")
    grad = lambda: jax.jit(jax.grad(lambda *a: jnp.sum(f("xla")(*a)[0] ** 2),
                                    argnums=tuple(range(len(arrays)))))
    grads = grad()(*arrays)
    ref_grads = kt.float64_run(grad(), *arrays)
    for name, g, r in zip(names, grads, ref_grads):
        kt.assert_close(g, r, F32_TOL, f"d{name} at T=16384")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_step_by_step_and_split_carry_equal_whole(implementation):
    inputs = make_inputs(jax.random.PRNGKey(11), (2, 24, 2, 8, 8))
    names, arrays = _split(inputs)
    ctx = kt.IMPLEMENTATION_RUNNERS["pallas_gpu_interpret" if implementation == "pallas" else "xla"][0]
    kw = dict(chunk_size=16, implementation=implementation)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(lo, hi, state):
        xs = {n: x[:, lo:hi] for n, x in zip(names, arrays) if n != "initial_state"}
        return delta_rule(**xs, initial_state=state, **kw)

    h0 = inputs["initial_state"]
    with ctx():
        whole, final = run(0, 24, h0)
        if implementation == "xla":   # the interpreter is slow: step by step on the XLA path
            state, steps = h0, []
            step = jax.jit(lambda xs, state: delta_rule(**xs, initial_state=state, **kw))
            for t in range(24):
                y, state = step({n: x[:, t:t + 1] for n, x in zip(names, arrays)
                                 if n != "initial_state"}, state)
                steps.append(y)
            kt.assert_close(jnp.concatenate(steps, 1), whole, 1e-5, "step-by-step")
            kt.assert_close(state, final, 1e-5, "step-by-step final state")
        first, carry = run(0, 9, h0)
        second, final_split = run(9, 24, carry)
    kt.assert_close(jnp.concatenate([first, second], 1), whole, 1e-5, "split-and-carry")
    kt.assert_close(final_split, final, 1e-5, "split-and-carry final state")


def test_segment_ids_equal_separate_documents():
    inputs = make_inputs(jax.random.PRNGKey(5), (1, 30, 2, 8, 8), initial=False)
    names, arrays = _split(inputs)
    xs = dict(zip(names, arrays))
    seg = jnp.array([[0] * 7 + [1] * 15 + [2] * 8], jnp.int32)
    op = jax.jit(functools.partial(delta_rule, chunk_size=8, implementation="xla"))
    packed, _ = op(**xs, segment_ids=seg)
    separate = jnp.concatenate(
        [op(**{n: x[:, s:e] for n, x in xs.items()})[0] for s, e in [(0, 7), (7, 22), (22, 30)]],
        axis=1)
    kt.assert_close(packed, separate, 1e-6, "packed vs separate")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators(platform):
    """The kernels lower for the platform ("auto" picks them where _dispatch.AUTO_ON_CUDA says
    so): the forward's custom call alone, and forward + backward kernels (two calls) under
    grad."""
    inputs = make_inputs(jax.random.PRNGKey(0), (2, 256, 2, 64, 128), jnp.bfloat16,
                         segments=True)
    names, arrays = _split(inputs)
    seg = inputs["segment_ids"]

    def fwd(implementation):
        return lambda *xs: delta_rule(**dict(zip(names, xs)), segment_ids=seg,
                                      implementation=implementation)

    def fwd_bwd(implementation):
        return jax.grad(lambda *a: jnp.sum(fwd(implementation)(*a)[0].astype(jnp.float32)),
                        argnums=tuple(range(len(arrays))))

    kt.assert_auto_lowers(fwd, *arrays, op="delta_rule", platform=platform, count=1)
    kt.assert_auto_lowers(fwd_bwd, *arrays, op="delta_rule", platform=platform, count=2)


def test_gpu_backward_above_its_key_dim_runs_on_xla_from_the_kernels_states():
    """Key dims above GPU_BACKWARD_MAX_KEY_DIM: the Triton forward, then the XLA backward from
    the forward kernel's chunk states (the backward kernel would not fit in shared memory)."""
    inputs = make_inputs(jax.random.PRNGKey(3), (1, 40, 1, drp.GPU_BACKWARD_MAX_KEY_DIM + 8, 4))
    check_against_reference("pallas", inputs, chunk_size=16, seed=7,
                            ctx=kt.IMPLEMENTATION_RUNNERS["pallas_gpu_interpret"][0]())
    names, arrays = _split(inputs)
    seg = inputs["segment_ids"]
    grad = jax.grad(lambda *xs: jnp.sum(delta_rule(**dict(zip(names, xs)), segment_ids=seg,
                                                   implementation="pallas")[0]))
    # The Triton path's limit: on Hopper, "auto" would run this call on the Mosaic GPU kernels
    # (forward and reverse scan: two calls; test_mosaic_gpu.py covers them).
    with _dispatch.gpu_backend("triton"):
        kt.assert_lowers_to(grad, *arrays, platform="cuda", count=1)


def test_auto_on_cpu_uses_no_custom_call():
    inputs = make_inputs(jax.random.PRNGKey(0), (1, 16, 1, 8, 8))
    names, arrays = _split(inputs)
    text = kt.lower_for(lambda *x: delta_rule(**dict(zip(names, x))), *arrays, platform="cpu")
    assert not kt.custom_calls(text)


def test_vmap_jit_grad_compose():
    a = make_inputs(jax.random.PRNGKey(4), (2, 20, 2, 8, 8))
    b = make_inputs(jax.random.PRNGKey(6), (2, 20, 2, 8, 8))
    names, xa = _split(a)
    _, xb = _split(b)
    stacked = [jnp.stack([x, y]) for x, y in zip(xa, xb)]
    f = lambda impl: (lambda *xs: delta_rule(**dict(zip(names, xs)), chunk_size=8,
                                             implementation=impl)[0])
    got = jax.jit(jax.vmap(f("xla")))(*stacked)
    kt.assert_close(got[1], jax.jit(f("reference"))(*xb), F32_TOL, "vmap")
    loss = lambda impl: (lambda *xs: jnp.sum(f(impl)(*xs) ** 2))
    g = jax.jit(jax.vmap(jax.grad(loss("xla"), argnums=(0, 1, 2, 3, 4))))(*stacked)
    g_ref = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2, 3, 4)))(*xb)
    kt.assert_tree_close(tuple(x[1] for x in g), g_ref, F32_TOL, "vmap(grad)")


def test_grad_of_grad_through_custom_vjp():
    inputs = make_inputs(jax.random.PRNGKey(7), (1, 12, 1, 4, 4))
    names, arrays = _split(inputs)

    def hv(impl):
        inner = lambda v: jnp.sum(jax.grad(lambda v_: jnp.sum(delta_rule(
            **dict(zip(names, arrays)) | {"v": v_}, chunk_size=4, implementation=impl)[0] ** 2))(v) ** 2)
        return jax.jit(jax.grad(inner))(arrays[2])

    kt.assert_close(hv("xla"), hv("reference"), 1e-4, "grad of grad")


def _good(**over):
    x = dict(q=np.ones((2, 5, 3, 4), np.float32), k=np.ones((2, 5, 3, 4), np.float32),
             v=np.ones((2, 5, 3, 6), np.float32), beta=np.ones((2, 5, 3), np.float32))
    x.update(over)
    return x


@pytest.mark.parametrize("kwargs,message", [
    (_good(q=np.ones((2, 5, 3), np.float32)), "`q` must have rank 4"),
    (_good(k=np.ones((2, 5, 3, 5), np.float32)), "`k` must have shape"),
    (_good(v=np.ones((2, 4, 3, 6), np.float32)), "`v` must have shape"),
    (_good(q=np.ones((2, 5, 3, 4), np.int32)), "`q` must have a floating"),
    (_good(beta=np.ones((2, 5), np.float32)), "`beta` must have rank 3"),
    (_good(beta=np.ones((2, 5, 2), np.float32)), "`beta` must have shape"),
    (_good(log_gate=np.ones((2, 5, 3, 4), np.float32)), "`log_gate` must have rank 3"),
    (_good(log_gate=np.ones((2, 4, 3), np.float32)), "`log_gate` must have shape"),
    (_good(initial_state=np.ones((2, 3, 4, 5), np.float32)), "`initial_state` must have shape"),
    (_good(segment_ids=np.ones((2, 5), np.float32)), "`segment_ids` must be an integer"),
    (_good(segment_ids=np.ones((2, 4), np.int32)), "`segment_ids` must have shape"),
    (_good(scale="big"), "`scale` must be a Python float"),
    (_good(chunk_size=0), "`chunk_size` must be a positive int"),
    (_good(implementation="triton"), "implementation must be one of"),
])
def test_bad_input_raises_clear_value_error(kwargs, message):
    arrays = {n: kwargs.pop(n) for n in ("q", "k", "v", "beta")}
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda q, k, v, beta: delta_rule(q, k, v, beta, **kwargs))(**arrays)


def test_pallas_chunk_is_the_ops_chunk_padded_for_the_hardware():
    """(op's chunk, tile rows): any chunk size, padded to 8 rows on TPU, a power of two >= 16 on
    GPU; never longer than the sequence (the XLA path's chunk, whose states the backward reads)."""
    assert drp.pallas_chunk(100, 24, "cuda") == (24, 32)
    assert drp.pallas_chunk(100, 24, "tpu") == (24, 24)
    assert drp.pallas_chunk(100, 13, "tpu") == (13, 16)
    assert drp.pallas_chunk(5, 64, "tpu") == (5, 8) and drp.pallas_chunk(5, 64, "cuda") == (5, 16)
