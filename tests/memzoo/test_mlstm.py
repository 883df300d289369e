"""The mLSTM (memzoo/linear_attention/mlstm.py): the cell on chunked_linear_attention equals
xLSTM's stabilised recurrence (m_t = max(log f_t + m_{t-1}, itilde_t), floor exp(-m_t)) written
here token by token in float64: outputs (floor included), the carried (C, n, m), gradients,
packed documents, and input-gate pre-activations up to 80 in float32 (finite and exact); bad
options name the option. The block's contract (causality, step == prefill == parallel,
segments, bfloat16, gradients) runs in tests/memzoo/test_contract.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.linear_attention.mlstm import MLSTM, mlstm_memory
from pallas_kernels import _testing as kt

B, T, H, K, V = 2, 37, 2, 8, 4


def stabilised_recurrence(q, k, v, i_pre, log_f, C0, n0, m0, seg):
    """xLSTM's mLSTM cell, stabilised, token by token; a document starts from C = n = m = 0."""
    def step(carry, xs):
        C, n, m = carry
        q_t, k_t, v_t, i_t, lf_t, start = xs
        C = jnp.where(start[:, None, None, None], 0.0, C)
        n = jnp.where(start[:, None, None], 0.0, n)
        m = jnp.where(start[:, None], 0.0, m)
        m_new = jnp.maximum(lf_t + m, i_t)
        fp, ip = jnp.exp(lf_t + m - m_new), jnp.exp(i_t - m_new)
        k_t = k_t / np.sqrt(K)
        C = fp[..., None, None] * C + ip[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        n = fp[..., None] * n + ip[..., None] * k_t
        num = jnp.einsum("bhkv,bhk->bhv", C, q_t)
        den = jnp.maximum(jnp.abs(jnp.sum(n * q_t, -1)), jnp.exp(-m_new))
        return (C, n, m_new), num / den[..., None]

    starts = jnp.concatenate([jnp.zeros((q.shape[0], 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    tm = lambda x: jnp.swapaxes(x, 0, 1)
    (C, n, m), h = jax.lax.scan(step, (C0, n0, m0),
                                tuple(map(tm, (q, k, v, i_pre, log_f, starts))))
    return tm(h), C, n, m


def _inputs(key, i_range, t=T):
    ks = jax.random.split(key, 8)
    q, k = (jax.random.normal(ks[j], (B, t, H, K)) for j in range(2))
    v = jax.random.normal(ks[2], (B, t, H, V))
    i_pre = jax.random.uniform(ks[3], (B, t, H), minval=i_range[0], maxval=i_range[1])
    log_f = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, t, H)) + 2.0)
    C0 = jax.random.normal(ks[5], (B, H, K, V))
    n0 = jax.random.normal(ks[6], (B, H, K))
    m0 = jax.random.uniform(ks[7], (B, H), minval=-3.0, maxval=3.0)
    return q, k, v, i_pre, log_f, C0, n0, m0


SEG = jnp.asarray([[0] * T, [0] * 11 + [1] * 20 + [2] * 6], jnp.int32)


def _ours(q, k, v, i_pre, log_f, C0, n0, m0, seg):
    state = jnp.concatenate([C0, n0[..., None]], -1)
    h, s, m = mlstm_memory(q, k, v, i_pre, log_f, state=state, m=m0, segment_ids=seg,
                           chunk_size=16, implementation="xla")
    return h, s[..., :V], s[..., V], m


# h = C^T q / |n^T q| is ill-conditioned where a few exp(80)-weighted keys dominate n and
# n^T q cancels: on the up-to-80 inputs the float32 stabilised recurrence itself is off by
# 9e-4 (relative RMSE against float64) and the composition by 2e-5, hence 1e-4 there.
@pytest.mark.parametrize("i_range,tol", [((-6.0, 3.0), 1e-5), ((-10.0, 80.0), 1e-4),
                                         ((-60.0, -40.0), 1e-5)],
                         ids=["typical", "up-to-80", "all-negative-floor"])
def test_cell_equals_the_stabilised_recurrence(i_range, tol):
    """Outputs and the carried state in true units (C e^m, n e^m) in float32 against float64;
    the all-negative case lives on the floor exp(-m_t), the up-to-80 case overflows any
    unstabilised form (exp(80) k v^T summed)."""
    args = _inputs(jax.random.PRNGKey(0), i_range)
    ref_h, ref_C, ref_n, ref_m = kt.float64_run(jax.jit(stabilised_recurrence), *args, SEG)
    h, C, n, m = jax.jit(_ours)(*args, SEG)
    assert np.all(np.isfinite(h)) and np.all(np.isfinite(C)) and np.all(np.isfinite(n))
    kt.assert_close(h, ref_h, tol, "h")
    unit = lambda x, m: np.asarray(x, np.float64) * np.exp(np.asarray(m, np.float64))
    kt.assert_close(unit(C, m[..., None, None]), unit(ref_C, ref_m[..., None, None]), 1e-5, "C")
    kt.assert_close(unit(n, m[..., None]), unit(ref_n, ref_m[..., None]), 1e-5, "n")
    # The stored unit is xLSTM's m_T unless that fell more than 60 below the call's max.
    np.testing.assert_allclose(m, ref_m, atol=1e-4)


def test_gradients_equal_the_stabilised_recurrences():
    args = _inputs(jax.random.PRNGKey(1), (-6.0, 3.0), t=20)
    seg = SEG[:, :20]
    w = jax.random.normal(jax.random.PRNGKey(2), (B, 20, H, V))

    def grads(fn, *a):
        return jax.grad(lambda *a: jnp.sum(fn(*a, seg)[0] * w), argnums=tuple(range(7)))(*a)
    ref = kt.float64_run(jax.jit(functools.partial(grads, stabilised_recurrence)), *args)
    got = jax.jit(functools.partial(grads, _ours))(*args)
    for name, g, r in zip(["q", "k", "v", "itilde", "log_f", "C0", "n0"], got, ref):
        kt.assert_close(g, r, 1e-5, f"d{name}")


def test_split_and_continue_from_the_carried_state():
    """A call from the carried (C | n, m) continues exactly, with large gates on both sides."""
    q, k, v, i_pre, log_f, *_ = _inputs(jax.random.PRNGKey(3), (-10.0, 80.0))
    f = jax.jit(lambda q, k, v, i, lf, s, m: mlstm_memory(q, k, v, i, lf, state=s, m=m,
                                                          chunk_size=16))
    whole = f(q, k, v, i_pre, log_f, None, None)
    cut = 23
    first = f(*(x[:, :cut] for x in (q, k, v, i_pre, log_f)), None, None)
    second = f(*(x[:, cut:] for x in (q, k, v, i_pre, log_f)), first[1], first[2])
    # 1e-4: the up-to-80 conditioning of h (see above), in both float32 computations.
    kt.assert_close(jnp.concatenate([first[0], second[0]], 1), whole[0], 1e-4, "h")
    unit = lambda s, m: np.asarray(s, np.float64) * np.exp(np.asarray(m, np.float64))[..., None,
                                                                                       None]
    kt.assert_close(unit(second[1], second[2]), unit(whole[1], whole[2]), 1e-5, "state")


def mlstm_block_loop(m, x, seg):
    """xLSTM's mLSTM layer token by token in float64 (numpy), stabilised cell, from the module's
    parameters: up-projection, causal conv + SiLU, block-diagonal q/k (conv branch) and v
    (pre-conv), gates from [q, k, v], cell, per-head layer norm, skip, silu(z), down."""
    P = lambda p: np.asarray(p[...], np.float64)
    Hh, Kh, E, W = m.num_heads, m.head_dim, m.inner, m.conv_size
    silu = lambda a: a / (1 + np.exp(-a))
    blockwise = lambda a, w: np.einsum("ni,nij->nj", a.reshape(-1, m.block), w).reshape(Hh, Kh)
    y = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if t == 0 or seg[b, t] != seg[b, t - 1]:
                C, n, mm, start = np.zeros((Hh, Kh, Kh)), np.zeros((Hh, Kh)), np.zeros(Hh), t
            up = x[b] @ P(m.w_up)
            xm, z = up[:, :E], up[t, E:]
            window = [xm[s] if s >= start else np.zeros(E) for s in range(t - W + 1, t + 1)]
            xc = silu(sum(P(m.conv_weight)[j] * window[j] for j in range(W)) + P(m.conv_bias))
            q, k = blockwise(xc, P(m.wq)), blockwise(xc, P(m.wk))
            v = blockwise(xm[t], P(m.wv))
            qkv = np.concatenate([q, k, v], -1).reshape(-1)
            i_t = qkv @ P(m.w_igate) + P(m.igate_bias)
            lf = -np.log1p(np.exp(-(qkv @ P(m.w_fgate) + P(m.fgate_bias))))
            m_new = np.maximum(lf + mm, i_t)
            fp, ip = np.exp(lf + mm - m_new), np.exp(i_t - m_new)
            kk = k / np.sqrt(Kh)
            C = fp[:, None, None] * C + ip[:, None, None] * kk[:, :, None] * v[:, None, :]
            n = fp[:, None] * n + ip[:, None] * kk
            mm = m_new
            h = np.einsum("hkv,hk->hv", C, q) / np.maximum(
                np.abs(np.sum(n * q, -1)), np.exp(-m_new))[:, None]
            mu = h.mean(-1, keepdims=True)
            h = (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + m.norm_eps)
            h = (h * P(m.norm_scale)).reshape(-1) + P(m.skip) * xc
            y[b, t] = (h * silu(z)) @ P(m.w_down)
    return y


def test_block_equals_the_xlstm_layer_with_packed_documents():
    m = MLSTM(8, num_heads=2, qkv_block=2, chunk_size=8, rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(nnx.state(m, nnx.Param))
    rng = np.random.default_rng(4)
    nnx.update(m, jax.tree.unflatten(treedef, [
        np.asarray(p) + 0.3 * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]))
    x = jax.random.normal(jax.random.key(5), (2, 13, 8))
    seg = jnp.asarray([[0] * 13, [0] * 5 + [1] * 8], jnp.int32)
    got = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(m, x, seg)
    ref = mlstm_block_loop(m, np.asarray(x, np.float64), np.asarray(seg))
    kt.assert_close(got, ref, 1e-5, "mLSTM block vs float64 loop")


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_heads=3), "`num_heads`"), (dict(qkv_block=3), "`qkv_block`"),
    (dict(conv_size=1), "`conv_size`"), (dict(proj_factor=0), "`proj_factor`"),
    (dict(norm_eps=0.0), "`norm_eps`"),
])
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLSTM(8, **{"num_heads": 2, **kwargs}, rngs=nnx.Rngs(0))
