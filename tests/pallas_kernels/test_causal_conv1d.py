"""The kernel contract for `causal_conv1d` and `causal_conv1d_update` (WORKSPACE.md)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing as kt
from pallas_kernels import causal_conv1d, causal_conv1d_update
from pallas_kernels.causal_conv1d import pallas as ccp

pytestmark = pytest.mark.kernel

F32_TOL = 1e-5
BF16_TOL = 1e-2


def make_inputs(key, shape, width, dtype=jnp.float32, *, segments=True):
    batch, length, channels = shape
    k = jax.random.split(key, 7)
    x = jax.random.normal(k[0], shape).astype(dtype)
    weight = jax.random.normal(k[1], (width, channels)) * 0.5
    bias = jax.random.normal(k[2], (channels,))
    state = jax.random.normal(k[3], (batch, width - 1, channels))
    seg = None
    if segments and length > 1:
        seg = jnp.cumsum(jax.random.bernoulli(k[4], 0.15, (batch, length)), 1).astype(jnp.int32)
    weights = (jax.random.normal(k[5], shape), jax.random.normal(k[6], (batch, width - 1, channels)))
    return (x, weight, bias, state), seg, weights


def forward_and_grads(implementation, activation, arrays, seg, weights):
    def run(x, w, b, s):
        return causal_conv1d(x, w, bias=b, initial_state=s, activation=activation,
                             segment_ids=seg, implementation=implementation)

    def loss(*xs):
        y, final = run(*xs)
        return jnp.sum(y.astype(jnp.float32) * weights[0]) + jnp.sum(final * weights[1])

    return run(*arrays), jax.grad(loss, argnums=(0, 1, 2, 3))(*arrays)


def check(implementation, shape, width, dtype=jnp.float32, activation="silu", seed=0, ctx=None):
    arrays, seg, weights = make_inputs(jax.random.PRNGKey(seed), shape, width, dtype)
    # jit: one compiled program per implementation (op-by-op dispatch costs far more CPU)
    ref_out, ref_grads = kt.float64_run(
        jax.jit(functools.partial(forward_and_grads, "reference", activation)),
        arrays, seg, weights)
    with ctx or kt.IMPLEMENTATION_RUNNERS["xla"][0]():
        (y, final), grads = jax.jit(functools.partial(forward_and_grads, implementation,
                                                      activation))(arrays, seg, weights)
    tol = BF16_TOL if dtype == jnp.bfloat16 else F32_TOL
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32  # float32 weights promote
    kt.assert_close(y, ref_out[0], tol, "y")
    kt.assert_close(final, ref_out[1], tol, "final_state")
    for name, g, r in zip(("dx", "dweight", "dbias", "dinitial_state"), grads, ref_grads):
        kt.assert_close(g, r, tol, name)


XLA_CASES = [
    ((2, 1, 8), 4, jnp.float32, "silu"),       # T = 1
    ((2, 37, 200), 4, jnp.float32, None),
    ((1, 517, 64), 3, jnp.float32, "swish"),   # long-ish, W = 3
    ((2, 30, 16), 2, jnp.bfloat16, "silu"),
    ((1, 20, 8), 1, jnp.float32, "silu"),      # W = 1: an empty carried window
]


@pytest.mark.parametrize("shape,width,dtype,activation", XLA_CASES,
                         ids=[f"{s}-W{w}-{jnp.dtype(d).name}-{a}" for s, w, d, a in XLA_CASES])
def test_xla_matches_float64_reference(shape, width, dtype, activation):
    check("xla", shape, width, dtype, activation, seed=sum(shape) + width)


SMALL_BLOCKS = {"tpu": ccp.BlockSizes(block_t=16, block_c=128),
                "cuda": ccp.BlockSizes(block_t=0, block_c=16)}
PALLAS_CASES = [((1, 1, 8), 4), ((2, 45, 200), 4), ((1, 37, 20), 3)]


# Pairwise rather than the full product (interpreters are slow): the case with several time and
# channel blocks, a partial one of each, in every runner; T = 1 and W = 3 each in one runner.
PALLAS_RUNS = [(runner, PALLAS_CASES[1]) for runner in kt.PALLAS_RUNNERS] + [
    ("pallas_tpu_interpret", PALLAS_CASES[0]), ("pallas_gpu_interpret", PALLAS_CASES[2])]
PALLAS_RUNS += [("pallas_native", case) for case in (PALLAS_CASES[0], PALLAS_CASES[2])
                if "pallas_native" in kt.IMPLEMENTATION_RUNNERS]


@pytest.mark.parametrize("runner,shape,width", [(r, *c) for r, c in PALLAS_RUNS],
                         ids=[f"{s}-W{w}-{r}" for r, (s, w) in PALLAS_RUNS])
def test_pallas_matches_float64_reference(runner, shape, width, monkeypatch):
    ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    monkeypatch.setattr(ccp.BlockSizes, "get_default", classmethod(lambda cls, t: SMALL_BLOCKS[t]))
    check(implementation, shape, width, seed=7, ctx=ctx())


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_update_and_split_carry_equal_whole(implementation):
    (x, weight, bias, state), _, _ = make_inputs(jax.random.PRNGKey(1), (2, 11, 24), 4)
    ctx = kt.IMPLEMENTATION_RUNNERS["pallas_gpu_interpret" if implementation == "pallas"
                                    else "xla"][0]
    call = functools.partial(causal_conv1d, weight=weight, bias=bias, activation="silu",
                             implementation=implementation)
    with ctx():
        whole, final = call(x, initial_state=state)
        s, one, upd = state, [], []
        for t in range(11):
            y, s_next = call(x[:, t:t + 1], initial_state=s)
            y_u, s_u = causal_conv1d_update(x[:, t], s, weight, bias=bias, activation="silu")
            kt.assert_close(s_u, s_next, 0.0, f"update state at {t}")
            one.append(y)
            upd.append(y_u)
            s = s_next
        y1, carry = call(x[:, :6], initial_state=state)
        y2, final_split = call(x[:, 6:], initial_state=carry)
    kt.assert_close(jnp.concatenate(one, 1), whole, 1e-6, "one token at a time")
    kt.assert_close(jnp.stack(upd, 1), whole, 1e-6, "causal_conv1d_update")
    kt.assert_close(s, final, 0.0, "final state")
    kt.assert_close(jnp.concatenate([y1, y2], 1), whole, 1e-6, "split-and-carry")
    kt.assert_close(final_split, final, 0.0, "split-and-carry final state")


def test_packed_segments_equal_separate_documents():
    (x, weight, bias, _), _, _ = make_inputs(jax.random.PRNGKey(2), (1, 20, 8), 4)
    seg = jnp.array([[0] * 6 + [1] * 2 + [2] * 12], jnp.int32)  # a segment shorter than W-1
    packed, last = causal_conv1d(x, weight, bias=bias, segment_ids=seg, implementation="xla")
    parts = [causal_conv1d(x[:, s:e], weight, bias=bias, implementation="xla")
             for s, e in [(0, 6), (6, 8), (8, 20)]]
    kt.assert_close(packed, jnp.concatenate([p[0] for p in parts], 1), 1e-7, "packed")
    kt.assert_close(last, parts[-1][1], 0.0, "last segment's window")
    # A short last segment: its window holds zeros where earlier segments were.
    _, short = causal_conv1d(x[:, :8], weight, segment_ids=seg[:, :8], implementation="xla")
    np.testing.assert_array_equal(short[:, 0], 0.0)
    kt.assert_close(short[:, 1:], x[:, 6:8], 0.0, "short segment's window")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators(platform):
    """The Pallas forward lowers for an accelerator ("auto" picks it where
    _dispatch.AUTO_ON_CUDA says so); the backward is the XLA taps' autodiff (linear, nothing
    stored), so grad adds no second custom call."""
    (x, weight, bias, state), seg, _ = make_inputs(jax.random.PRNGKey(0), (2, 300, 1000), 4,
                                                   jnp.bfloat16)

    def fwd(implementation):
        return lambda x, w, b: causal_conv1d(x, w, bias=b, initial_state=state,
                                             activation="silu", segment_ids=seg,
                                             implementation=implementation)

    def fwd_bwd(implementation):
        return jax.grad(lambda *a: jnp.sum(fwd(implementation)(*a)[0] ** 2), argnums=(0, 1, 2))

    for make in (fwd, fwd_bwd):
        kt.assert_auto_lowers(make, x, weight, bias, op="causal_conv1d", platform=platform,
                              count=1)


def test_vmap_jit_grad_compose():
    (x, weight, bias, state), _, _ = make_inputs(jax.random.PRNGKey(3), (2, 9, 8), 4)
    f = lambda x, w: causal_conv1d(x, w, bias=bias, activation="silu")[0]
    xs, ws = jnp.stack([x, -x]), jnp.stack([weight, weight * 2])
    got = jax.jit(jax.vmap(f))(xs, ws)
    for i in range(2):
        kt.assert_close(got[i], f(xs[i], ws[i]), 1e-7, f"vmap[{i}]")
    g = jax.jit(jax.vmap(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1))))(xs, ws)
    g_ref = jax.grad(lambda x, w: jnp.sum(causal_conv1d(
        x, w, bias=bias, activation="silu", implementation="reference")[0] ** 2),
        argnums=(0, 1))(xs[1], ws[1])
    kt.assert_tree_close((g[0][1], g[1][1]), g_ref, 1e-5, "vmap(grad)")
    # grad of grad through the custom VJP of "auto"
    gg = jax.grad(lambda w: jnp.sum(jax.grad(lambda x: jnp.sum(f(x, w) ** 2))(x) ** 2))(weight)
    gg_ref = jax.grad(lambda w: jnp.sum(jax.grad(lambda x: jnp.sum(causal_conv1d(
        x, w, bias=bias, activation="silu", implementation="reference")[0] ** 2))(x) ** 2))(weight)
    kt.assert_close(gg, gg_ref, 1e-5, "grad of grad")


X = np.ones((2, 5, 4), np.float32)
W = np.ones((3, 4), np.float32)


@pytest.mark.parametrize("args,kwargs,message", [
    ((np.ones((5, 4), np.float32), W), {}, "`x` must have rank 3"),
    ((X.astype(np.int32), W), {}, "`x` must have a floating"),
    ((X, np.ones((3, 5), np.float32)), {}, "`weight` must have shape"),
    ((X, np.ones((4,), np.float32)), {}, "`weight` must have rank 2"),
    ((X, W), dict(bias=np.ones((5,), np.float32)), "`bias` must have shape"),
    ((X, W), dict(initial_state=np.ones((2, 3, 4), np.float32)), "`initial_state` must have shape"),
    ((X, W), dict(activation="relu"), "`activation` must be one of"),
    ((X, W), dict(segment_ids=np.ones((2, 5), np.float32)), "`segment_ids` must be an integer"),
    ((X, W), dict(segment_ids=np.ones((2, 4), np.int32)), "`segment_ids` must have shape"),
    ((X, W), dict(implementation="cuda"), "implementation must be one of"),
])
def test_bad_input_raises_clear_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda x, w: causal_conv1d(x, w, **kwargs))(*args)


@pytest.mark.parametrize("args,message", [
    ((np.ones((2, 5, 4), np.float32), np.ones((2, 2, 4)), W), "`x` must have rank 2"),
    ((np.ones((2, 4), np.float32), np.ones((2, 3, 4)), W), "`state` must have shape"),
    ((np.ones((2, 4), np.float32), np.ones((2, 2, 4)), np.ones((3, 5))), "`weight` must have shape"),
])
def test_update_bad_input_raises_clear_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        causal_conv1d_update(*args)
