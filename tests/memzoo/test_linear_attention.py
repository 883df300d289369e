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
        beta = sigmoid(x @ p["beta_proj.kernel"])
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
    ("mom", dict(num_memories=2, top_k=3), "top_k"),
    ("mom", dict(memory_rule="delta"), "memory_rule"),
    ("mom", dict(num_memories=0), "num_memories"),
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
