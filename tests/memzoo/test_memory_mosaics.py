"""Memory Mosaics' contextual memory ("memory_mosaic", memzoo/memories/memory_mosaics.py): the
module equals the paper's associative memory written out per token in float64 numpy from its
own parameters (leaky-averaged keys, one-step look-ahead values, kernel regression over the
pairs stored before t), per document when packed; the first token reads nothing and the second
reads exactly the first pair's value; bad options name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward, forward_packed, segment_ids_of

D, T, BATCH, H = 16, 13, 2, 2


def build():
    return memzoo.MIXERS["memory_mosaic"](D, rngs=nnx.Rngs(0), num_heads=H)


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, T, D), jnp.float32)


def unit(a):
    return a / np.sqrt(np.sum(a * a, -1, keepdims=True) + 1e-6)


def naive(mixer, x, lengths=None):
    p = {n: np.asarray(getattr(mixer, n)[...], np.float64)
         for n in ("wk", "wv", "wo", "leak", "key_log_scale", "value_log_scale", "value_mix")}
    beta = np.log1p(np.exp(p["leak"]))                      # softplus
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for r, row in enumerate(lengths or [[x.shape[1]]] * x.shape[0]):
        start = 0
        for n in row:
            xs = x[r, start:start + n]
            wk, u = (np.einsum("td,dhk->thk", xs, p[w]) for w in ("wk", "wv"))
            k = np.zeros_like(wk)
            for t in range(n):
                k[t] = wk[t] + (np.exp(-beta)[:, None] * k[t - 1] if t else 0.0)
            k = unit(k) * np.exp(np.minimum(p["key_log_scale"], 5.0))[:, None]
            c = p["value_mix"][:, None]
            for t in range(1, n):
                y = np.zeros((H, mixer.head_dim))
                for h in range(H):
                    s = k[:t, h] @ k[t, h]
                    w = np.exp(s - s.max())
                    w /= w.sum()
                    # pair j's value: its own token and the next one (j + 1 <= t: known at t)
                    v = unit((1 - c[h]) * u[1:t + 1, h] + c[h] * u[:t, h]) \
                        * np.exp(p["value_log_scale"][h])
                    y[h] = w @ v
                out[r, start + t] = np.einsum("hk,hkd->d", y, p["wo"])
            start += n
    return out


def test_equals_the_contextual_memory_float64():
    mixer, x = build(), inputs()
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, "memory_mosaic vs naive")


def test_packed_documents_have_their_own_memory():
    mixer, x = build(), inputs(2)
    lengths = [[4, 9], [1, 7, 5]]
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    assert_close(y, naive(mixer, x, lengths), 1e-5, "memory_mosaic packed vs naive")


def test_a_pair_is_stored_once_its_value_is_known():
    mixer, x = build(), inputs(3)
    y = forward(mixer, x)
    np.testing.assert_array_equal(np.asarray(y[:, 0]), 0.0)      # nothing stored yet
    # Token 1 reads pair 0 alone, whose value is built from x_0 and x_1: changing x_2 on
    # leaves it, changing x_1 moves it.
    y2 = forward(mixer, x.at[:, 2:].add(1.0))
    np.testing.assert_array_equal(np.asarray(y2[:, :2]), np.asarray(y[:, :2]))
    y1 = forward(mixer, x.at[:, 1].add(1.0))
    assert float(jnp.min(jnp.max(jnp.abs(y1[:, 1] - y[:, 1]), -1))) > 1e-4


@pytest.mark.parametrize("option", ["num_heads", "head_dim", "max_len"])
def test_bad_options_name_the_option(option):
    with pytest.raises(ValueError, match=option):
        memzoo.MIXERS["memory_mosaic"](D, rngs=nnx.Rngs(0), **{option: 0})
