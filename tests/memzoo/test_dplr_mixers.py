"""Gated DeltaProduct and Comba (memzoo/linear_attention/deltaproduct.py), Kimi Delta Attention
and RWKV-7 (memzoo/linear_attention/kda.py): each module equals its paper's recurrence written
out here as a float64 numpy loop over tokens from the module's own parameters (projections, short
causal conv with SiLU or RWKV's token shift, L2 norms, gates, output norm and gate), with packed
documents (the state, the conv window and the shift restart at a new segment id); bad options
name the option. The contract (causality,
step == prefill == parallel, bfloat16, gradients) runs in tests/memzoo/test_contract.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.linear_attention.deltaproduct import Comba, GatedDeltaProduct
from memzoo.linear_attention.kda import RWKV7, KimiDeltaAttention
from pallas_kernels._testing import assert_close

D, T, H, CHUNK = 16, 20, 2, 16
SEG = np.asarray([[0] * 9 + [1] * 11, [4] * 5 + [2] * 15], np.int32)


def _np(p):
    return np.asarray(p[...], np.float64)


def _perturbed(m):
    """Parameters off their initial values (norm scales, biases matter), float32 as stored."""
    leaves, treedef = jax.tree.flatten(nnx.state(m, nnx.Param))
    rng = np.random.default_rng(1)
    leaves = [np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32)
              for p in leaves]
    nnx.update(m, jax.tree.unflatten(treedef, leaves))
    return m


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _l2(x):
    return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _conv_silu(flat, w, seg_row):
    """Depthwise causal conv (weight[-1] on the current token) + SiLU over [t, c], the window
    restarting with each document."""
    W = w.shape[0]
    out = np.zeros_like(flat)
    for t in range(flat.shape[0]):
        acc = np.zeros(flat.shape[1])
        for i in range(W):
            s = t - W + 1 + i
            if s >= 0 and seg_row[s] == seg_row[t]:
                acc += w[i] * flat[s]
        out[t] = _silu(acc)
    return out


def _qkv(m, x_row, seg_row, n=1):
    """q [t, H, K], k [t, n, G, K], v [t, n, G, V] after the conv and the L2 norms."""
    G, K, V = m.num_kv_heads, m.head_dim, m.value_dim
    q = np.einsum("td,dhk->thk", x_row, _np(m.wq)).reshape(len(x_row), -1)
    k = np.einsum("td,dhk->thk", x_row, _np(m.wk)).reshape(len(x_row), -1)
    v = np.einsum("td,dhk->thk", x_row, _np(m.wv)).reshape(len(x_row), -1)
    y = _conv_silu(np.concatenate([q, k, v], -1), _np(m.conv_weight), seg_row)
    nq, nk = q.shape[1], k.shape[1]
    q = _l2(y[:, :nq].reshape(-1, m.num_heads, K))
    k = _l2(y[:, nq:nq + nk].reshape(-1, n, G, K))
    v = y[:, nq + nk:].reshape(-1, n, G, V)
    return q, k, v


def gated_deltaproduct_loop(m, x, seg):
    """Siems et al. (2025), Gated DeltaProduct: n Householder steps per token, gate once."""
    n, G, K, V = m.n_householder, m.num_kv_heads, m.head_dim, m.value_dim
    group = m.num_heads // G
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        q, k, v = _qkv(m, x[b], seg[b], n)
        logit = x[b] @ _np(m.decay_proj.kernel) + _np(m.decay_proj.bias)
        log_alpha = -np.exp(_np(m.log_A)) * _softplus(logit)                     # [t, G]
        beta = _sigmoid(x[b] @ _np(m.beta_proj.kernel)).reshape(-1, n, G)
        S = np.zeros((G, K, V))
        for t in range(x.shape[1]):
            if t > 0 and seg[b, t] != seg[b, t - 1]:
                S = np.zeros((G, K, V))
            S = np.exp(log_alpha[t])[:, None, None] * S
            for j in range(n):
                for g in range(G):
                    kk = k[t, j, g]
                    P = np.eye(K) - beta[t, j, g] * np.outer(kk, kk)
                    S[g] = P @ S[g] + beta[t, j, g] * np.outer(kk, v[t, j, g])
            o = np.stack([S[h // group].T @ q[t, h] for h in range(m.num_heads)]) * K ** -0.5
            o = _rms(o, _np(m.o_norm.scale), 1e-6)
            gate = np.einsum("d,dhv->hv", x[b, t], _np(m.wg))
            y[b, t] = np.einsum("hv,hvd->d", o * _silu(gate), _np(m.wo))
    return y


def kda_loop(m, x, seg):
    """Kimi Linear (2025), KDA: S_t = (I - beta k k^T) Diag(alpha) S_{t-1} + beta k v^T."""
    G, K, V = m.num_kv_heads, m.head_dim, m.value_dim
    group = m.num_heads // G
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        q, k, v = _qkv(m, x[b], seg[b])
        f = (x[b] @ _np(m.decay_down.kernel)) @ _np(m.decay_up.kernel) + _np(m.decay_up.bias)
        log_alpha = -np.exp(_np(m.log_A))[:, None] * _softplus(f.reshape(-1, G, K))
        beta = _sigmoid(x[b] @ _np(m.beta_proj.kernel))
        gate = ((x[b] @ _np(m.gate_down.kernel)) @ _np(m.gate_up.kernel)
                + _np(m.gate_up.bias)).reshape(-1, m.num_heads, V)
        S = np.zeros((G, K, V))
        for t in range(x.shape[1]):
            if t > 0 and seg[b, t] != seg[b, t - 1]:
                S = np.zeros((G, K, V))
            for g in range(G):
                kk = k[t, 0, g]
                P = np.eye(K) - beta[t, g] * np.outer(kk, kk)
                S[g] = P @ np.diag(np.exp(log_alpha[t, g])) @ S[g] \
                    + beta[t, g] * np.outer(kk, v[t, 0, g])
            o = np.stack([S[h // group].T @ q[t, h] for h in range(m.num_heads)]) * K ** -0.5
            o = _rms(o, _np(m.o_norm.scale), 1e-6)
            y[b, t] = np.einsum("hv,hvd->d", o * _sigmoid(gate[t]), _np(m.wo))
    return y


def comba_loop(m, x, seg):
    """Hu et al. (2025), Comba (fla's form): S_t = alpha S + beta k (v - alpha S^T p)^T with
    p = sigmoid(lambda) k, read with the corrected query q - D p."""
    G, K, V = m.num_kv_heads, m.head_dim, m.value_dim
    group = m.num_heads // G
    c = _sigmoid(_np(m.inner_decay))
    Dc = _np(m.correction)
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        q, k, v = _qkv(m, x[b], seg[b])
        logit = x[b] @ _np(m.decay_proj.kernel) + _np(m.decay_proj.bias)
        alpha = np.exp(-np.exp(_np(m.log_A)) * _softplus(logit))
        beta = _sigmoid(x[b] @ _np(m.beta_proj.kernel))
        S = np.zeros((G, K, V))
        for t in range(x.shape[1]):
            if t > 0 and seg[b, t] != seg[b, t - 1]:
                S = np.zeros((G, K, V))
            for g in range(G):
                kk, p = k[t, 0, g], c[g] * k[t, 0, g]
                Sd = alpha[t, g] * S[g]
                S[g] = Sd + beta[t, g] * np.outer(kk, v[t, 0, g] - Sd.T @ p)
            o = np.stack([S[h // group].T @ (q[t, h] - Dc[h] * c[h // group] * k[t, 0, h // group])
                          for h in range(m.num_heads)]) * K ** -0.5
            o = _rms(o, _np(m.o_norm.scale), 1e-6)
            gate = np.einsum("d,dhv->hv", x[b, t], _np(m.wg))
            y[b, t] = np.einsum("hv,hvd->d", o * _silu(gate), _np(m.wo))
    return y


def rwkv7_loop(m, x, seg):
    """Peng et al. (2025), RWKV-7 time mixing in the paper's row convention (S [v, k]):
    S_t = S_{t-1} (diag(w_t) - kappa_hat^T (a_t * kappa_hat)) + v_t^T k~_t, read S_t r_t."""
    H, K, V = m.num_heads, m.head_dim, m.value_dim
    mu = _np(m.lerp_mu)
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        S = np.zeros((H, V, K))
        prev = np.zeros(x.shape[2])
        for t in range(x.shape[1]):
            if t > 0 and seg[b, t] != seg[b, t - 1]:
                S, prev = np.zeros((H, V, K)), np.zeros(x.shape[2])
            xt = x[b, t]
            xr, xw, xk, xv, xa, xg = (xt + (prev - xt) * mu[i] for i in range(6))
            r = np.einsum("d,dhk->hk", xr, _np(m.wq))
            k = np.einsum("d,dhk->hk", xk, _np(m.wk))
            v = np.einsum("d,dhk->hk", xv, _np(m.wv))
            w = np.exp(-np.exp(-0.5) * _sigmoid(
                np.einsum("r,rhk->hk", np.tanh(xw @ _np(m.decay_down)), _np(m.decay_up))
                + _np(m.decay_bias)))
            a = _sigmoid(np.einsum("r,rhk->hk", xa @ _np(m.a_down), _np(m.a_up)) + _np(m.a_bias))
            g = np.einsum("r,rhv->hv", _sigmoid(xg @ _np(m.gate_down)), _np(m.gate_up))
            kappa = _l2(k * _np(m.k_k))
            kt = k * (1.0 + (a - 1.0) * _np(m.k_a))
            o = np.zeros((H, V))
            for h in range(H):
                S[h] = S[h] @ (np.diag(w[h]) - np.outer(kappa[h], a[h] * kappa[h])) \
                    + np.outer(v[h], kt[h])
                o[h] = S[h] @ r[h]
            mean = o.mean(-1, keepdims=True)
            var = ((o - mean) ** 2).mean(-1, keepdims=True)
            o = (o - mean) / np.sqrt(var + m.o_norm.epsilon) * _np(m.o_norm.scale) \
                + _np(m.o_norm.bias)
            o = (o + np.sum(r * kt * _np(m.r_k), -1, keepdims=True) * v) * g
            y[b, t] = np.einsum("hv,hvd->d", o, _np(m.wo))
            prev = xt
    return y


CASES = {
    "gated_deltaproduct": (lambda **kw: GatedDeltaProduct(D, num_heads=H, n_householder=3,
                                                          chunk_size=CHUNK, rngs=nnx.Rngs(0),
                                                          **kw), gated_deltaproduct_loop),
    "comba": (lambda **kw: Comba(D, num_heads=H, chunk_size=CHUNK, rngs=nnx.Rngs(0), **kw),
              comba_loop),
    "kda": (lambda **kw: KimiDeltaAttention(D, num_heads=H, chunk_size=CHUNK, rngs=nnx.Rngs(0),
                                            **kw), kda_loop),
    "rwkv7": (lambda **kw: RWKV7(D, num_heads=H, decay_rank=4, a_rank=4, gate_rank=4,
                                chunk_size=CHUNK, rngs=nnx.Rngs(0), **kw), rwkv7_loop),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_papers_recurrence_with_packed_documents(name):
    build, loop = CASES[name]
    m = _perturbed(build())
    x = jax.random.normal(jax.random.key(0), (2, T, D))
    got = jax.jit(lambda x, s: m(x, segment_ids=s))(x, jnp.asarray(SEG))
    ref = loop(m, np.asarray(x, np.float64), SEG)
    assert_close(got, ref, 1e-5, f"{name} vs float64 loop")


@pytest.mark.parametrize("name", ["gated_deltaproduct", "comba", "kda"])
def test_grouped_kv_heads_match_the_loop(name):
    """num_kv_heads < num_heads: query heads of a group read one state."""
    build, loop = CASES[name]
    m = _perturbed(build(num_kv_heads=1))
    x = jax.random.normal(jax.random.key(2), (1, T, D))
    seg = np.zeros((1, T), np.int32)
    got = jax.jit(lambda x: m(x))(x)
    assert_close(got, loop(m, np.asarray(x, np.float64), seg), 1e-5, f"{name} GQA")


@pytest.mark.parametrize("option, value", [("n_householder", 0), ("init", "mimetic")])
def test_gated_deltaproduct_rejects_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        GatedDeltaProduct(D, num_heads=H, rngs=nnx.Rngs(0), **{option: value})


@pytest.mark.parametrize("option, value", [("use_inner_decay", 1), ("correction_factor", "x")])
def test_comba_rejects_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        Comba(D, num_heads=H, rngs=nnx.Rngs(0), **{option: value})


def test_kda_rejects_bad_options():
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        KimiDeltaAttention(D, num_heads=H, allow_neg_eigval=1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("option", ["decay_rank", "a_rank", "gate_rank"])
def test_rwkv7_rejects_bad_options(option):
    with pytest.raises(ValueError, match=option):
        RWKV7(D, num_heads=H, rngs=nnx.Rngs(0), **{option: 0})
