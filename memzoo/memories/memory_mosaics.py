"""Memory Mosaics' contextual memory (Zhang, Nasserdine, et al., 2024, "Memory Mosaics"), the
"memory_mosaic" mixer.

A memory mosaic is a network of associative memories, each a kernel regression over the
(key, value) pairs it has stored in the context. Predictive disentanglement shapes what the
pairs are: a unit's key summarises the past (a leaky average of its features), its value peeks
one step into the future, so each memory learns to predict what comes next from what came
before. Per head (unit), with u_t = W_v x_t:

    key      k~_t = sum_{s <= t} exp(-beta (t - s)) W_k x_s     (k~_t = e^-beta k~_{t-1} + W_k x_t)
             k_t  = exp(a) k~_t / |k~_t|                         (a: learned key scale, <= 5)
    value    v_t  = exp(g) n((1 - c) u_{t+1} + c u_t)            (n: l2 normalisation; c learned)
    read     y_t  = sum_{s < t} softmax_s(k_t . k_s) v_s         (y_0 = 0)
    output   W_o [y_t over heads]

v_s needs x_{s+1}, so the pair (k_s, v_s) enters the memory one step late: the read at t uses
the pairs s < t, whose values need inputs up to x_t: causal. The read is Gaussian kernel
smoothing (for unit keys, exp(k_t . k_s) ~ exp(-|k_t - k_s|^2 / 2) up to a factor per t) with
the key scale as its bandwidth. beta >= 0 (softplus of a per-head parameter, initialised to
0.5 ... 5 over the heads, the paper's spread of time scales) is tagged as the memory's dynamics.
The paper's "persistent memory" replaces the MLP of the block; this mixer is the contextual
memory layer only.

Parallel form: the leaky averages by pallas_kernels.linear_scan (restarting at documents), the
read as masked softmax over [T, T] scores (a strictly causal mask, which the flash-attention op
does not offer). Decoding (`MosaicCache`): a KVCache of the stored keys and values (one slot
ahead: slot j holds position j - 1, so the value completed at position t - 1 is written with
the key of t), the leaky key state and the last u (float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

import pallas_kernels
from memzoo import layers
from memzoo.attention import KVCache, check_segment_ids, segment_starts
from memzoo.linear_attention.common import check_positive_int, l2_normalize, normal_init
from memzoo.registry import register_mixer

DEFAULT_MAX_LEN = 2048
MAX_KEY_LOG_SCALE = 5.0


@struct.dataclass
class MosaicCache:
    """kv: KVCache with max_len + 1 slots (slot j: position j - 1); keys in the compute dtype.
    key_state [b, H * K] float32 (the leaky average k~); last_u [b, H, K] float32 (W_v x of the
    last token, whose value waits for the next token)."""
    kv: KVCache
    key_state: jax.Array
    last_u: jax.Array


def kernel_read(q, k, v, visible):
    """y_t = sum_s softmax_s(q_t . k_s) v_s over the visible [b or 1, t, s] pairs (0 where
    there is none); q [b, t, H, K], k, v [b, s, H, K]. float32 at least."""
    f = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bthk,bshk->bhts", q.astype(f), k.astype(f))
    mask = visible[:, None]
    # A finite floor, not -inf: a row with no pair (t = 0) must be finite before it is zeroed,
    # or its NaN would flow back through the softmax's gradient (0 * NaN).
    p = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(f).min), axis=-1)
    p = jnp.where(jnp.any(mask, axis=-1, keepdims=True), p, 0.0)
    return jnp.einsum("bhts,bshk->bthk", p, v.astype(f))


@register_mixer("memory_mosaic")
class MemoryMosaic(nnx.Module):
    """Memory Mosaics' contextual memory: [b, t, d] -> [b, t, d].

    Options: num_heads (associative memory units), head_dim (default d_model / num_heads),
    max_len (default decoding cache length).

    >>> mm = MemoryMosaic(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> mm(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 max_len: int = DEFAULT_MAX_LEN, dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive_int("MemoryMosaic", "d_model", d_model)
        check_positive_int("MemoryMosaic", "num_heads", num_heads)
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"MemoryMosaic: d_model={d_model} is not divisible by "
                                 f"`num_heads`={num_heads}; pass `head_dim`")
            head_dim = d_model // num_heads
        check_positive_int("MemoryMosaic", "head_dim", head_dim)
        check_positive_int("MemoryMosaic", "max_len", max_len)
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.max_len, self.dtype = max_len, dtype
        H, K = num_heads, head_dim
        self.wk = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wv = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wo = normal_init(rngs, (H, K, d_model), H * K, ("heads", "kv", "embed"))
        beta = np.linspace(0.5, 5.0, H) if H > 1 else np.array([0.5])
        # softplus^-1(beta): the leak starts at the paper's spread of time scales.
        self.leak = layers.param(jnp.asarray(np.log(np.expm1(beta)), jnp.float32), ("heads",),
                                 group="ssm_dynamics")
        self.key_log_scale = layers.param(jnp.ones((H,), jnp.float32), ("heads",))
        self.value_log_scale = layers.param(jnp.full((H,), -0.5, jnp.float32), ("heads",))
        self.value_mix = layers.param(
            jax.random.uniform(rngs.params(), (H,), jnp.float32), ("heads",))

    # ---- the pieces --------------------------------------------------------------------------
    def _keys(self, x, state, segment_ids):
        """Leaky-averaged, normalised, scaled keys [b, t, H, K] and the new leaky state."""
        b, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        raw = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(self.dtype)).reshape(b, T, H * K)
        decay = jnp.exp(-jax.nn.softplus(self.leak[...]))               # float32 dynamics
        a = jnp.broadcast_to(jnp.repeat(decay, K)[None, None], (b, T, H * K))
        k, state = pallas_kernels.linear_scan(a, raw, initial_state=state,
                                              segment_ids=segment_ids)
        scale = jnp.exp(jnp.minimum(self.key_log_scale[...], MAX_KEY_LOG_SCALE))
        k = l2_normalize(k.reshape(b, T, H, K)) * scale[None, None, :, None]
        return k.astype(self.dtype), state

    def _values(self, u, u_next):
        """v_t from u_t and u_{t+1} ([b, t, H, K] each)."""
        c = self.value_mix[...][None, None, :, None]
        v = l2_normalize((1.0 - c) * u_next.astype(jnp.float32) + c * u.astype(jnp.float32))
        return (v * jnp.exp(self.value_log_scale[...])[None, None, :, None]).astype(self.dtype)

    def _out(self, y):
        return jnp.einsum("bthk,hkd->btd", y.astype(self.dtype), self.wo[...].astype(self.dtype))

    # ---- the SequenceMixer protocol ----------------------------------------------------------
    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> MosaicCache:
        """Room for `max_len` pairs (default: the constructor's); the stores grow with the
        sequence, as attention's KV cache."""
        n = (max_len or self.max_len) + 1
        H, K = self.num_heads, self.head_dim
        kv = KVCache(jnp.zeros((batch_size, n, H, K), self.dtype),
                     jnp.zeros((batch_size, n, H, K), self.dtype), jnp.zeros((), jnp.int32))
        return MosaicCache(kv, jnp.zeros((batch_size, H * K), jnp.float32),
                           jnp.zeros((batch_size, H, K), jnp.float32))

    def step(self, x_t, cache: MosaicCache):
        layers.check_input("MemoryMosaic.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        y, cache = self._cached(x_t[:, None], cache)
        return y[:, 0], cache

    def __call__(self, x, cache: MosaicCache | None = None, *, segment_ids=None):
        """Parallel form, or with `cache` the prefill that continues from it: (y, cache).
        `segment_ids` [b, t] (parallel form only): each document has its own memory."""
        layers.check_input("MemoryMosaic", "x", x, ndim=3, width=self.d_model)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("MemoryMosaic: `segment_ids` applies to the parallel form "
                                 "only; a cache holds one document per batch row")
            return self._cached(x, cache)
        b, T, _ = x.shape
        x = x.astype(self.dtype)
        t = jnp.arange(T)
        visible = (t[None, :] < t[:, None])[None]
        if segment_ids is None:
            same_next = jnp.ones((b, T - 1), bool)
        else:
            check_segment_ids("MemoryMosaic", segment_ids, (b, T))
            doc = jnp.cumsum(segment_starts(segment_ids), axis=1)
            visible = visible & (doc[:, :, None] == doc[:, None, :])
            same_next = doc[:, 1:] == doc[:, :-1]
        k, _ = self._keys(x, None, segment_ids)
        u = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(self.dtype))
        # A document's last pair is never read by it: its look-ahead may be anything (0 here).
        u_next = jnp.concatenate([jnp.where(same_next[:, :, None, None], u[:, 1:], 0.0),
                                  jnp.zeros_like(u[:, :1])], axis=1)
        return self._out(kernel_read(k, k, self._values(u, u_next), visible))

    def _cached(self, x, cache: MosaicCache):
        b, T, _ = x.shape
        kv = cache.kv
        if kv.k.shape[0] != b:
            raise ValueError(f"MemoryMosaic: cache is for batch {kv.k.shape[0]}, x has {b}")
        slots, index = kv.k.shape[1], kv.index
        if T > slots - 1:
            raise ValueError(f"MemoryMosaic: {T} tokens do not fit a cache of max_len="
                             f"{slots - 1}")
        x = x.astype(self.dtype)
        k, key_state = self._keys(x, cache.key_state, None)
        u = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(self.dtype))
        u_all = jnp.concatenate([cache.last_u[:, None].astype(u.dtype), u], axis=1)
        # Values of positions index - 1 ... index + T - 2 (the first: the cached token's, if any).
        v = self._values(u_all[:, :-1], u_all[:, 1:])
        keys = jax.lax.dynamic_update_slice(kv.k, k.astype(kv.k.dtype), (0, index + 1, 0, 0))
        values = jax.lax.dynamic_update_slice(kv.v, v.astype(kv.v.dtype), (0, index, 0, 0))
        k_pos = jnp.arange(slots) - 1
        q_pos = index + jnp.arange(T)
        visible = ((k_pos[None, :] >= 0) & (k_pos[None, :] < q_pos[:, None]))[None]
        y = self._out(kernel_read(k, keys, values, visible))
        # dynamic_update_slice clamps an overflowing write onto the last slots: poison instead.
        y = jnp.where(index + T <= slots - 1, y, jnp.nan)
        return y, MosaicCache(KVCache(keys, values, index + T), key_state,
                              u[:, -1].astype(jnp.float32))
