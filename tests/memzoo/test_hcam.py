"""Hierarchical Chunk Attention Memory ("hcam", memzoo/memories/hcam.py): the module equals
the paper's two-level read written out per token in float64 numpy from its own parameters
(completed chunks only, top-k by summary, relevance-weighted detail, local attention in the
current chunk), per document when packed; a token reads its chunk's future never; a top_k
covering every chunk reads all of them; the short conv (conv_size) against its definition and
through decoding; bad options name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward, forward_packed, segment_ids_of

D, T, BATCH, L = 16, 17, 2, 3


def build(**options):
    return memzoo.MIXERS["hcam"](D, rngs=nnx.Rngs(0), num_heads=2, chunk_len=L, **options)


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, T, D), jnp.float32)


def softmax(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def naive(mixer, x, lengths=None):
    p = {n: np.asarray(getattr(mixer, n)[...], np.float64) for n in ("wq", "wk", "wv", "wo")}
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    K = mixer.head_dim
    for r, row in enumerate(lengths or [[x.shape[1]]] * x.shape[0]):
        start = 0
        for n in row:
            q, k, v = (np.einsum("td,dhk->thk", x[r, start:start + n], p[w])
                       for w in ("wq", "wk", "wv"))
            if mixer.conv_weight is not None:   # residual short conv, within the document
                cw = np.asarray(mixer.conv_weight[...], np.float64).reshape(
                    mixer.conv_size, 3, mixer.num_heads, K)
                q, k, v = (a + sum(cw[-1 - i, j] * np.pad(a, ((i, 0), (0, 0), (0, 0)))[:n]
                                   for i in range(mixer.conv_size))
                           for j, a in enumerate((q, k, v)))
            for t in range(n):
                o = np.zeros((mixer.num_heads, K))
                c0 = (t // L) * L
                for h in range(mixer.num_heads):
                    att = softmax(k[c0:t + 1, h] @ q[t, h] / np.sqrt(K))
                    o[h] += att @ v[c0:t + 1, h]
                    chunks = [(c * L, c * L + L) for c in range(t // L)]
                    if not chunks:
                        continue
                    rel = np.array([k[a:e, h].mean(0) @ q[t, h] / np.sqrt(K) for a, e in chunks])
                    top = np.argsort(-rel)[:mixer.top_k]
                    w = softmax(rel[top])
                    for wc, c in zip(w, top):
                        a, e = chunks[c]
                        o[h] += wc * softmax(k[a:e, h] @ q[t, h] / np.sqrt(K)) @ v[a:e, h]
                out[r, start + t] = np.einsum("hk,hkd->d", o, p["wo"])
            start += n
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_equals_the_two_level_read_float64(top_k):
    mixer, x = build(top_k=top_k), inputs()
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, f"hcam top_k={top_k} vs naive")


def test_packed_documents_chunk_from_their_own_start():
    mixer, x = build(), inputs(2)
    lengths = [[5, 12], [10, 2, 5]]
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    assert_close(y, naive(mixer, x, lengths), 1e-5, "hcam packed vs naive")


def with_random_conv(mixer):
    # The conv starts at 0 (plain HCAM): random weights make the test see it.
    mixer.conv_weight[...] = 0.5 * jax.random.normal(jax.random.key(7), mixer.conv_weight.shape)
    return mixer


def test_short_conv_equals_its_definition_float64():
    mixer, x = with_random_conv(build(conv_size=3)), inputs(4)
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, "hcam conv vs naive")
    lengths = [[5, 12], [10, 2, 5]]
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    assert_close(y, naive(mixer, x, lengths), 1e-5, "hcam conv packed vs naive")


def test_short_conv_decodes_as_the_parallel_form():
    mixer, x = with_random_conv(build(conv_size=3)), inputs(5)
    cache = mixer.init_cache(BATCH, max_len=T)
    y_pre, cache = mixer(x[:, :7], cache)
    ys = [y_pre]
    for t in range(7, T):
        y_t, cache = mixer.step(x[:, t], cache)
        ys.append(y_t[:, None])
    assert_close(jnp.concatenate(ys, 1), mixer(x), 1e-5, "hcam conv prefill + steps vs parallel")


def test_top_k_beyond_the_chunk_count_reads_every_chunk():
    # top_k = 100 > chunks: the gather takes what exists and the rest weighs nothing.
    mixer, x = build(top_k=100), inputs(3)
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, "hcam top_k=100 vs naive")


def test_cache_overflow_is_nan_not_a_silent_overwrite():
    mixer, x = build(), inputs(4)
    cache = mixer.init_cache(BATCH, max_len=4)   # 2 chunks of 3: 6 slots
    y, cache = mixer(x[:, :5], cache=cache)
    assert bool(jnp.all(jnp.isfinite(y)))
    y, _ = mixer(x[:, 5:7], cache=cache)
    assert bool(jnp.all(jnp.isnan(y)))


@pytest.mark.parametrize("option", ["chunk_len", "top_k", "num_heads", "max_len"])
def test_bad_options_name_the_option(option):
    with pytest.raises(ValueError, match=option):
        memzoo.MIXERS["hcam"](D, rngs=nnx.Rngs(0), **{option: 0})
    with pytest.raises(ValueError, match="conv_size"):
        memzoo.MIXERS["hcam"](D, rngs=nnx.Rngs(0), conv_size=1)


def test_relevance_weights_survive_very_negative_chunk_scores():
    # Chunk scores far below 0 (here about -141): the relevance softmax must still sum to 1 and
    # its gradient stay finite (a denominator that underflowed gave NaN gradients in training).
    from memzoo.memories import hcam_read
    b, N, Lc, H, K = 1, 3, 2, 1, 2
    k, v = -jnp.ones((b, N, Lc, H, K)), jnp.ones((b, N, Lc, H, K))

    def read(q):
        return hcam_read(q, jnp.array([[2]]), jnp.array([[0]]), jnp.zeros((1, 1), jnp.int32),
                         k, v, jnp.ones((b, N, Lc), bool), jnp.zeros((b, N), jnp.int32), 4)

    q = jnp.full((b, 1, H, K), 100.0)
    np.testing.assert_allclose(np.asarray(read(q)), 2.0)   # local read 1 + memory read 1
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda q: jnp.sum(read(q)))(q))))
