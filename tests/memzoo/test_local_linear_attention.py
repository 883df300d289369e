"""Local Linear Attention ("local_linear_attention", memzoo/memories/local_linear_attention.py):
the closed form equals the paper's weighted least-squares problem solved per query in float64
numpy; a large ridge gives softmax (sliding-window) attention back; the estimator is exact on
values linear in the keys, where softmax attention is not; the cache is a ring of `window`
slots; bad options name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from memzoo.memories import local_linear_read
from pallas_kernels._testing import assert_close, rel_rmse
from tests.memzoo.helpers import forward

D, T, BATCH, W = 16, 14, 2, 6


def window_mask(T, window):
    t = np.arange(T)
    return (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)


def naive(q, k, v, visible, ridge):
    """Per query and head: min_{b, W} sum_j p_j |v_j - b - W (k_j - q)|^2 + ridge |W|^2, o = b."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, T, H, K = q.shape
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for r in range(b):
        for h in range(H):
            for t in range(T):
                j = np.nonzero(visible[t])[0]
                s = k[r, j, h] @ q[r, t, h] / np.sqrt(K)
                p = np.exp(s - s.max())
                p /= p.sum()
                X = np.concatenate([np.ones((len(j), 1)), k[r, j, h] - q[r, t, h]], axis=1)
                A = X.T @ (p[:, None] * X) + ridge * np.diag([0.0] + [1.0] * K)
                beta = np.linalg.solve(A, X.T @ (p[:, None] * v[r, j, h]))
                out[r, t, h] = beta[0]
    return out


def qkv(seed=0, heads=2, K=4):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (BATCH, T, heads, K), jnp.float32) for kk in keys]


@pytest.mark.parametrize("ridge", [0.1, 1.0])
def test_closed_form_equals_weighted_least_squares_float64(ridge):
    q, k, v = qkv()
    visible = window_mask(T, W)
    o = local_linear_read(q, k, v, jnp.asarray(visible)[None], ridge)
    assert_close(o, naive(q, k, v, visible, ridge), 1e-5, "closed form vs least squares")


def test_exact_on_values_linear_in_the_keys():
    # v = A k + c: the local linear fit recovers A q + c at the query; the local constant fit
    # (softmax attention) returns a weighted mean of the values, biased towards the keys' centre.
    q, k, _ = qkv(1)
    A = jax.random.normal(jax.random.key(9), (4, 4))
    v = jnp.einsum("bthk,vk->bthv", k, A) + 0.5
    want = jnp.einsum("bthk,vk->bthv", q, A) + 0.5
    visible = jnp.asarray(window_mask(T, W))[None]
    o = local_linear_read(q, k, v, visible, 1e-6)
    o_softmax = local_linear_read(q, k, v, visible, 1e12)
    # Once the window is full (6 keys for 4 dims: the fit is determined; with fewer the ridge
    # picks among exact fits, which need not reproduce A). 1e-3: float32 solves of a key
    # covariance from 6 points, whose smallest eigenvalue is small.
    assert_close(o[:, W - 1:], want[:, W - 1:], 1e-3, "local linear on linear data")
    assert rel_rmse(o_softmax[:, W - 1:], want[:, W - 1:]) > 0.1


def test_large_ridge_is_sliding_window_softmax_attention():
    lla = memzoo.MIXERS["local_linear_attention"](D, rngs=nnx.Rngs(0), num_heads=2, window=W,
                                                  ridge=1e9)
    attn = memzoo.MIXERS["attention"](D, rngs=nnx.Rngs(1), num_heads=2, window=W)
    for name in ("wq", "wk", "wv", "wo"):
        getattr(attn, name)[...] = getattr(lla, name)[...]
    x = jax.random.normal(jax.random.key(2), (BATCH, T, D))
    # The correction term is O(|k|^2 / ridge) ~ 1e-8 of the output: float32 rounding dominates.
    assert_close(forward(lla, x), forward(attn, x), 1e-5, "ridge -> inf vs softmax attention")


def test_the_decoding_cache_is_a_ring_of_window_slots():
    lla = memzoo.MIXERS["local_linear_attention"](D, rngs=nnx.Rngs(0), num_heads=2, window=W)
    cache = lla.init_cache(BATCH, max_len=1000)
    assert cache.k.shape == (BATCH, W, 2, D // 2)


@pytest.mark.parametrize("option, bad", [("window", 1), ("window", None), ("ridge", 0.0),
                                         ("ridge", "1")])
def test_bad_options_name_the_option(option, bad):
    with pytest.raises(ValueError, match=option):
        memzoo.MIXERS["local_linear_attention"](D, rngs=nnx.Rngs(0), **{option: bad})
