"""The linear-attention family (memzoo/linear_attention): for each of linear attention, RetNet,
GLA, DeltaNet, Gated DeltaNet and Mixture-of-Memories, the module equals its paper's recurrence
written out here in float64 numpy (a loop over time) from the module's own parameters; the
contract's decoding and bfloat16 checks (tests/memzoo/test_contract.py) over the configurations
here; key/value heads shared by query heads; MoM writes only to the routed memories; bad options
name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from memzoo.linear_attention import LinearAttentionCache
from pallas_kernels._testing import assert_close
from tests.memzoo import test_contract as contract
from tests.memzoo.helpers import forward, prefill, step

D, T, BATCH, CHUNK = 16, 24, 2, 16  # T spans two chunks, the last one partial

# (id, mixer, options)
CASES = [
    ("linear_elu_normalized", "linear_attention", dict(num_heads=2)),
    ("linear_relu_gqa", "linear_attention",
     dict(num_heads=2, num_kv_heads=1, feature_map="relu", normalize=False, conv_size=3,
          output_norm="rmsnorm", output_gate=True)),
    ("retnet", "retnet", dict(num_heads=2)),
    ("gla", "gla", dict(num_heads=2, value_dim=6)),
    ("deltanet", "deltanet", dict(num_heads=2)),
    ("gated_deltanet", "gated_deltanet", dict(num_heads=2)),
    ("mom_gated_deltanet", "mom", dict(num_heads=2, num_memories=3, top_k=2)),
    ("mom_linear_gqa", "mom", dict(num_heads=2, num_kv_heads=1, num_memories=3, top_k=1,
                                   memory_rule="linear_attention", shared_memory=False,
                                   qk_norm="none", conv_size=0)),
    ("deltanet_neg_eigval", "deltanet", dict(num_heads=2, allow_neg_eigval=True)),
    ("gated_deltanet_neg_eigval", "gated_deltanet", dict(num_heads=2, allow_neg_eigval=True)),
    ("gla_mimetic_conv", "gla", dict(num_heads=2, init="mimetic", conv_size=3)),
]


def ids(cases):
    return [c[0] for c in cases]


def build(name, options, seed=0, **extra):
    return memzoo.MIXERS[name](D, rngs=nnx.Rngs(seed), chunk_size=CHUNK, **options, **extra)


def inputs(seed=1, length=T):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D), jnp.float32)


# ---- the papers' recurrences, float64 numpy -------------------------------------------------

def params_of(mixer):
    flat = nnx.to_flat_state(nnx.state(mixer, nnx.Param))
    return {".".join(map(str, path)): np.asarray(v[...], np.float64) for path, v in flat}


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def l2n(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def rmsnorm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def layernorm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias


def rotate(x, positions, base=10_000.0):
    half = x.shape[-1] // 2
    ang = np.asarray(positions, np.float64)[:, :, None, None] * base ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def short_conv(parts, w):
    """Depthwise causal conv + SiLU: y_t = sum_i w[i] x_{t-W+1+i}, over concatenated channels."""
    b, t = parts[0].shape[:2]
    flat = np.concatenate([p.reshape(b, t, -1) for p in parts], axis=-1)
    W = w.shape[0]
    padded = np.concatenate([np.zeros((b, W - 1, flat.shape[-1])), flat], axis=1)
    y = silu(sum(w[i] * padded[:, i:i + t] for i in range(W)))
    out, start = [], 0
    for p in parts:
        n = p.shape[2] * p.shape[3]
        out.append(y[..., start:start + n].reshape(p.shape))
        start += n
    return out


def features(mixer, p, x):
    """q [b,t,H,K], k [b,t,G',K], v [b,t,G',V] after conv, feature map, q/k norm, rotary."""
    q = np.einsum("btd,dhk->bthk", x, p["wq"])
    if hasattr(mixer, "num_memories"):
        b, t = x.shape[:2]
        k = np.einsum("btd,dehk->btehk", x, p["wk"]).reshape(b, t, mixer.state_heads, -1)
        v = np.einsum("btd,dehk->btehk", x, p["wv"]).reshape(b, t, mixer.state_heads, -1)
    else:
        k = np.einsum("btd,dhk->bthk", x, p["wk"])
        v = np.einsum("btd,dhk->bthk", x, p["wv"])
    if mixer.conv_size:
        q, k, v = short_conv([q, k, v], p["conv_weight"])
    phi = {"identity": lambda z: z, "relu": lambda z: np.maximum(z, 0),
           "elu+1": lambda z: np.where(z > 0, z + 1, np.exp(z))}[mixer.feature_map]
    q, k = phi(q), phi(k)
    if mixer.qk_norm == "l2":
        q, k = l2n(q), l2n(k)
    elif mixer.qk_norm == "rmsnorm":
        q, k = rmsnorm(q, p["q_norm.scale"]), rmsnorm(k, p["k_norm.scale"])
    if mixer.rotary:
        pos = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])
        q, k = rotate(q, pos), rotate(k, pos)
    return q, k, v


def finish(mixer, p, x, o):
    """Per-head output norm, swish gate, output projection."""
    if mixer.output_norm == "rmsnorm":
        o = rmsnorm(o, p["o_norm.scale"])
    elif mixer.output_norm == "layernorm":
        o = layernorm(o, p["o_norm.scale"], p["o_norm.bias"])
    if mixer.output_gate:
        o = o * silu(np.einsum("btd,dhv->bthv", x, p["wg"]))
    return np.einsum("bthv,hvd->btd", o, p["wo"])


def naive(mixer, x):
    """The module's output by its paper's recurrence, one token at a time, float64."""
    p, x = params_of(mixer), np.asarray(x, np.float64)
    q, k, v = features(mixer, p, x)
    b, t = x.shape[:2]
    H, G, K = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    group = H // G
    kind = type(mixer).__name__
    o = np.zeros(q.shape[:3] + (v.shape[-1],))
    if kind == "MixtureOfMemories":
        return finish(mixer, p, x, naive_mom(mixer, p, x, q, k, v))
    if kind == "RetNet":
        gamma = 1.0 - 2.0 ** (-5.0 - np.arange(G))
    if kind == "GLA":
        alpha = sigmoid(np.einsum("btr,rhk->bthk", x @ p["gate_down"], p["gate_up"])
                        + p["gate_bias"]) ** (1.0 / 16.0)
    if kind in ("DeltaNet", "GatedDeltaNet"):
        beta = sigmoid(x @ p["beta_proj.kernel"]) * (2.0 if mixer.allow_neg_eigval else 1.0)
    if kind == "GatedDeltaNet":
        a = np.exp(-np.exp(p["log_A"]) * np.log1p(np.exp(
            x @ p["decay_proj.kernel"] + p["decay_proj.bias"])))
    scale = K ** -0.5
    for bi in range(b):
        for h in range(H):
            g = h // group  # the key/value head this query head reads
            S = np.zeros((K, v.shape[-1]))
            z = np.zeros(K)
            for ti in range(t):
                kt, vt, qt = k[bi, ti, g], v[bi, ti, g], q[bi, ti, h]
                if kind == "LinearAttention":
                    S = S + np.outer(kt, vt)
                    z = z + kt
                    o[bi, ti, h] = (qt @ S / (qt @ z + 1e-6) if mixer.normalize
                                    else scale * qt @ S)
                    continue
                if kind == "RetNet":
                    S = gamma[g] * S + np.outer(kt, vt)
                elif kind == "GLA":
                    S = alpha[bi, ti, g][:, None] * S + np.outer(kt, vt)
                elif kind == "DeltaNet":
                    S = (np.eye(K) - beta[bi, ti, g] * np.outer(kt, kt)) @ S \
                        + beta[bi, ti, g] * np.outer(kt, vt)
                elif kind == "GatedDeltaNet":
                    S = a[bi, ti, g] * (np.eye(K) - beta[bi, ti, g] * np.outer(kt, kt)) @ S \
                        + beta[bi, ti, g] * np.outer(kt, vt)
                o[bi, ti, h] = scale * qt @ S
    return finish(mixer, p, x, o)


def naive_mom(mixer, p, x, q, k, v):
    """MoM: each token updates its top-k memories (and the shared one) only; the read mixes
    the routed memories by renormalised router probabilities, plus the shared memory."""
    b, t = x.shape[:2]
    H, G, K, M = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim, mixer.num_memories
    E = mixer.num_slots
    group = H // G
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k, v = k.reshape(b, t, E, G, K), v.reshape(b, t, E, G, -1)
    delta = mixer.memory_rule == "gated_deltanet"
    if delta:
        beta = sigmoid(np.einsum("btd,deg->bteg", x, p["beta_proj"]))
        a = np.exp(-np.exp(p["log_A"]) * np.log1p(np.exp(
            x @ p["decay_proj.kernel"] + p["decay_proj.bias"]).reshape(b, t, E, G)))
    o = np.zeros((b, t, H, v.shape[-1]))
    for bi in range(b):
        S = np.zeros((E, G, K, v.shape[-1]))
        for ti in range(t):
            top = np.argsort(-probs[bi, ti])[:mixer.top_k]
            weight = {int(m): probs[bi, ti, m] / probs[bi, ti, top].sum() for m in top}
            if mixer.shared_memory:
                weight[M] = 1.0
            for m in weight:  # only these memories are written
                for g in range(G):
                    kt, vt = k[bi, ti, m, g], v[bi, ti, m, g]
                    if delta:
                        bt = beta[bi, ti, m, g]
                        S[m, g] = a[bi, ti, m, g] * (np.eye(K) - bt * np.outer(kt, kt)) @ S[m, g] \
                            + bt * np.outer(kt, vt)
                    else:
                        S[m, g] = S[m, g] + np.outer(kt, vt)
            for h in range(H):
                o[bi, ti, h] = sum(w * (K ** -0.5) * q[bi, ti, h] @ S[m, h // group]
                                   for m, w in weight.items())
    return o


# ---- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_chunked_equals_naive_float64_and_decodes(case):
    _, name, options = case
    mixer, x = build(name, options), inputs()
    y = forward(mixer, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert_close(y, naive(mixer, x), 1e-5, f"{name}: chunked vs naive float64 recurrence")
    contract.check_decoding(name, {**options, "chunk_size": CHUNK})


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 3, 5, 6)],
                         ids=ids([CASES[i] for i in (1, 3, 5, 6)]))
def test_bfloat16_compute_is_float32_in_value(case):
    _, name, options = case
    contract.check_bfloat16(name, {**options, "chunk_size": CHUNK})


def _share_kv(small, big):
    """Copy `small` (num_kv_heads=1) into `big` (num_kv_heads=H): every key/value-head parameter
    repeated over the key/value heads, the conv's key and value channels tiled."""
    src = params_of(small)
    state = nnx.state(big, nnx.Param)
    H, K = big.num_heads, big.head_dim
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        value, target = src[name], var[...].shape
        if name == "conv_weight":
            qc, kc = H * K, K
            value = np.concatenate([value[:, :qc], np.tile(value[:, qc:qc + kc], (1, H)),
                                    np.tile(value[:, qc + kc:], (1, H))], axis=1)
        elif value.shape != target:
            axis = next(i for i, (a, c) in enumerate(zip(value.shape, target)) if a != c)
            value = np.repeat(value, target[axis], axis=axis)
        var[...] = jnp.asarray(value, jnp.float32)
    nnx.update(big, state)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]],
                         ids=ids([CASES[1], CASES[3], CASES[5]]))
def test_key_value_heads_are_shared_by_query_heads(case):
    """num_kv_heads=1 equals num_kv_heads=H with every key/value head a copy of that one; the
    cache keeps one state per key/value head."""
    _, name, options = case
    options = {**options, "num_kv_heads": 1}
    small = build(name, options)
    big = build(name, {**options, "num_kv_heads": options["num_heads"]}, seed=3)
    _share_kv(small, big)
    x = inputs()
    assert_close(forward(small, x), forward(big, x), 1e-5, "GQA vs repeated heads")
    assert small.init_cache(BATCH).state.shape[1] == 1
    assert big.init_cache(BATCH).state.shape[1] == options["num_heads"]
    assert small.state_size * options["num_heads"] == big.state_size


def test_mom_token_writes_only_its_routed_memories():
    _, name, options = CASES[6]
    mixer, x = build(name, options), inputs()
    M, G = mixer.num_memories, mixer.num_kv_heads
    _, cache = prefill(mixer, x[:, :9], mixer.init_cache(BATCH))
    for t in (9, 10):
        _, new = step(mixer, x[:, t], cache)
        mask, weights = mixer.route(x[:, t:t + 1])
        before = np.asarray(cache.state).reshape(BATCH, mixer.num_slots, G, -1)
        after = np.asarray(new.state).reshape(BATCH, mixer.num_slots, G, -1)
        routed = np.asarray(mask[:, 0])
        assert routed.sum(-1).tolist() == [mixer.top_k] * BATCH
        np.testing.assert_allclose(np.asarray(weights[:, 0]).sum(-1), 1.0, rtol=1e-6)
        for b in range(BATCH):
            for m in range(M):
                changed = np.abs(after[b, m] - before[b, m]).max()
                if routed[b, m]:
                    assert changed > 1e-4, (t, b, m)
                else:
                    assert changed == 0.0, (t, b, m, changed)
            assert np.abs(after[b, M] - before[b, M]).max() > 1e-4  # the shared memory
        cache = new


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_negative_eigenvalues_reach_the_transition(name):
    """allow_neg_eigval: beta = 2 sigmoid in (0, 2) and the one-token transition the mixer applies
    to its state, S -> alpha (I - beta k k^T) S (its own k, unit norm), maps k u^T to
    alpha (1 - beta) k u^T: a negative eigenvalue wherever beta > 1. Off, beta stays in (0, 1)."""
    x = inputs(seed=5)[:, :1]
    off = build(name, dict(num_heads=2), seed=2)
    mixer = build(name, dict(num_heads=2, allow_neg_eigval=True), seed=2)
    # A beta projection aligned with the first row's token: sigmoid > 1/2 there, so beta > 1.
    w = jnp.tile(x[0, 0, :, None] / jnp.linalg.norm(x[0, 0]), (1, 2))
    off.beta_proj.kernel[...] = mixer.beta_proj.kernel[...] = w
    assert float(jnp.max(off._beta(x))) < 1.0
    beta = np.asarray(mixer._beta(x)[:, 0], np.float64)  # [b, G]
    np.testing.assert_allclose(beta, 2 * np.asarray(off._beta(x)[:, 0]), rtol=1e-6)
    assert beta.max() > 1.0 and beta.min() > 0.0 and beta.max() < 2.0
    parts, _ = mixer._conv(mixer._project(x), None, None, False)
    _, k = mixer._qk(parts[0], parts[1])
    k = np.asarray(k[:, 0], np.float64)  # [b, G, K], unit rows
    alpha = np.ones_like(beta) if name == "deltanet" else np.exp(
        np.asarray(mixer._gates(x)[0][:, 0], np.float64))
    u = np.asarray(jax.random.normal(jax.random.key(7), (BATCH, 2, mixer.value_dim)))
    S0 = np.einsum("bgk,bgv->bgkv", k, u)
    zero = mixer.init_cache(BATCH)
    _, from_zero = step(mixer, x[:, 0], zero)
    _, from_S0 = step(mixer, x[:, 0], zero.replace(state=jnp.asarray(S0, jnp.float32)))
    moved = np.asarray(from_S0.state - from_zero.state, np.float64)
    kk = np.sum(k * k, -1)  # 1 up to the L2 norm's epsilon
    eig = alpha * (1.0 - beta * kk)  # the eigenvalue along k
    assert (eig < 0).any()
    np.testing.assert_allclose(moved, eig[..., None, None] * S0, atol=1e-5)
    # and the full matrix's spectrum: 1 (K - 1 times) and 1 - beta.
    for b in range(BATCH):
        for g in range(2):
            A = np.eye(mixer.head_dim) - beta[b, g] * np.outer(k[b, g], k[b, g])
            ev = np.sort(np.linalg.eigvalsh(A))
            np.testing.assert_allclose(
                ev, [1.0 - beta[b, g] * kk[b, g]] + [1.0] * (mixer.head_dim - 1), atol=1e-12)


def _products(mixer):
    """sum_h W_q,h W_k,g(h)^T and sum_h W_v,g(h) W_o,h, [d, d] float64."""
    p = params_of(mixer)
    group = mixer.num_heads // mixer.num_kv_heads
    wk, wv = np.repeat(p["wk"], group, axis=1), np.repeat(p["wv"], group, axis=1)
    return np.einsum("dhk,ehk->de", p["wq"], wk), np.einsum("dhv,hve->de", wv, p["wo"])


# key/value heads x head_dim (value_dim) >= d_model: the products can be full rank.
MIMETIC = [("linear_attention", dict(num_heads=4)),
           ("gla", dict(num_heads=4, num_kv_heads=2, head_dim=32)),
           ("deltanet", dict(num_heads=4, value_dim=32)),
           ("gated_deltanet", dict(num_heads=4, num_kv_heads=1, head_dim=64))]


@pytest.mark.parametrize("name,options", MIMETIC, ids=[m[0] for m in MIMETIC])
def test_mimetic_init_products_are_near_identity(name, options):
    """init="mimetic": W_q W_k^T = 0.7 I + 0.7 Z and W_v W_o = 0.4 I + 0.4 Z' (Z ~ N(0, 1/d)),
    summed over heads, so the diagonal's mean is the identity's weight (to O(1/d)) and the
    off-diagonal entries have the noise's spread; the default init's products have a diagonal
    mean of 0. Query heads sharing a key head still differ; the short conv is the identity."""
    d = 64
    make = lambda init: memzoo.MIXERS[name](d, rngs=nnx.Rngs(0), init=init, **options)
    mixer, default = make("mimetic"), make("default")
    off = ~np.eye(d, dtype=bool)
    for (weight, noise), P, P0 in zip(((0.7, 0.7), (0.4, 0.4)), _products(mixer),
                                      _products(default)):
        assert abs(np.trace(P) / d - weight) < 0.05, np.trace(P) / d
        assert abs(np.trace(P0) / d) < 0.05
        assert abs(P[off].mean()) < 0.01
        np.testing.assert_allclose(P[off].std(), noise / np.sqrt(d), rtol=0.1)
        # the product is the whole d x d map, not a low-rank part of it
        assert np.linalg.matrix_rank(P) == d
    wq = params_of(mixer)["wq"]
    assert np.abs(wq[:, 0] - wq[:, 1]).max() > 1e-3
    if mixer.conv_size:
        conv = params_of(mixer)["conv_weight"]
        np.testing.assert_array_equal(conv[-1], 1.0)
        np.testing.assert_array_equal(conv[:-1], 0.0)
    # the default init is untouched by the option's existence
    again = memzoo.MIXERS[name](d, rngs=nnx.Rngs(0), **options)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(default, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


MOM_SPARSE = [dict(num_heads=2, num_memories=3, top_k=2),
              dict(num_heads=2, num_kv_heads=1, num_memories=4, top_k=1,
                   memory_rule="linear_attention", shared_memory=False, qk_norm="none",
                   conv_size=0)]


@pytest.mark.parametrize("options", MOM_SPARSE, ids=["gated_deltanet", "linear_gqa"])
def test_mom_sparse_dispatch_equals_dense_float64_at_k_over_m_cost(options):
    """dispatch="sparse" (each memory's routed tokens gathered into its own packed run) equals
    the dense masked heads in float64, with packed documents too (values; and parameter
    gradients for the linear rule), and hands the op
    T (k + shared) token-heads per query head where dense hands it T (M + shared)."""
    calls = []
    with jax.enable_x64(True):
        x = inputs().astype(jnp.float64)
        ids = jnp.asarray([[0] * 10 + [1] * 14, [2] * 5 + [3] * 19], jnp.int32)
        outs = {}
        for dispatch in ("dense", "sparse"):
            mixer = build("mom", options, dispatch=dispatch, dtype=jnp.float64)
            inner = mixer._memory

            def spy(q, *args, **kw):
                calls.append((dispatch, q.shape[1] * q.shape[2]))
                return inner(q, *args, **kw)
            mixer._memory = spy
            outs[dispatch] = (mixer(x), mixer(x, segment_ids=ids))
            if options.get("memory_rule") == "linear_attention":  # (the delta rule's float64
                cot = jax.random.normal(jax.random.key(4), x.shape, jnp.float64)  # VJP is slow)
                grads = nnx.grad(lambda m: jnp.sum(m(x, segment_ids=ids) * cot))(mixer)
                outs[dispatch] += tuple(jax.tree.leaves(nnx.state(grads, nnx.Param)))
        for a, b in zip(*outs.values()):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)
    shared = 1 if options.get("shared_memory", True) else 0
    sizes = dict(calls)  # the last call of each (all calls of a dispatch have one size)
    assert {d: {n for dd, n in calls if dd == d} for d in sizes} == {d: {n} for d, n in
                                                                     sizes.items()}
    H = options["num_heads"]
    assert sizes["dense"] == T * H * (options["num_memories"] + shared)
    assert sizes["sparse"] == T * H * (options["top_k"] + shared)


def test_mom_sparse_dispatch_keeps_the_contract():
    """Gradients finite and non-zero for every parameter; bfloat16 compute matches float32."""
    options = {**MOM_SPARSE[0], "chunk_size": CHUNK, "dispatch": "sparse"}
    contract.check_gradients("mom", options)
    contract.check_bfloat16("mom", options, decode_too=False)


def test_mom_load_balancing_loss():
    """Switch's M sum_i f_i P_i: 1 for a uniform router, M when one memory takes every token;
    recorded by nnx.sow with sow_aux_loss=True, and differentiable in the router."""
    x = inputs()
    mixer = build("mom", dict(num_heads=2, num_memories=4, top_k=1), sow_aux_loss=True)
    mixer.router[...] = jnp.zeros_like(mixer.router[...])
    assert float(mixer.load_balancing_loss(x)) == pytest.approx(1.0, rel=1e-6)
    mixer.router[...] = jnp.zeros_like(mixer.router[...]).at[:, 0].set(50.0) * jnp.sign(
        x[0, 0])[:, None]
    x = jnp.broadcast_to(x[:1, :1], x.shape)  # every token alike: all routed to memory 0
    assert float(mixer.load_balancing_loss(x)) == pytest.approx(4.0, rel=1e-3)
    mixer.router[...] = 0.1 * jax.random.normal(jax.random.key(3), mixer.router[...].shape)
    x = inputs()
    _, captured = nnx.capture(mixer, nnx.Intermediate)(x)
    sown = jax.tree.leaves(captured)
    assert len(sown) == 1
    np.testing.assert_allclose(sown[0], mixer.load_balancing_loss(x), rtol=1e-6)
    grad = nnx.grad(lambda m: m.load_balancing_loss(x))(mixer)
    assert float(jnp.abs(grad.router[...]).max()) > 0


def test_registry_and_state_sizes():
    for name in ("linear_attention", "retnet", "gla", "deltanet", "gated_deltanet", "mom"):
        assert name in memzoo.MIXERS
    la = build("linear_attention", dict(num_heads=2))
    assert la.state_size == 2 * 8 * (8 + 1)  # the normaliser z is a column of the state
    mom = build("mom", dict(num_heads=2, num_memories=3))
    assert mom.state_size == 4 * 2 * 8 * 8
    assert isinstance(mom.init_cache(1), LinearAttentionCache)


BAD_OPTIONS = [
    ("linear_attention", dict(feature_map="tanh"), "feature_map"),
    ("linear_attention", dict(feature_map="identity"), "normalize"),
    ("linear_attention", dict(qk_norm="rmsnorm"), "qk_norm"),
    ("retnet", dict(num_heads=3), "num_heads"),
    ("retnet", dict(num_heads=2, head_dim=5), "rotary"),
    ("gla", dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    ("gla", dict(gate_rank=0), "gate_rank"),
    ("gla", dict(gate_temperature=0.0), "gate_temperature"),
    ("deltanet", dict(qk_norm="l1"), "qk_norm"),
    ("deltanet", dict(conv_size=1), "conv_size"),
    ("gated_deltanet", dict(output_norm="batchnorm"), "output_norm"),
    ("gated_deltanet", dict(implementation="cuda"), "implementation"),
    ("gated_deltanet", dict(chunk_size=0), "chunk_size"),
    ("deltanet", dict(allow_neg_eigval=1), "allow_neg_eigval"),
    ("gla", dict(init="xavier"), "init"),
    ("mom", dict(num_memories=2, top_k=3), "top_k"),
    ("mom", dict(memory_rule="delta"), "memory_rule"),
    ("mom", dict(num_memories=0), "num_memories"),
    ("mom", dict(dispatch="scatter"), "dispatch"),
]


@pytest.mark.parametrize("name,options,match", BAD_OPTIONS,
                         ids=[f"{n}-{m}" for n, _, m in BAD_OPTIONS])
def test_bad_options_name_the_option(name, options, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        memzoo.MIXERS[name](D, rngs=nnx.Rngs(0), **options)


def test_bad_input_is_a_clear_error():
    mixer = build("gated_deltanet", dict(num_heads=2))
    with pytest.raises(ValueError, match=r"`x`.*d_model=16"):
        mixer(jnp.ones((BATCH, 4, D + 1)))
    with pytest.raises(ValueError, match=r"`x_t`.*rank 2"):
        mixer.step(jnp.ones((BATCH, 1, D)), mixer.init_cache(BATCH))
    with pytest.raises(ValueError, match=r"`segment_ids`.*integer"):
        mixer(jnp.ones((BATCH, 4, D)), segment_ids=jnp.ones((BATCH, 4)))
    with pytest.raises(ValueError, match="parallel form only"):
        mixer(jnp.ones((BATCH, 4, D)), cache=mixer.init_cache(BATCH),
              segment_ids=jnp.ones((BATCH, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"`cache`.*\(3, 2, 8, 8\)"):
        mixer(jnp.ones((3, 4, D)), cache=mixer.init_cache(BATCH))
