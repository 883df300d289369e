"""RWKV-6 time mixing (memzoo/linear_attention/rwkv6.py): the module equals the paper's equations
(ddlerp token shift, low-rank data-dependent decay, bonus read, per-head group norm, silu gate)
written out here as a float64 numpy loop over time from the module's own parameters, with packed
documents (the token shift does not cross them); decoding continues from the cached last token;
bad options name the option. The contract (causality, step == prefill == parallel, segments,
bfloat16, gradients) runs in tests/memzoo/test_contract.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.linear_attention.rwkv6 import RWKV6
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import prefill, step

D, T, H = 8, 21, 2


def _np(p):
    return np.asarray(p[...], np.float64)


def rwkv6_loop(m, x, seg):
    """Eagle and Finch, section 4 (time mixing), token by token in float64."""
    B, _, Dm = x.shape
    K, V = m.head_dim, m.value_dim
    y = np.zeros_like(x)
    for b in range(B):
        S = np.zeros((H, K, V))
        prev = np.zeros(Dm)
        for t in range(x.shape[1]):
            if t > 0 and seg[b, t] != seg[b, t - 1]:
                S, prev = np.zeros((H, K, V)), np.zeros(Dm)
            xt = x[b, t]
            delta = prev - xt
            xx = xt + delta * _np(m.lerp_mu)
            low = np.tanh(xx @ _np(m.lerp_down)).reshape(5, m.lerp_rank)
            mix = {c: _np(m.lerp_bias)[i] + low[i] @ _np(m.lerp_up)[i]
                   for i, c in enumerate("rwkvg")}
            xc = {c: xt + delta * mix[c] for c in "rwkvg"}
            r = np.einsum("d,dhk->hk", xc["r"], _np(m.wq))
            k = np.einsum("d,dhk->hk", xc["k"], _np(m.wk))
            v = np.einsum("d,dhk->hk", xc["v"], _np(m.wv))
            g = np.einsum("d,dhk->hk", xc["g"], _np(m.wg))
            d = _np(m.decay_bias) + np.einsum("r,rhk->hk", np.tanh(xc["w"] @ _np(m.decay_down)),
                                               _np(m.decay_up))
            w = np.exp(-np.exp(d))
            kv = k[:, :, None] * v[:, None, :]
            o = np.einsum("hk,hkv->hv", r, S + _np(m.bonus)[:, :, None] * kv)
            S = w[:, :, None] * S + kv
            mean = o.mean(-1, keepdims=True)
            var = ((o - mean) ** 2).mean(-1, keepdims=True)
            o = (o - mean) / np.sqrt(var + 1e-5) * _np(m.o_norm.scale) + _np(m.o_norm.bias)
            o = o * g / (1 + np.exp(-g))
            y[b, t] = np.einsum("hv,hvd->d", o, _np(m.wo))
            prev = xt
    return y


def _mixer(**kw):
    m = RWKV6(D, num_heads=H, lerp_rank=4, decay_rank=6, chunk_size=8, rngs=nnx.Rngs(0), **kw)
    # Off the initial values: the norm's scale and bias, the lerps and the bonus all matter.
    leaves, treedef = jax.tree.flatten(nnx.state(m, nnx.Param))
    rng = np.random.default_rng(1)
    leaves = [np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32)
              for p in leaves]
    nnx.update(m, jax.tree.unflatten(treedef, leaves))
    return m


def test_matches_the_papers_recurrence_with_packed_documents():
    m = _mixer()
    x = jax.random.normal(jax.random.key(0), (2, T, D))
    seg = jnp.asarray([[0] * 9 + [1] * 12, [4] * 5 + [2] * 16], jnp.int32)
    got = jax.jit(lambda x, s: m(x, segment_ids=s))(x, seg)
    ref = rwkv6_loop(m, np.asarray(x, np.float64), np.asarray(seg))
    assert_close(got, ref, 1e-5, "rwkv6 vs float64 loop")


def test_prefill_then_step_reads_the_cached_token():
    """Decoding: the cache's last token is the token shift's x_{t-1} (with it zeroed, the next
    token's output changes)."""
    m = _mixer()
    x = jax.random.normal(jax.random.key(1), (1, 6, D))
    ref = rwkv6_loop(m, np.asarray(x, np.float64), np.zeros((1, 6), np.int32))
    _, cache = prefill(m, x[:, :5], m.init_cache(1))
    y_t, _ = step(m, x[:, 5], cache)
    assert_close(y_t, ref[:, 5], 1e-5, "step after prefill")
    blank, _ = step(m, x[:, 5], cache.replace(conv=jnp.zeros_like(cache.conv)))
    assert not np.allclose(blank, ref[:, 5], atol=1e-3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lerp_rank=0), "`lerp_rank`"), (dict(decay_rank=1.5), "`decay_rank`"),
    (dict(scale=-1.0), "`scale`"), (dict(num_heads=3), "`num_heads`"),
])
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RWKV6(D, **{"num_heads": H, **kwargs}, rngs=nnx.Rngs(0))
