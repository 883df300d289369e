"""Local Linear Attention (Zuo et al., 2025, "Local Linear Attention: An Optimal Interpolation
of Linear and Softmax Attention for Test-Time Regression"), the "local_linear_attention" mixer.

Attention as test-time regression: given the (key, value) pairs a query can see, predict the
value at the query. Softmax attention is the locally *constant* (Nadaraya-Watson) estimator,
o = sum_j p_j v_j with p_j = softmax_j(q . k_j / sqrt(K)). Local linear attention fits, per
query, a locally weighted *linear* model with the same weights,

    min_{b, W}  sum_j p_j || v_j - b - W (k_j - q) ||^2  + lambda ||W||^2,   o = b,

whose closed form is (mu_k = sum p_j k_j, mu_v = sum p_j v_j, Sigma = the weighted key
covariance sum p_j (k_j - mu_k)(k_j - mu_k)^T)

    rho = (Sigma + lambda I)^-1 (q - mu_k)
    o   = mu_v + sum_j p_j v_j (k_j - mu_k)^T rho  =  sum_j p_j (1 + (k_j - mu_k)^T rho) v_j,

softmax attention plus a first-order correction that removes the estimator's boundary bias
(the query sits at the edge of its keys' cloud); lambda -> infinity gives softmax attention
back. lambda is `ridge` (fixed; the paper's regulariser).

Here the keys are a sliding window (`window` W: each token sees itself and the W - 1 before
it), so decoding has a bounded cache: the ring KV cache of memzoo.attention (KVCache). The
parallel form scores all T x T pairs under the window mask and forms the second moments
sum_j p_j k_j k_j^T as one [T, T] x [T, K^2] product (never [T, T, K, K]), then solves one
K x K system per query and head; the cached form (prefill, `step`) runs the same function on
[ring; new keys]. (The paper's FlashLLA is a blocked kernel of this computation with a
conjugate-gradient solve; this is the XLA form, O(T^2 K^2) in the parallel call.) The
projections, GQA, rotary positions and the optional short convolution are Attention's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from memzoo.attention import Attention, KVCache, check_segment_ids, segment_positions, \
    segment_starts
from memzoo.registry import register_mixer


def local_linear_read(q, k, v, visible, ridge: float):
    """q [b, t, H, K]; k, v [b, s, G, K] (H a multiple of G); visible [b or 1, t, s] bool, at
    least one key per query. Returns o [b, t, H, K] in float32 at least."""
    H, G = q.shape[2], k.shape[2]
    if H != G:
        k, v = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
    f = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v = q.astype(f), k.astype(f), v.astype(f)
    b, s, _, K = k.shape
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * K ** -0.5
    p = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
    mu_k = jnp.einsum("bhts,bshk->bthk", p, k)
    mu_v = jnp.einsum("bhts,bshk->bthk", p, v)
    outer = (k[..., :, None] * k[..., None, :]).reshape(b, s, H, K * K)
    second = jnp.einsum("bhts,bshm->bthm", p, outer).reshape(mu_k.shape + (K,))
    sigma = second - mu_k[..., :, None] * mu_k[..., None, :] + ridge * jnp.eye(K, dtype=f)[None, None, None]
    rho = jnp.linalg.solve(sigma, (q - mu_k)[..., None])[..., 0]
    # sum_j p_j v_j (k_j - mu_k)^T rho = sum_j p_j v_j (k_j . rho) - mu_v (mu_k . rho)
    c = jnp.einsum("bshk,bthk->bhts", k, rho)
    return mu_v + jnp.einsum("bhts,bshv->bthv", p * c, v) \
        - mu_v * jnp.sum(mu_k * rho, axis=-1, keepdims=True)


@register_mixer("local_linear_attention")
class LocalLinearAttention(Attention):
    """Sliding-window local linear attention: [b, t, d] -> [b, t, d].

    Options: `window` (int >= 2, required bounded context), `ridge` (lambda > 0) and
    Attention's projections (num_heads, head_dim, num_kv_heads, rope, rope_base, rope_fraction,
    conv_size, out_bias).

    >>> lla = LocalLinearAttention(8, num_heads=2, window=4, rngs=nnx.Rngs(0))
    >>> lla(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, window: int = 64, ridge: float = 1.0,
                 num_heads: int = 4, head_dim: int | None = None,
                 num_kv_heads: int | None = None, rope: bool = True, rope_base: float = 10_000.0,
                 conv_size: int = 0, rope_fraction: float = 1.0, out_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"LocalLinearAttention: `window` must be an integer >= 2 (a "
                             f"regression needs more than one key), got {window!r}")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ValueError(f"LocalLinearAttention: `ridge` must be a number > 0, got {ridge!r}")
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim,
                         num_kv_heads=num_kv_heads, window=window, rope=rope,
                         rope_base=rope_base, conv_size=conv_size, rope_fraction=rope_fraction,
                         out_bias=out_bias, dtype=dtype, rngs=rngs)
        self.ridge = float(ridge)

    def _attend(self, q, k, v, visible):
        return local_linear_read(q, k, v, visible, self.ridge).astype(self.dtype)

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> KVCache:
        """A ring of `window` slots (`max_len` ignored: the cache never grows)."""
        del max_len
        return super().init_cache(batch_size)

    def __call__(self, x, cache: KVCache | None = None, *, segment_ids=None):
        """Parallel form, or with `cache` the prefill that continues from it: (y, cache).
        `segment_ids` [b, t] (parallel form only): keys only from the query's document."""
        layers.check_input("LocalLinearAttention", "x", x, ndim=3, width=self.d_model)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("LocalLinearAttention: `segment_ids` applies to the parallel "
                                 "form only; a cache holds one document per batch row")
            return self._cached(x, cache)
        b, T, _ = x.shape
        t = jnp.arange(T, dtype=jnp.int32)
        visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - self.window)
        visible = visible[None]
        if segment_ids is None:
            positions = jnp.broadcast_to(t[None], (b, T))
        else:
            check_segment_ids("LocalLinearAttention", segment_ids, (b, T))
            positions = segment_positions(segment_ids)
            doc = jnp.cumsum(segment_starts(segment_ids), axis=1)
            visible = visible & (doc[:, :, None] == doc[:, None, :])
        q, k, v, _ = self._project_conv(x, positions, segment_ids=segment_ids)
        return self._out(self._attend(q, k, v, visible))

    def _cached(self, x, cache: KVCache):
        b, T, _ = x.shape
        if cache.k.shape[0] != b:
            raise ValueError(f"LocalLinearAttention: cache is for batch {cache.k.shape[0]}, "
                             f"x has {b}")
        index, W = cache.index, cache.k.shape[1]
        q_pos = index + jnp.arange(T, dtype=jnp.int32)
        q, k, v, conv = self._project_conv(x, jnp.broadcast_to(q_pos[None], (b, T)), cache.conv)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        # Keys: the ring (slot s holds the latest position = s mod W before index) and the new
        # ones; the ring is written after reading, so a long prefill still sees it.
        s = jnp.arange(W, dtype=jnp.int32)
        k_pos = jnp.concatenate([index - W + jnp.mod(s - index, W), q_pos])
        visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None]) \
            & (k_pos[None, :] > q_pos[:, None] - self.window)
        o = self._attend(q, jnp.concatenate([cache.k, k], 1), jnp.concatenate([cache.v, v], 1),
                         visible[None])
        m = min(T, W)
        write = jnp.mod(index + T - m + jnp.arange(m, dtype=jnp.int32), W)
        new_k = cache.k.at[:, write].set(k[:, T - m:])
        new_v = cache.v.at[:, write].set(v[:, T - m:])
        return self._out(o), KVCache(new_k, new_v, index + T, conv)
