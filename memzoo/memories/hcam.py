"""Hierarchical Chunk Attention Memory (Lampinen et al., 2021, "Towards mental time travel: a
hierarchical memory for reinforcement learning agents"), the "hcam" mixer.

The past is stored in chunks of `chunk_len` (L) tokens, each with a summary key, the mean of its
keys. A query first attends coarsely over the summaries, keeps the `top_k` most relevant
chunks, then attends in detail within each of them; the detailed reads are weighted by the
chunks' relevance. Per head, with s_c = mean_{j in c} k_j and the chunks C_t visible to t,

    top    = the top_k chunks of C_t by q_t . s_c
    w_c    = softmax_{c in top}(q_t . s_c / sqrt(K))                 (chunk relevance)
    mem_t  = sum_{c in top} w_c sum_{j in c} softmax_{j in c}(q_t . k_j / sqrt(K)) v_j
    loc_t  = sum_{j in chunk(t), j <= t} softmax_j(q_t . k_j / sqrt(K)) v_j   (local window)
    y_t    = W_o (mem_t + loc_t)

Causal: C_t holds only the *completed* chunks before t's own chunk (a chunk's summary needs all
of its tokens), and the current, partial chunk is read by the local softmax attention up to t
itself. A token with no completed chunk yet has mem_t = 0. Chunks are counted from each
document's first token (`segment_ids`), and never cross documents.

Parallel form: the tokens are laid out as [chunks, L] (each document starting a new chunk),
summaries are means over that axis, the top-k chunks are gathered per query and head: memory
O(T top_k L K), no [T, T] scores. Decoding (KVCache of memzoo.attention): keys and values of
every past token in a buffer of `max_len` slots (position p in slot p, chunks on the grid of
L), and the index; the completed chunks' summaries are recomputed from it at each call (its
partial chunk is the last, unfinished row of the grid). The cache, like full attention's, grows
with the sequence: `init_cache(b, max_len=n)`.

`conv_size=W >= 2` adds the short causal depthwise convolution over the q, k, v projections of
memzoo.attention (residual, initialised to 0, per document; the cache carries its last W-1
inputs): a token's key and value then hold its predecessors', the previous-token step of
recall. Without it (or positions) nothing in the layer knows token order inside a chunk: the
local read, the summaries and the detailed reads are all sums over sets of tokens, so a
key -> value binding (NIAH, associative recall) has to come from elsewhere in the model.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from memzoo import layers
from memzoo.attention import KVCache, check_segment_ids, segment_positions, segment_starts
from memzoo.linear_attention.common import check_positive_int, normal_init
from memzoo.registry import register_mixer

DEFAULT_MAX_LEN = 2048


def hcam_read(q, q_chunk, q_offset, q_doc, k, v, filled, chunk_doc, top_k: int):
    """The hierarchical read. q [b, t, H, K]; q_chunk, q_offset, q_doc [b, t] (the query's
    chunk row, offset in it, document); k, v [b, N, L, H, K] (the chunk grid); filled [b, N, L]
    bool; chunk_doc [b, N] (-1: unused row). Returns mem + loc [b, t, H, K], float32 at least."""
    f = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v = q.astype(f), k.astype(f), v.astype(f)
    b, N, L, H, K = k.shape
    scale = K ** -0.5
    rows = jnp.arange(b)[:, None]
    # Local: the query's own chunk, up to itself.
    k_loc, v_loc = k[rows, q_chunk], v[rows, q_chunk]                  # [b, t, L, H, K]
    own = jnp.arange(L)[None, None, :] <= q_offset[..., None]          # [b, t, L]
    s_loc = jnp.einsum("bthk,btlhk->bthl", q, k_loc) * scale
    p_loc = jax.nn.softmax(jnp.where(own[:, :, None], s_loc, -jnp.inf), axis=-1)
    loc = jnp.einsum("bthl,btlhk->bthk", p_loc, v_loc)
    # Memory: completed chunks of the query's document, before its own chunk.
    count = jnp.sum(filled, axis=-1).astype(f)
    summary = jnp.einsum("bnlhk,bnl->bnhk", k, filled.astype(f)) \
        / jnp.maximum(count, 1.0)[:, :, None, None]
    seen = (jnp.arange(N)[None, None, :] < q_chunk[..., None]) \
        & (chunk_doc[:, None, :] == q_doc[..., None])                  # [b, t, N]
    s_chunk = jnp.einsum("bthk,bnhk->bthn", q, summary) * scale
    top, idx = jax.lax.top_k(jnp.where(seen[:, :, None], s_chunk, -jnp.inf), min(top_k, N))
    # Softmax over the valid picks (top_k may exceed the chunks seen). The max is taken over
    # valid picks only, so the largest weighs exp(0) = 1 and the sum is >= 1 wherever one
    # exists: no underflowed denominator whose 1/s^2 gradient overflows to NaN.
    valid = jnp.isfinite(top)
    top = jnp.where(valid, top, 0.0)
    m = jnp.max(jnp.where(valid, top, -jnp.inf), -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(valid, jnp.exp(jnp.where(valid, top, m) - m), 0.0)
    total = jnp.sum(w, -1, keepdims=True)
    w = w / jnp.where(total > 0, total, 1.0)
    heads = jnp.arange(H)[None, None, :, None]
    k_h, v_h = jnp.moveaxis(k, 3, 1), jnp.moveaxis(v, 3, 1)            # [b, H, N, L, K]
    k_top = k_h[rows[:, :, None, None], heads, idx]                    # [b, t, H, top, L, K]
    v_top = v_h[rows[:, :, None, None], heads, idx]
    p_in = jax.nn.softmax(jnp.einsum("bthk,bthjlk->bthjl", q, k_top) * scale, axis=-1)
    mem = jnp.einsum("bthj,bthjl,bthjlk->bthk", w, p_in, v_top)
    return mem + loc


@register_mixer("hcam")
class HCAM(nnx.Module):
    """Hierarchical chunk attention: [b, t, d] -> [b, t, d].

    Options: num_heads, head_dim (default d_model / num_heads), chunk_len (L >= 1), top_k
    (chunks read in detail, >= 1), max_len (default cache length), conv_size (0: none, or
    W >= 2: the short convolution over q, k, v).

    >>> hcam = HCAM(8, num_heads=2, chunk_len=2, rngs=nnx.Rngs(0))
    >>> hcam(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 chunk_len: int = 16, top_k: int = 2, max_len: int = DEFAULT_MAX_LEN,
                 conv_size: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive_int("HCAM", "d_model", d_model)
        check_positive_int("HCAM", "num_heads", num_heads)
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"HCAM: d_model={d_model} is not divisible by `num_heads`="
                                 f"{num_heads}; pass `head_dim`")
            head_dim = d_model // num_heads
        check_positive_int("HCAM", "head_dim", head_dim)
        check_positive_int("HCAM", "chunk_len", chunk_len)
        check_positive_int("HCAM", "top_k", top_k)
        check_positive_int("HCAM", "max_len", max_len)
        if not isinstance(conv_size, int) or conv_size < 0 or conv_size == 1:
            raise ValueError(f"HCAM: `conv_size` must be 0 (none) or an int >= 2, got "
                             f"{conv_size!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.chunk_len, self.top_k, self.max_len, self.dtype = chunk_len, top_k, max_len, dtype
        H, K = num_heads, head_dim
        self.wq = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wk = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wv = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wo = normal_init(rngs, (H, K, d_model), H * K, ("heads", "kv", "embed"))
        self.conv_size = conv_size
        self.conv_weight = None if not conv_size else layers.param(
            jnp.zeros((conv_size, 3 * H * K), jnp.float32), (None, None))

    def _project(self, x, conv_state=None, segment_ids=None):
        """(q, k, v, new conv state or None), the convolution continuing from `conv_state`."""
        x = x.astype(self.dtype)
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
                   for w in (self.wq, self.wk, self.wv))
        if self.conv_weight is None:
            return q, k, v, None
        flat = jnp.concatenate([p.reshape(p.shape[:2] + (-1,)) for p in (q, k, v)], -1)
        mixed, conv_state = pallas_kernels.causal_conv1d(
            flat, self.conv_weight[...].astype(self.dtype), initial_state=conv_state,
            segment_ids=segment_ids)
        heads = q.shape
        q, k, v = (p.reshape(heads) for p in jnp.split(flat + mixed.astype(self.dtype), 3, -1))
        return q, k, v, conv_state

    def _out(self, o):
        return jnp.einsum("bthk,hkd->btd", o.astype(self.dtype), self.wo[...].astype(self.dtype))

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> KVCache:
        """Room for `max_len` tokens (default: the constructor's), on whole chunks."""
        n = max_len or self.max_len
        slots = math.ceil(n / self.chunk_len) * self.chunk_len
        shape = (batch_size, slots, self.num_heads, self.head_dim)
        conv = None if self.conv_weight is None else jnp.zeros(
            (batch_size, self.conv_size - 1, self.conv_weight.shape[1]),
            jnp.promote_types(self.dtype, jnp.float32))
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                       jnp.zeros((), jnp.int32), conv)

    def step(self, x_t, cache: KVCache):
        layers.check_input("HCAM.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        y, cache = self._cached(x_t[:, None], cache)
        return y[:, 0], cache

    def __call__(self, x, cache: KVCache | None = None, *, segment_ids=None):
        """Parallel form, or with `cache` the prefill that continues from it: (y, cache).
        `segment_ids` [b, t] (parallel form only): chunks restart at each document."""
        layers.check_input("HCAM", "x", x, ndim=3, width=self.d_model)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("HCAM: `segment_ids` applies to the parallel form only; a "
                                 "cache holds one document per batch row")
            return self._cached(x, cache)
        b, T, _ = x.shape
        L = self.chunk_len
        if segment_ids is None:
            pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (b, T))
            doc = jnp.zeros((b, T), jnp.int32)
            N = math.ceil(T / L)
        else:
            check_segment_ids("HCAM", segment_ids, (b, T))
            pos = segment_positions(segment_ids)
            doc = jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)
            N = T   # each document starts a chunk: at most one per token
        chunk = jnp.cumsum(pos % L == 0, axis=1, dtype=jnp.int32) - 1   # token 0 starts one
        offset = pos % L
        q, k, v, _ = self._project(x, segment_ids=segment_ids)
        rows = jnp.arange(b)[:, None]
        grid = lambda a: jnp.zeros((b, N, L) + a.shape[2:], a.dtype).at[rows, chunk, offset].set(a)
        filled = jnp.zeros((b, N, L), bool).at[rows, chunk, offset].set(True)
        chunk_doc = jnp.full((b, N), -1, jnp.int32).at[rows, chunk].set(doc)
        o = hcam_read(q, chunk, offset, doc, grid(k), grid(v), filled, chunk_doc, self.top_k)
        return self._out(o)

    def _cached(self, x, cache: KVCache):
        b, T, _ = x.shape
        if cache.k.shape[0] != b:
            raise ValueError(f"HCAM: cache is for batch {cache.k.shape[0]}, x has {b}")
        L, slots, index = self.chunk_len, cache.k.shape[1], cache.index
        if T > slots:
            raise ValueError(f"HCAM: {T} tokens do not fit a cache of max_len={slots}")
        if (cache.conv is None) != (self.conv_weight is None):
            raise ValueError("HCAM: the cache's conv state does not match conv_size="
                             f"{self.conv_size}; make it with this layer's init_cache")
        q, k, v, conv = self._project(x, cache.conv)
        keys = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, index, 0, 0))
        values = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, index, 0, 0))
        N = slots // L
        q_pos = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32)[None], (b, T))
        filled = jnp.broadcast_to((jnp.arange(slots) < index + T).reshape(1, N, L), (b, N, L))
        grid = lambda a: a.reshape((b, N, L) + a.shape[2:])
        zeros = jnp.zeros((b, T), jnp.int32)
        o = hcam_read(q, q_pos // L, q_pos % L, zeros, grid(keys), grid(values), filled,
                      jnp.zeros((b, N), jnp.int32), self.top_k)
        # dynamic_update_slice clamps an overflowing write onto the last slots: poison instead.
        y = jnp.where(index + T <= slots, self._out(o), jnp.nan)
        return y, KVCache(keys, values, index + T, conv)
