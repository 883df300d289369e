"""Causal softmax attention, the "attention" mixer: multi-head, grouped-query (GQA), optional
sliding window, rotary position embeddings (RoPE).

The parallel form runs `pallas_kernels.flash_attention` (`implementation=`, "auto" by default):
splash attention on TPU and Pallas' Triton flash attention on GPU, which never hold the [T, T]
scores, and `jax.nn.dot_product_attention` on XLA elsewhere. The cached form (prefill after a
cache, decoding) calls `jax.nn.dot_product_attention` with a mask built from absolute positions:
its queries sit after the cached keys, which the ops' causal masks (query 0 aligned with key 0)
do not express.

`rope_fraction=f` rotates only the first f * head_dim dimensions of each head (recurrentgemma's
local attention rotates half), leaving the rest position-free; `out_bias=True` adds a bias to
the output projection (recurrentgemma's proj_final has one).

`conv_size=W > 0` adds a short causal depthwise convolution over the q, k, v projections (before
RoPE), residually: p_t + sum_i w_i p_{t-i}, with w initialised to 0 so the layer starts as plain
attention. It hands each token its predecessors' projections, the previous-token step of the
induction circuit that recall needs (the short convolutions of H3 / Based, the "canon layers" of
Physics of Language Models 4.1), which plain attention has to learn through its positions.

Decoding state (`KVCache`): keys and values after RoPE, and `index`, the number of tokens seen;
with a convolution also `conv`, its last W-1 inputs.
  full attention   a buffer of `max_len` slots; position p lives in slot p.
  window W         a ring of W slots; position p lives in slot p % W, so the cache never grows
                   and decoding has no length limit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

import pallas_kernels
from memzoo import layers
from pallas_kernels._dispatch import check_implementation
from memzoo.registry import register_mixer

DEFAULT_MAX_LEN = 2048


@struct.dataclass
class KVCache:
    """k, v: [b, slots, kv_heads, head_dim] in the compute dtype; index: int32 scalar (tokens
    already in the cache, the absolute position of the next token)."""
    k: jax.Array
    v: jax.Array
    index: jax.Array
    conv: jax.Array | None = None   # conv_size > 0: [b, conv_size - 1, (heads + 2 kv_heads) k]


def segment_starts(segment_ids: jax.Array, previous: jax.Array | None = None) -> jax.Array:
    """[b, t] int -> [b, t] bool: token t begins a new segment, its id differing from the token
    before it. Token 0 compares with `previous` [b] (the id of the token before this call, as a
    cache holds it); without `previous` it continues whatever came before (never a start)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = (jnp.zeros_like(segment_ids[:, :1], dtype=bool) if previous is None
             else (segment_ids[:, :1] != jnp.asarray(previous)[:, None]))
    return jnp.concatenate([first, change], axis=1)


def segment_positions(segment_ids: jax.Array, offset: jax.Array | None = None,
                      previous: jax.Array | None = None) -> jax.Array:
    """Position of each token within its segment: [b, t] int -> [b, t] int32, 0 at each start.

    A packed document then gets the rotary phases it would get alone. The first segment
    continues from `offset` [b] (a cache's position in its document; default 0) unless token 0
    starts a new segment (`previous`, see segment_starts).
    """
    T = segment_ids.shape[1]
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], segment_ids.shape)
    last = jax.lax.cummax(jnp.where(segment_starts(segment_ids, previous), t, -1), axis=1)
    first = t if offset is None else t + jnp.asarray(offset, jnp.int32)[:, None]
    return jnp.where(last >= 0, t - last, first)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate pairs (x_i, x_{i+k/2}) by positions * base^(-2i/k); x [b, t, h, k], positions
    [b, t]. Angles and rotation in float32: bfloat16 phases drift visibly past a few hundred."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, :, None, None] * freq[None, None, None, :]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@register_mixer("attention")
class Attention(nnx.Module):
    """Causal multi-head softmax attention: [b, t, d] -> [b, t, d].

    num_kv_heads < num_heads shares each key/value head among num_heads / num_kv_heads query
    heads (GQA; 1 is multi-query). `window=W` lets each token see itself and the W - 1 before it.
    `max_len` is the default length of a full-attention cache (`init_cache`). `implementation`:
    the parallel form's pallas_kernels.flash_attention ("auto" | "pallas" | "xla" | "reference").

    >>> attn = Attention(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> attn(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 num_kv_heads: int | None = None, window: int | None = None, rope: bool = True,
                 rope_base: float = 10_000.0, max_len: int = DEFAULT_MAX_LEN, conv_size: int = 0,
                 rope_fraction: float = 1.0, out_bias: bool = False,
                 implementation: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"Attention: d_model={d_model} is not divisible by "
                                 f"num_heads={num_heads}; pass head_dim")
            head_dim = d_model // num_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads={num_heads} must be a positive multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if isinstance(rope_fraction, bool) or not isinstance(rope_fraction, (int, float)) \
                or not 0 < rope_fraction <= 1:
            raise ValueError(f"Attention: rope_fraction must be in (0, 1], got {rope_fraction!r}")
        rope_dims = round(head_dim * rope_fraction)
        if rope and (rope_dims % 2 or abs(rope_dims - head_dim * rope_fraction) > 1e-9):
            raise ValueError(f"Attention: rope needs an even number of rotated dimensions, got "
                             f"head_dim={head_dim} * rope_fraction={rope_fraction}")
        if window is not None and window < 1:
            raise ValueError(f"Attention: window must be a positive int or None, got {window}")
        if max_len < 1:
            raise ValueError(f"Attention: max_len must be positive, got {max_len}")
        if not isinstance(conv_size, int) or conv_size < 0 or conv_size == 1:
            raise ValueError(f"Attention: conv_size must be 0 (none) or an int >= 2, got "
                             f"{conv_size!r}")
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim, self.window, self.use_rope, self.rope_base = head_dim, window, rope, rope_base
        self.rope_dims = rope_dims
        self.max_len, self.dtype = max_len, dtype
        check_implementation(implementation, "Attention")
        self.implementation = implementation

        def init(shape, fan_in, axes):
            return layers.param(jax.random.normal(rngs.params(), shape, jnp.float32)
                                * fan_in ** -0.5, axes)

        self.wq = init((d_model, num_heads, head_dim), d_model, ("embed", "heads", "kv"))
        self.wk = init((d_model, num_kv_heads, head_dim), d_model, ("embed", "kv_heads", "kv"))
        self.wv = init((d_model, num_kv_heads, head_dim), d_model, ("embed", "kv_heads", "kv"))
        self.wo = init((num_heads, head_dim, d_model), num_heads * head_dim,
                       ("heads", "kv", "embed"))
        self.out_bias = (layers.param(jnp.zeros((d_model,), jnp.float32), ("embed",))
                         if out_bias else None)
        self.conv_size = conv_size
        self.conv_weight = None if not conv_size else layers.param(
            jnp.zeros((conv_size, (num_heads + 2 * num_kv_heads) * head_dim), jnp.float32),
            (None, None))

    def _project(self, x, positions):
        """(q, k, v) of a fresh sequence (the Titans mixers build on this)."""
        return self._project_conv(x, positions)[:3]

    def _project_conv(self, x, positions, conv_state=None, segment_ids=None):
        """(q, k, v, new conv state or None), the convolution continuing from `conv_state`."""
        x = x.astype(self.dtype)
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
                   for w in (self.wq, self.wk, self.wv))
        new_state = None
        if self.conv_weight is not None:
            b, T = x.shape[:2]
            flat = jnp.concatenate([p.reshape(b, T, -1) for p in (q, k, v)], axis=-1)
            mixed, new_state = pallas_kernels.causal_conv1d(
                flat, self.conv_weight[...].astype(self.dtype), initial_state=conv_state,
                segment_ids=segment_ids)
            flat = flat + mixed.astype(self.dtype)
            nq, nk = q.shape[2] * q.shape[3], k.shape[2] * k.shape[3]
            q = flat[..., :nq].reshape(q.shape)
            k = flat[..., nq:nq + nk].reshape(k.shape)
            v = flat[..., nq + nk:].reshape(v.shape)
        if self.use_rope:
            q, k = self._rope(q, positions), self._rope(k, positions)
        return q, k, v, new_state

    def _rope(self, x, positions):
        r = self.rope_dims
        if r == x.shape[-1]:
            return rope(x, positions, self.rope_base)
        return jnp.concatenate([rope(x[..., :r], positions, self.rope_base), x[..., r:]], axis=-1)

    def _out(self, o):
        y = jnp.einsum("bthk,hkd->btd", o.astype(self.dtype), self.wo[...].astype(self.dtype))
        if self.out_bias is not None:
            y = y + self.out_bias[...].astype(self.dtype)[None, None]
        return y

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> KVCache:
        """An empty cache. Full attention holds `max_len` tokens (default: the constructor's);
        a windowed one is a ring of `window` slots whatever `max_len` says."""
        slots = self.window if self.window is not None else (max_len or self.max_len)
        shape = (batch_size, slots, self.num_kv_heads, self.head_dim)
        conv = None if self.conv_weight is None else jnp.zeros(
            (batch_size, self.conv_size - 1, self.conv_weight.shape[1]),
            jnp.promote_types(self.dtype, jnp.float32))
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                       jnp.zeros((), jnp.int32), conv)

    def step(self, x_t, cache: KVCache):
        layers.check_input("Attention.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        y, cache = self._cached(x_t[:, None], cache)
        return y[:, 0], cache

    def __call__(self, x, cache: KVCache | None = None, *, segment_ids=None):
        """Parallel form, or with `cache` the prefill that continues from it: (y, cache).

        `segment_ids` [b, t] int: tokens attend only within their own segment (packed
        documents), and rotary positions restart at each segment. Parallel form only: a cache
        holds one document per row.
        """
        layers.check_input("Attention", "x", x, ndim=3, width=self.d_model)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("Attention: `segment_ids` applies to the parallel form only; "
                                 "a cache holds one document per batch row")
            return self._cached(x, cache)
        b, T, _ = x.shape
        if segment_ids is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (b, T))
        else:
            check_segment_ids("Attention", segment_ids, (b, T))
            positions = segment_positions(segment_ids)
        q, k, v, _ = self._project_conv(x, positions, segment_ids=segment_ids)
        # The op joins equal ids; documents are counted by their starts, so an id that comes
        # back after another (1, 2, 1) is a new document, as for every mixer.
        docs = None if segment_ids is None else jnp.cumsum(segment_starts(segment_ids), axis=1,
                                                           dtype=jnp.int32)
        o = pallas_kernels.flash_attention(q, k, v, segment_ids=docs, window=self.window,
                                           implementation=self.implementation)
        return self._out(o)

    def _cached(self, x, cache: KVCache):
        b, T, _ = x.shape
        if cache.k.shape[0] != b:
            raise ValueError(f"Attention: cache is for batch {cache.k.shape[0]}, x has {b}")
        index = cache.index
        q_pos = index + jnp.arange(T, dtype=jnp.int32)
        if (cache.conv is None) != (self.conv_weight is None):
            raise ValueError("Attention: the cache's conv state does not match conv_size="
                             f"{self.conv_size}; make it with this layer's init_cache")
        q, k, v, conv = self._project_conv(x, jnp.broadcast_to(q_pos[None], (b, T)), cache.conv)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        slots = cache.k.shape[1]
        if self.window is None:
            if T > slots:
                raise ValueError(f"Attention: {T} tokens do not fit a cache of max_len={slots}")
            keys = jax.lax.dynamic_update_slice(cache.k, k, (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(cache.v, v, (0, index, 0, 0))
            k_pos = jnp.arange(slots, dtype=jnp.int32)
            new_k, new_v = keys, values
        else:
            # Attend over [old ring, new keys]: a prefill longer than the window still sees the
            # ring's keys for its first queries, which writing the ring first would overwrite.
            W = slots
            s = jnp.arange(W, dtype=jnp.int32)
            ring_pos = index - W + jnp.mod(s - index, W)  # in [index - W, index); < 0: empty
            keys = jnp.concatenate([cache.k, k], axis=1)
            values = jnp.concatenate([cache.v, v], axis=1)
            k_pos = jnp.concatenate([ring_pos, q_pos])
            m = min(T, W)  # only the last W new keys survive; m distinct slots, no write races
            write = jnp.mod(index + T - m + jnp.arange(m, dtype=jnp.int32), W)
            new_k = cache.k.at[:, write].set(k[:, T - m:])
            new_v = cache.v.at[:, write].set(v[:, T - m:])
        visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
        if self.window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - self.window
        o = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                         mask=visible[None, None])
        y = self._out(o)
        if self.window is None:
            # dynamic_update_slice clamps out-of-range writes, which would silently overwrite
            # the last keys; poison instead so an overflow cannot pass for a result.
            y = jnp.where(index + T <= slots, y, jnp.nan)
        return y, KVCache(new_k, new_v, index + T, conv)


def check_segment_ids(owner: str, segment_ids, shape) -> None:
    if not hasattr(segment_ids, "dtype") or not jnp.issubdtype(segment_ids.dtype, jnp.integer) \
            or tuple(segment_ids.shape) != tuple(shape):
        raise ValueError(f"{owner}: `segment_ids` must be an integer array [batch, time] = "
                         f"{tuple(shape)}, got {getattr(segment_ids, 'dtype', type(segment_ids).__name__)} "
                         f"{tuple(getattr(segment_ids, 'shape', ()))}")

