"""The "attention" mixer: the contract's checks (tests/memzoo/test_contract.py) over GQA, windows
and convolutions; full and sliding-window masks, with and without segments, against a naive
float64 softmax written here; cache sizes; clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from memzoo.attention import Attention
from pallas_kernels._testing import assert_close
from tests.memzoo import test_contract as contract
from tests.memzoo.helpers import forward, prefill

D, T, BATCH = 16, 12, 2

CASES = [
    ("mha", dict(num_heads=4)),
    ("gqa", dict(num_heads=4, num_kv_heads=2)),
    ("window5", dict(num_heads=2, window=5)),
    ("window3_mqa", dict(num_heads=4, num_kv_heads=1, window=3)),
    ("no_rope_head_dim6", dict(num_heads=2, head_dim=6, rope=False)),
    ("conv4_gqa", dict(num_heads=4, num_kv_heads=2, conv_size=4)),
    ("conv3_window4", dict(num_heads=2, window=4, conv_size=3)),
]


def ids(cases):
    return [c[0] for c in cases]


def build(options, seed=0, **extra):
    mixer = memzoo.MIXERS["attention"](D, rngs=nnx.Rngs(seed), **options, **extra)
    if mixer.conv_weight is not None:
        # The convolution starts at 0 (plain attention); test it with taps it would learn.
        mixer.conv_weight[...] = 0.5 * jax.random.normal(jax.random.key(seed + 7),
                                                         mixer.conv_weight.shape)
    return mixer


def inputs(seed=1, length=T):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D), jnp.float32)


@nnx.jit
def forward_segments(mixer, x, segment_ids):
    return mixer(x, segment_ids=segment_ids)


def naive_attention(params, x, *, num_heads, num_kv_heads, window, use_rope, positions,
                    segment_ids=None, base=10_000.0):
    """Float64 numpy: explicit masked softmax, with each key/value head repeated for its group."""
    wq, wk, wv, wo = (np.asarray(params[k], np.float64) for k in ("wq", "wk", "wv", "wo"))
    x = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btd,dhk->bthk", x, w) for w in (wq, wk, wv))
    if params.get("conv_weight") is not None:
        # p_t + sum_{s < W} w[W-1-s] p_{t-s} over the channels of [q | k | v], within segments.
        w = np.asarray(params["conv_weight"], np.float64)
        b, n = x.shape[:2]
        flat = np.concatenate([z.reshape(b, n, -1) for z in (q, k, v)], axis=-1)
        seg = np.zeros((b, n), int) if segment_ids is None else np.asarray(segment_ids)
        mixed = flat.copy()
        for t in range(n):
            for s in range(w.shape[0]):
                if t - s >= 0:
                    same = (seg[:, t] == seg[:, t - s])[:, None]
                    mixed[:, t] += np.where(same, w[w.shape[0] - 1 - s] * flat[:, t - s], 0)
        nq, nk = q[0, 0].size, k[0, 0].size
        q = mixed[..., :nq].reshape(q.shape)
        k = mixed[..., nq:nq + nk].reshape(k.shape)
        v = mixed[..., nq + nk:].reshape(v.shape)
    if use_rope:
        half = q.shape[-1] // 2
        freq = base ** (-np.arange(half) / half)
        ang = np.asarray(positions, np.float64)[:, :, None, None] * freq
        def rot(z):
            z1, z2 = z[..., :half], z[..., half:]
            return np.concatenate([z1 * np.cos(ang) - z2 * np.sin(ang),
                                   z2 * np.cos(ang) + z1 * np.sin(ang)], axis=-1)
        q, k = rot(q), rot(k)
    group = num_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    t = np.arange(x.shape[1])
    mask = t[None, :] <= t[:, None]
    if window is not None:
        mask &= t[None, :] > t[:, None] - window
    mask = np.broadcast_to(mask, (x.shape[0], x.shape[1], x.shape[1]))
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bthk,hkm->btm", np.einsum("bhts,bshk->bthk", p, v), wo)

def params_of(mixer):
    p = {k: np.asarray(getattr(mixer, k)[...]) for k in ("wq", "wk", "wv", "wo")}
    p["conv_weight"] = None if mixer.conv_weight is None else np.asarray(mixer.conv_weight[...])
    return p


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_decoding_in_every_configuration(case):
    """test_contract.py's decoding check (its prefill, 6 tokens, is longer than every window
    here, so the ring keeps only the last `window` keys) over GQA, windows and convolutions."""
    _, options = case
    contract.check_decoding("attention", options)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_naive_masked_softmax_in_float64(case):
    _, options = case
    mixer, x = build(options), inputs()
    want = naive_attention(
        params_of(mixer), x, num_heads=mixer.num_heads, num_kv_heads=mixer.num_kv_heads,
        window=mixer.window, use_rope=mixer.use_rope,
        positions=np.broadcast_to(np.arange(T), (BATCH, T)))
    assert_close(forward(mixer, x), want, 1e-5, "parallel vs naive float64")


SEGMENT_CASES = [CASES[1], CASES[2], CASES[5]]


@pytest.mark.parametrize("case", SEGMENT_CASES, ids=ids(SEGMENT_CASES))
def test_segment_ids_keep_packed_documents_apart(case):
    """Doc 2 packed after doc 1 gives what doc 2 gives alone (rotary positions restart too)."""
    _, options = case
    mixer, x = build(options), inputs()
    cut = 5
    seg = jnp.broadcast_to((jnp.arange(T) >= cut).astype(jnp.int32)[None], (BATCH, T))
    y = forward_segments(mixer, x, seg)
    # Against the naive softmax with the same mask and per-document positions.
    pos = np.where(np.arange(T) >= cut, np.arange(T) - cut, np.arange(T))
    want = naive_attention(
        params_of(mixer), x, num_heads=mixer.num_heads, num_kv_heads=mixer.num_kv_heads,
        window=mixer.window, use_rope=True, positions=np.broadcast_to(pos, (BATCH, T)),
        segment_ids=seg)
    assert_close(y, want, 1e-5, "segments vs naive float64")


def test_an_id_that_comes_back_is_a_new_document():
    """Ids 0, 1, 0: the third run is its own document (counted by starts, as every mixer
    counts them), not the first one continued."""
    mixer, x = build(dict(num_heads=2)), inputs()
    seg = jnp.asarray([[0] * 4 + [1] * 4 + [0] * (T - 8)] * BATCH, jnp.int32)
    y = forward_segments(mixer, x, seg)
    alone = mixer(x[:, 8:])
    assert_close(y[:, 8:], alone, 1e-5, "third document vs alone")


def test_gradients_and_bfloat16_with_window_and_convolution():
    options = dict(num_heads=4, num_kv_heads=2, window=4, conv_size=3)
    contract.check_gradients("attention", options)
    contract.check_bfloat16("attention", options)


def test_parameters_carry_logical_axes_and_registry():
    assert memzoo.MIXERS["attention"] is Attention
    mixer = build(dict(num_heads=4, num_kv_heads=2))
    axes = {path[-1]: var.get_metadata()["out_sharding"]
            for path, var in nnx.to_flat_state(nnx.state(mixer, nnx.Param))}
    assert axes == {"wq": ("embed", "heads", "kv"), "wk": ("embed", "kv_heads", "kv"),
                    "wv": ("embed", "kv_heads", "kv"), "wo": ("heads", "kv", "embed")}


def test_cache_sizes_and_overflow():
    full, windowed = build(dict(num_heads=2)), build(dict(num_heads=2, window=3))
    assert full.init_cache(1).k.shape == (1, full.max_len, 2, D // 2)
    assert full.init_cache(1, max_len=6).k.shape[1] == 6
    assert windowed.init_cache(1, max_len=100).k.shape[1] == 3  # a ring of `window` slots
    # Past max_len a full cache cannot hold the keys: the output says so instead of lying.
    x = inputs(length=4)[:1]
    with pytest.raises(ValueError, match="max_len=3"):
        full(x, cache=full.init_cache(1, max_len=3))
    _, cache = prefill(full, x[:, :2], full.init_cache(1, max_len=3))
    y, _ = prefill(full, x[:, 2:], cache)
    assert np.all(np.isnan(np.asarray(y)))


def test_bad_input_is_a_clear_error():
    mixer = build(dict(num_heads=2))
    with pytest.raises(ValueError, match=r"`x`.*d_model=16"):
        mixer(jnp.ones((BATCH, 4, D + 1)))
    with pytest.raises(ValueError, match=r"`x_t`.*rank 2"):
        mixer.step(jnp.ones((BATCH, 1, D)), mixer.init_cache(BATCH))
    with pytest.raises(ValueError, match=r"`segment_ids`.*integer"):
        mixer(jnp.ones((BATCH, 4, D)), segment_ids=jnp.ones((BATCH, 4)))
    with pytest.raises(ValueError, match=r"`segment_ids`.*\(2, 4\)"):
        mixer(jnp.ones((BATCH, 4, D)), segment_ids=jnp.ones((BATCH, 5), jnp.int32))
    with pytest.raises(ValueError, match="parallel form only"):
        mixer(jnp.ones((BATCH, 4, D)), cache=mixer.init_cache(BATCH),
              segment_ids=jnp.ones((BATCH, 4), jnp.int32))
    with pytest.raises(ValueError, match="num_kv_heads"):
        build(dict(num_heads=4, num_kv_heads=3))
    with pytest.raises(ValueError, match="divisible"):
        build(dict(num_heads=3))
    with pytest.raises(ValueError, match="window"):
        build(dict(num_heads=2, window=0))
    with pytest.raises(ValueError, match="conv_size must be 0"):
        build(dict(num_heads=2, conv_size=1))
    with pytest.raises(ValueError, match="conv state does not match conv_size=3"):
        build(dict(num_heads=2, conv_size=3)).step(jnp.ones((BATCH, D)), mixer.init_cache(BATCH))
