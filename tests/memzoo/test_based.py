"""Based, ReBased and the Hedgehog feature map (memzoo/linear_attention/based.py, common.py):
each equals normalised linear attention written out here in float64 numpy, one token at a time,
with the kernel written as its paper writes it (Based: 1 + s + s^2/2; ReBased: (q~.k~)^2 / d;
Hedgehog: the softmax feature maps), from the module's own parameters; Based adds its window
attention; the feature maps' inner products are those kernels; the family contract runs on
Hedgehog linear attention; fla's naive Based / ReBased agree when .peers is built."""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from memzoo.linear_attention.common import (FEATURE_MAPS, HedgehogFeatureMap, RebasedFeatureMap,
                                            feature_dim)
from pallas_kernels._testing import assert_close
from tests.memzoo import test_contract as contract
from tests.memzoo.helpers import forward, forward_packed
from tests.memzoo.test_hgrn import starts_of
from tests.memzoo.test_linear_attention import params_of

D, T, BATCH, CHUNK = 16, 24, 2, 16
EPS = 1e-6  # LinearAttention's denominator epsilon


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, T, D), jnp.float32)


def build(name, options, seed=0):
    mixer = memzoo.MIXERS[name](D, rngs=nnx.Rngs(seed), chunk_size=CHUNK, **options)
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
    return nnx.merge(graphdef, contract._perturbed(params), rest)


def layer_norm(x, gamma, beta, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * gamma + beta


def hedgehog(x, w, b):
    z = np.einsum("bthk,hkj->bthj", x, w) + b
    e, f = np.exp(z - z.max(-1, keepdims=True)), np.exp(-z + z.min(-1, keepdims=True))
    return np.concatenate([e / e.sum(-1, keepdims=True), f / f.sum(-1, keepdims=True)], -1)


def naive(mixer, x, segment_ids=None):
    """Normalised linear attention, kernel by kernel, float64; the linear branch only."""
    p, x = params_of(mixer), np.asarray(x, np.float64)
    q = np.einsum("btd,dhk->bthk", x, p["wq"])
    k = np.einsum("btd,dhk->bthk", x, p["wk"])
    v = np.einsum("btd,dhk->bthk", x, p["wv"])
    K = mixer.head_dim
    if mixer.feature_map == "taylor":
        def kernel(a, c):
            s = a @ c / np.sqrt(K)
            return 1 + s + s * s / 2
    elif mixer.feature_map == "rebased":
        g, bt = (np.asarray(t[...], np.float64) for t in (mixer.phi_q.gamma, mixer.phi_q.beta))
        q, k = layer_norm(q, g, bt), layer_norm(k, g, bt)

        def kernel(a, c):
            return (a @ c) ** 2 / K
    else:
        assert mixer.feature_map == "hedgehog"
        fq, fk = mixer.phi_q, mixer.phi_k
        q = hedgehog(q, *(np.asarray(t[...], np.float64) for t in (fq.weight, fq.bias)))
        k = hedgehog(k, *(np.asarray(t[...], np.float64) for t in (fk.weight, fk.bias)))

        def kernel(a, c):
            return a @ c
    b, t = x.shape[:2]
    H, G = mixer.num_heads, mixer.num_kv_heads
    starts = starts_of(segment_ids, b, t)
    o = np.zeros((b, t, H, v.shape[-1]))
    for bi in range(b):
        for h in range(H):
            g = h // (H // G)
            first = 0
            for ti in range(t):
                if starts[bi, ti]:
                    first = ti
                w = np.array([kernel(q[bi, ti, h], k[bi, s, g]) for s in range(first, ti + 1)])
                o[bi, ti, h] = w @ v[bi, first:ti + 1, g] / (w.sum() + EPS)
    return np.einsum("bthv,hvd->btd", o, p["wo"])


CASES = [
    ("based", "based", dict(num_heads=2, feature_dim=4, window=5)),
    ("based_no_window_gqa", "based", dict(num_heads=4, num_kv_heads=2, feature_dim=3, window=0)),
    ("rebased", "rebased", dict(num_heads=2, feature_dim=4)),
    ("hedgehog", "linear_attention", dict(num_heads=2, feature_map="hedgehog")),
    ("hedgehog_gqa", "linear_attention", dict(num_heads=4, num_kv_heads=2, head_dim=3,
                                              feature_map="hedgehog")),
]
SEG = np.repeat([[0, 1, 2], [3, 3, 4]], [5, 11, 8], axis=1)


@nnx.jit
def window_branch(mixer, x, segment_ids):
    return mixer.window_attention(x, segment_ids=segment_ids)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_naive_float64_recurrence(case):
    _, name, options = case
    mixer, x = build(name, options), inputs()
    seg = jnp.asarray(SEG, jnp.int32)
    y, y_packed = forward(mixer, x), forward_packed(mixer, x, seg)
    if getattr(mixer, "window_attention", None) is not None:
        # The window branch is memzoo.attention's (tested there): Based adds it.
        y = y - window_branch(mixer, x, None)
        y_packed = y_packed - window_branch(mixer, x, seg)
    assert_close(y, naive(mixer, x), 1e-5, f"{name}: vs naive float64")
    assert_close(y_packed, naive(mixer, x, SEG), 1e-5, f"{name}: packed vs naive float64")


def test_hedgehog_linear_attention_keeps_the_contract():
    # Not a registered name of its own, so test_contract.py does not reach it: run it here.
    _, name, options = CASES[4]
    opts = {**options, "chunk_size": CHUNK}
    contract.check_decoding(name, opts)
    contract.check_packed_equals_alone(name, opts)
    contract.check_gradients(name, opts)
    contract.check_bfloat16(name, opts)


def test_based_without_window_decodes():
    contract.check_decoding("based", {**CASES[1][2], "chunk_size": CHUNK})


def test_feature_maps_give_their_kernels():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 2, 5)), rng.standard_normal((2, 3, 2, 5))
    s = np.sum(q * k, -1) / np.sqrt(5)
    phi = np.asarray(FEATURE_MAPS["taylor"](jnp.asarray(q)) * FEATURE_MAPS["taylor"](
        jnp.asarray(k))).sum(-1)
    np.testing.assert_allclose(phi, 1 + s + s * s / 2, rtol=1e-5)
    assert FEATURE_MAPS["taylor"](jnp.asarray(q)).shape[-1] == feature_dim("taylor", 5) == 21
    rebased = RebasedFeatureMap(5)
    qn, kn = (layer_norm(a, 1.0, 0.0) for a in (q, k))
    phi = np.asarray(rebased(jnp.asarray(q)) * rebased(jnp.asarray(k))).sum(-1)
    np.testing.assert_allclose(phi, np.sum(qn * kn, -1) ** 2 / 5, rtol=1e-4)
    assert rebased(jnp.asarray(q)).shape[-1] == feature_dim("rebased", 5) == 15
    hh = HedgehogFeatureMap(2, 5, "heads", rngs=nnx.Rngs(0))
    f = np.asarray(hh(jnp.asarray(q, jnp.float32)))
    assert f.shape[-1] == feature_dim("hedgehog", 5) == 10 and f.min() > 0
    np.testing.assert_allclose(f[..., :5].sum(-1), 1.0, rtol=1e-6)  # W = I at init: softmax(q)
    np.testing.assert_allclose(f[..., :5], hedgehog(q, np.eye(5)[None].repeat(2, 0), 0)[..., :5],
                               rtol=1e-5)


def test_state_sizes_and_caches():
    m = memzoo.MIXERS["based"](D, num_heads=2, feature_dim=4, window=8, rngs=nnx.Rngs(0))
    cache = m.init_cache(3)
    assert cache.linear.state.shape == (3, 2, 1 + 4 + 10, D // 2 + 1)  # + the normaliser
    assert cache.window.k.shape[1] == 8  # the ring holds the window
    m = memzoo.MIXERS["rebased"](D, num_heads=2, feature_dim=4, rngs=nnx.Rngs(0))
    assert m.init_cache(3).state.shape == (3, 2, 10, D // 2 + 1)


def run_fla_naive(jobs):
    """[(fla naive function name, q, k, v)] -> their outputs, in one peers' torch process."""
    from tests.convert.golden import PEERS_PYTHON, require_peers
    require_peers()
    script = ("import json,sys,torch\n"
              "from fla.ops.based.naive import naive_parallel_based\n"
              "from fla.ops.rebased.naive import naive_parallel_rebased\n"
              "out=[]\n"
              "for fn,*a in json.loads(sys.stdin.read()):\n"
              "    q,k,v=(torch.tensor(x,dtype=torch.float64) for x in a)\n"
              "    out.append(globals()[fn](q,k,v,use_norm=True).double().tolist())\n"
              "print(json.dumps(out))\n")
    proc = subprocess.run([PEERS_PYTHON, "-c", script],
                          input=json.dumps([[fn] + [a.tolist() for a in qkv]
                                            for fn, *qkv in jobs]),
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [np.asarray(o) for o in json.loads(proc.stdout)]


def test_fla_naive_kernels_agree():
    """fla's naive parallel Based / ReBased ([b, h, t, d], norm eps 1e-6) against our feature
    maps through chunked_linear_attention (fla's ReBased op takes the LayerNorm-ed q, k)."""
    import pallas_kernels
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 11, n)) for n in (4, 4, 3))
    theirs = run_fla_naive([("naive_parallel_based", q, k, v),
                            ("naive_parallel_rebased", layer_norm(q, 1.0, 0.0),
                             layer_norm(k, 1.0, 0.0), v)])
    tq, tk, tv = (jnp.asarray(a.transpose(0, 2, 1, 3), jnp.float32) for a in (q, k, v))
    v1 = jnp.concatenate([tv, jnp.ones(tv.shape[:-1] + (1,))], -1)
    for phi, ref, what in ((FEATURE_MAPS["taylor"], theirs[0], "based"),
                           (RebasedFeatureMap(4), theirs[1], "rebased")):
        o, _ = pallas_kernels.chunked_linear_attention(phi(tq), phi(tk), v1, scale=1.0)
        ours = (o[..., :-1] / (o[..., -1:] + 1e-6)).transpose(0, 2, 1, 3)
        assert_close(ours, ref, 1e-5, f"fla naive_parallel_{what} vs our {what} features")


@pytest.mark.parametrize("name, options, match", [
    ("based", dict(window=-1), "window"),
    ("based", dict(window_heads=0), "window_heads"),
    ("based", dict(feature_dim=0), "feature_dim"),
    ("rebased", dict(feature_dim=2.5), "feature_dim"),
    ("linear_attention", dict(feature_map="hedgehog", qk_norm="rmsnorm", normalize=False),
     "feature_map"),
    ("linear_attention", dict(feature_map="taylor", qk_norm="rmsnorm", normalize=False),
     "feature_map"),
])
def test_bad_options_name_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        memzoo.MIXERS[name](D, rngs=nnx.Rngs(0), **options)
