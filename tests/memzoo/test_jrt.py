"""JRT-RNN's prefix linear attention ("jrt", memzoo/memories/jrt.py): the module equals the
paper's formula written out in float64 numpy from its own parameters (the prompt read through a
non-causal encoder state, the rest causally), per document when packed; the prompt is
non-causal inside and causal from its end; decoding inside an unfinished prompt is NaN; bad
options name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward, forward_packed, prefill, segment_ids_of, step

D, T, BATCH, P = 16, 12, 2, 5


def build(**options):
    return memzoo.MIXERS["jrt"](D, rngs=nnx.Rngs(0), num_heads=2, prefix_len=P, chunk_size=8,
                                **options)


def inputs(seed=1, length=T):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D), jnp.float32)


def elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def projections(p, conv, xs):
    """q, k, v, k^e, v^e of one document [n, d] -> [n, heads, *] each, through the short causal
    conv (SiLU; weight[-1] on the current token; zeros before the document) when there is one."""
    names = ("wq", "wk", "wv", "wk_enc", "wv_enc")
    parts = [np.einsum("td,dhk->thk", xs, p[w]) for w in names]
    if conv is None:
        return parts
    n, W = len(xs), conv.shape[0]
    flat = np.concatenate([a.reshape(n, -1) for a in parts], -1)
    padded = np.concatenate([np.zeros((W - 1, flat.shape[1])), flat])
    flat = silu(sum(conv[i] * padded[i:i + n] for i in range(W)))
    out, start = [], 0
    for a in parts:
        width = a.shape[1] * a.shape[2]
        out.append(flat[:, start:start + width].reshape(a.shape))
        start += width
    return out


def naive(mixer, x, lengths=None):
    """o_t = phi(q_t)^T (E + S_t) / phi(q_t)^T (z^E + z_t), float64, document by document."""
    p = {k: np.asarray(v[...], np.float64) for k, v in
         ((n, getattr(mixer, n)) for n in ("wq", "wk", "wv", "wo", "wk_enc", "wv_enc"))}
    conv = None if mixer.conv_weight is None else np.asarray(mixer.conv_weight[...], np.float64)
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    lengths = lengths or [[x.shape[1]]] * x.shape[0]
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            q, k, v, ke, ve = projections(p, conv, x[r, start:start + n])
            q, k, ke, ve = elu1(q), elu1(k), elu1(ke[:P]), ve[:P]
            E, zE = np.einsum("thk,thv->hkv", ke, ve), ke.sum(0)
            S, z = np.zeros_like(E), np.zeros_like(zE)
            for t in range(n):
                S, z = S + np.einsum("hk,hv->hkv", k[t], v[t]), z + k[t]
                num = np.einsum("hk,hkv->hv", q[t], E + S)
                den = np.einsum("hk,hk->h", q[t], zE + z)[:, None] + 1e-6
                out[r, start + t] = np.einsum("hv,hvd->d", num / den, p["wo"])
            start += n
    return out


@pytest.mark.parametrize("conv_size", [0, 3])
def test_equals_the_prefix_linear_attention_formula_float64(conv_size):
    mixer, x = build(conv_size=conv_size), inputs()
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, "jrt vs naive float64")


def test_packed_documents_each_have_their_own_prompt():
    # conv_size 3: the short conv (over k^e, v^e too) restarts with each document
    mixer, x = build(conv_size=3), inputs(2)
    lengths = [[7, 5], [3, 9]]   # a document shorter than the prompt is all prompt
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    assert_close(y, naive(mixer, x, lengths), 1e-5, "jrt packed vs naive float64")


def test_the_prompt_is_read_whole_and_the_rest_causally():
    mixer, x = build(), inputs(3)
    y = forward(mixer, x)
    # A change inside the prompt reaches every prompt token, the earlier ones included ...
    y_prompt = forward(mixer, x.at[:, P - 1].add(1.0))
    assert float(jnp.min(jnp.max(jnp.abs(y_prompt[:, :P - 1] - y[:, :P - 1]), -1))) > 1e-4
    # ... while one after the prompt reaches nothing before it.
    y_after = forward(mixer, x.at[:, P + 2].add(1.0))
    np.testing.assert_array_equal(np.asarray(y_after[:, :P + 2]), np.asarray(y[:, :P + 2]))


def test_decoding_inside_an_unfinished_prompt_is_nan_and_after_it_exact():
    mixer, x = build(conv_size=3), inputs(4)
    y = forward(mixer, x)
    y_short, cache = prefill(mixer, x[:, :P - 2], mixer.init_cache(BATCH))
    assert bool(jnp.all(jnp.isnan(y_short)))
    # The rest of the prompt in one call: its tokens read the whole prompt (the cached part too).
    y_rest, cache = prefill(mixer, x[:, P - 2:P + 1], cache)
    assert_close(y_rest, y[:, P - 2:P + 1], 1e-5, "prefill finishing the prompt")
    outs = []
    for t in range(P + 1, T):
        y_t, cache = step(mixer, x[:, t], cache)
        outs.append(y_t)
    assert_close(jnp.stack(outs, 1), y[:, P + 1:], 1e-5, "steps after the prompt")


def test_zero_prefix_is_causal_linear_attention():
    mixer = build()
    mixer.prefix_len = 0
    plain = memzoo.MIXERS["linear_attention"](D, rngs=nnx.Rngs(1), num_heads=2, chunk_size=8)
    for name in ("wq", "wk", "wv", "wo"):
        getattr(plain, name)[...] = getattr(mixer, name)[...]
    x = inputs(5)
    assert_close(forward(mixer, x), forward(plain, x), 1e-6, "prefix_len=0 vs linear_attention")


def test_copied_encoder_starts_as_the_prompt_read_twice():
    # encoder_init="copy": E = S_{P-1}, so after the prompt the mixer is causal linear attention
    # over [prompt; sequence] (JRT-Prompt) with the same weights
    mixer = build(encoder_init="copy")
    plain = memzoo.MIXERS["linear_attention"](D, rngs=nnx.Rngs(1), num_heads=2, chunk_size=8)
    for name in ("wq", "wk", "wv", "wo"):
        getattr(plain, name)[...] = getattr(mixer, name)[...]
    x = inputs(6)
    twice = forward(plain, jnp.concatenate([x[:, :P], x], axis=1))
    assert_close(forward(mixer, x)[:, P:], twice[:, 2 * P:], 1e-5, "copy init vs read twice")


def test_bad_encoder_init_names_the_option():
    with pytest.raises(ValueError, match="encoder_init"):
        memzoo.MIXERS["jrt"](D, rngs=nnx.Rngs(0), encoder_init="tied")


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_prefix_len_names_the_option(bad):
    with pytest.raises(ValueError, match="prefix_len"):
        memzoo.MIXERS["jrt"](D, rngs=nnx.Rngs(0), prefix_len=bad)


def test_cache_rejects_segment_ids():
    mixer = build()
    with pytest.raises(ValueError, match="segment_ids"):
        mixer(inputs(), cache=mixer.init_cache(BATCH), segment_ids=jnp.zeros((BATCH, T), jnp.int32))
