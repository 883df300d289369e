"""The kernel contract for `flash_attention` (WORKSPACE.md): every implementation against the
float64 reference (output and the q / k / v gradients), with GQA, sliding windows, packed
documents and lengths that are not a multiple of any block; the Pallas kernels (splash on TPU,
Triton on GPU) through the interpreters; lowering for tpu / cuda; vmap and errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing as kt
from pallas_kernels import flash_attention
from pallas_kernels.flash_attention import reference as far

pytestmark = pytest.mark.kernel

F32_TOL = 1e-5
BF16_TOL = 2e-2


def make_inputs(key, shape, kv_heads, dtype=jnp.float32, *, segments=True):
    b, t, h, d = shape
    k = jax.random.split(key, 5)
    q = jax.random.normal(k[0], shape).astype(dtype)
    kk = jax.random.normal(k[1], (b, t, kv_heads, d)).astype(dtype)
    v = jax.random.normal(k[2], (b, t, kv_heads, d)).astype(dtype)
    seg = None
    if segments:
        seg = jnp.cumsum(jax.random.bernoulli(k[3], 0.1, (b, t)), 1).astype(jnp.int32)
    do = jax.random.normal(k[4], shape)
    return (q, kk, v), seg, do


def forward_and_grads(implementation, window, arrays, seg, do):
    def run(q, k, v):
        return flash_attention(q, k, v, segment_ids=seg, window=window,
                               implementation=implementation)

    def loss(*xs):
        return jnp.sum(run(*xs).astype(jnp.float32) * do)

    return run(*arrays), jax.grad(loss, argnums=(0, 1, 2))(*arrays)


def check(implementation, shape, kv_heads, window, dtype=jnp.float32, seed=0, ctx=None,
          segments=True):
    arrays, seg, do = make_inputs(jax.random.PRNGKey(seed), shape, kv_heads, dtype,
                                  segments=segments)
    ref_out, ref_grads = kt.float64_run(
        jax.jit(functools.partial(forward_and_grads, "reference", window)), arrays, seg, do)
    with ctx or kt.IMPLEMENTATION_RUNNERS["xla"][0]():
        out, grads = jax.jit(functools.partial(forward_and_grads, implementation, window))(
            arrays, seg, do)
    tol = BF16_TOL if dtype == jnp.bfloat16 else F32_TOL
    assert out.dtype == dtype and out.shape == shape
    kt.assert_close(out, ref_out, tol, "o")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == dtype
        kt.assert_close(g, r, tol, name)


# (shape [B, T, H, D], kv heads, window): T = 1, T off every block, GQA, MQA, windows.
CASES = [
    ((1, 1, 2, 8), 2, None),
    ((2, 37, 4, 16), 2, None),
    ((2, 37, 4, 16), 2, 5),
    ((1, 130, 2, 32), 1, None),
    ((1, 130, 4, 32), 4, 64),
]
CASE_IDS = [f"T{s[1]}-H{s[2]}G{g}-w{w}" for s, g, w in CASES]


def test_reference_is_softmax_attention_by_definition():
    """The reference against a per-query loop in numpy (float64): softmax over the visible keys."""
    arrays, seg, _ = make_inputs(jax.random.PRNGKey(5), (2, 9, 4, 3), 2)
    with jax.enable_x64(True):
        q, k, v = (np.asarray(x, np.float64) for x in arrays)
        got = np.asarray(far.attention_reference(*(jnp.asarray(x) for x in (q, k, v)), seg,
                                                 window=3, scale=0.7))
    seg = np.asarray(seg)
    for b in range(2):
        for i in range(9):
            for h in range(4):
                js = [j for j in range(9) if j <= i and i - j < 3 and seg[b, j] == seg[b, i]]
                s = np.array([0.7 * q[b, i, h] @ k[b, j, h // 2] for j in js])
                p = np.exp(s - s.max())
                want = (p / p.sum()) @ np.stack([v[b, j, h // 2] for j in js])
                np.testing.assert_allclose(got[b, i, h], want, rtol=1e-12)


@pytest.mark.parametrize("shape,kv_heads,window", CASES, ids=CASE_IDS)
def test_xla_matches_reference(shape, kv_heads, window):
    check("xla", shape, kv_heads, window)


@pytest.mark.parametrize("runner", kt.PALLAS_RUNNERS)
@pytest.mark.parametrize("shape,kv_heads,window", CASES[1:], ids=CASE_IDS[1:])
def test_pallas_matches_reference(runner, shape, kv_heads, window):
    make_ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    check(implementation, shape, kv_heads, window, ctx=make_ctx())


@pytest.mark.parametrize("runner", ["xla", "pallas_tpu_interpret", "pallas_gpu_interpret"])
def test_bfloat16_inputs(runner):
    make_ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    check(implementation, (1, 64, 2, 32), 1, None, dtype=jnp.bfloat16, ctx=make_ctx())


def test_without_segments_and_the_default_scale():
    check("xla", (2, 20, 2, 8), 1, None, segments=False)
    arrays, _, _ = make_inputs(jax.random.PRNGKey(1), (1, 6, 2, 16), 2, segments=False)
    kt.assert_close(flash_attention(*arrays, implementation="xla"),
                    flash_attention(*arrays, scale=0.25, implementation="reference"), F32_TOL)


def test_packed_document_equals_the_document_alone():
    """Two documents in one row: the second one's outputs are what it gets alone."""
    (q, k, v), _, _ = make_inputs(jax.random.PRNGKey(2), (1, 24, 2, 8), 2, segments=False)
    seg = jnp.asarray([[0] * 10 + [1] * 14], jnp.int32)
    packed = flash_attention(q, k, v, segment_ids=seg, implementation="xla")
    alone = flash_attention(q[:, 10:], k[:, 10:], v[:, 10:], implementation="xla")
    kt.assert_close(packed[:, 10:], alone, F32_TOL)


@pytest.mark.parametrize("platform,count", [("tpu", 3), ("cuda", 3)])
def test_lowers_to_the_kernels(platform, count):
    """Forward and backward: splash's forward, dq and dkv kernels; the Triton forward, dq, dkv."""
    arrays, seg, do = make_inputs(jax.random.PRNGKey(0), (1, 256, 2, 64), 2)

    def fwd_bwd(implementation):
        return lambda *a: forward_and_grads(implementation, None, a, seg, do)[1]

    kt.assert_auto_lowers(fwd_bwd, *arrays, op="flash_attention", platform=platform,
                          count=count)


def test_a_window_on_gpu_runs_on_xla():
    arrays, seg, _ = make_inputs(jax.random.PRNGKey(0), (1, 64, 2, 16), 2)
    kt.assert_lowers_to(lambda *a: flash_attention(*a, segment_ids=seg, window=8,
                                                   implementation="pallas"),
                        *arrays, platform="cuda", count=0)


def test_auto_on_cpu_uses_no_custom_call():
    arrays, _, _ = make_inputs(jax.random.PRNGKey(0), (1, 16, 2, 8), 2)
    text = kt.lower_for(lambda *a: flash_attention(*a), *arrays, platform="cpu")
    assert not kt.custom_calls(text)


def test_vmap_composes():
    xa, sa, _ = make_inputs(jax.random.PRNGKey(3), (2, 12, 2, 8), 1)
    xb, sb, _ = make_inputs(jax.random.PRNGKey(4), (2, 12, 2, 8), 1)
    stacked = [jnp.stack([a, b]) for a, b in zip(xa, xb)]
    f = lambda impl: (lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s,
                                                         implementation=impl))
    got = jax.vmap(f("xla"))(*stacked, jnp.stack([sa, sb]))
    kt.assert_close(got[1], f("reference")(*xb, sb), F32_TOL)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q=jnp.ones((2, 3, 4))), "`q` must have rank 4"),
    (dict(k=jnp.ones((1, 5, 2, 8))), r"`k` must have shape \[batch, time, kv_heads, head_dim\]"),
    (dict(k=jnp.ones((1, 4, 3, 8)), v=jnp.ones((1, 4, 3, 8))), "must divide the query heads"),
    (dict(v=jnp.ones((1, 4, 2, 8), jnp.bfloat16)), "must have q's dtype"),
    (dict(segment_ids=jnp.ones((1, 4))), "`segment_ids` must be an integer array"),
    (dict(window=0), "`window` must be None or an int >= 1"),
    (dict(scale=-1.0), "`scale` must be None or a number > 0"),
    (dict(implementation="fast"), "implementation"),
])
def test_errors_name_the_argument(kwargs, message):
    args = dict(q=jnp.ones((1, 4, 4, 8)), k=jnp.ones((1, 4, 2, 8)), v=jnp.ones((1, 4, 2, 8)))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **args)
