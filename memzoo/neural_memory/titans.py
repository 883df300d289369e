"""Titans' three architectures (Behrouz et al., 2024, Sec. 4) as mixers, each built from one
`NeuralMemory` and one attention (`memzoo.attention.Attention`'s projections and its ring
`KVCache`), with learned persistent memory tokens that every query can attend to.

  "titans_mac"  Memory as Context. The sequence is cut into segments of `segment_len` tokens
                (the memory's chunk). A token attends, causally within its segment, over
                [persistent tokens; h; the segment], where h_j = M_{segment start}(q_j) is the
                memory read at the weights the segment started with (core: y_anchor), so the
                context holds what the memory knew before the segment. The memory is written with
                the segment's tokens; the output is attention + the memory read after the write.
  "titans_mag"  Memory as a Gate. Sliding-window attention (window W, plus the persistent tokens)
                beside the neural memory, mixed per channel by a data-dependent gate:
                y = g * attn(x) + (1 - g) * memory(x), g = sigmoid(x W_g).
  "titans_mal"  Memory as a Layer: y = attn(memory(x)), the window attention reading the memory's
                output.

MAC has two forms (`form=`). "additive" (the default) writes the memory with the segment's inputs
and adds its read: o = attn + M(x); this keeps memory and attention independent within a segment,
one memory pass per call, chunk-parallel. "paper" is Titans' eq. 21-25 as written:

    h_t = M*_{t-1}(q_t)                          the chunk-start read (as above)
    y_t = Attn([persistent; h; segment])_t       M_t = M_{t-1}(y_t): written with y, not x
    o_t = y_t (x) M*_t(y_t)                      the attention output gated by the memory's read

where the write of a segment needs its attention output, which needs the memory the previous
segments wrote: the form is sequential, run as a scan of the decoding step over tokens (the same
step as decoding, so parallel == decoding by construction; O(t) sequential steps, two memory
passes per token). Persistent tokens: every variant (MAC, MAG, MAL) has `num_persistent` of them. Persistent tokens enter the
attention as extra keys/values (projected by the attention's own W_k, W_v, no rotary phase), not as
a prefix of the sequence the memory also reads.

Memory: every attention here is local (MAG/MAL a window of W, MAC a segment of S consecutive
positions), so the parallel forms attend block by block, each block of queries over its own and
the previous block's keys plus the persistent ones: O(t W) scores, never [t, t] (`_local_attend`).

Decoding: the memory's `NeuralMemoryCache` plus, for MAG/MAL, the attention's ring of W slots; for
MAC a buffer of the current segment's keys and values (x and h), reused when a segment starts (slots
after the current position are masked). All three are parallel == prefill-then-decode (tested).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from memzoo import layers
from memzoo.attention import (Attention, KVCache, check_segment_ids, segment_positions,
                              segment_starts)
from memzoo.linear_attention.common import check_positive_int
from memzoo.neural_memory.memory import NeuralMemory, NeuralMemoryCache, with_memory_keywords
from memzoo.registry import register_mixer

MAC_FORMS = ("additive", "paper")
MEMORY_OPTIONS = ("memory_layers", "memory_expansion", "conv_size", "attentional_bias",
                  "retention", "learning_rule", "p", "huber_delta", "q", "kl_scale", "activation",
                  "max_lr", "max_grad_norm", "remat", "implementation")


@struct.dataclass
class TitansCache:
    """memory: NeuralMemoryCache; attn: KVCache (MAG/MAL: ring of `window` slots; MAC: the
    segment's keys/values, 2 x segment_len slots: x tokens then h tokens)."""
    memory: NeuralMemoryCache
    attn: KVCache
    # MAC form="paper": the memory's conv window over the inputs x its reads h see (its own
    # window, `memory.conv`, runs over the attention outputs y it is written with).
    read_conv: jax.Array | None = None


class _TitansBase(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, memory_heads: int | None,
                 window: int, num_persistent: int, chunk_size: int, rope: bool,
                 memory_options: dict, dtype, rngs: nnx.Rngs, delta_ok: bool = True):
        owner = type(self).__name__
        check_positive_int(owner, "window", window)
        check_positive_int(owner, "num_persistent", num_persistent, minimum=0)
        unknown = sorted(set(memory_options) - set(MEMORY_OPTIONS))
        if unknown:
            raise ValueError(f"{owner}: unknown options {unknown}; memory options are "
                             f"{MEMORY_OPTIONS}")
        self.d_model, self.window, self.num_persistent, self.dtype = d_model, window, \
            num_persistent, dtype
        self.attn = Attention(d_model, num_heads=num_heads, window=window, rope=rope,
                              dtype=dtype, rngs=rngs)
        self.memory = NeuralMemory(d_model, num_heads=memory_heads or num_heads,
                                   chunk_size=chunk_size, use_delta_rule=delta_ok, dtype=dtype,
                                   rngs=rngs, **memory_options)
        self.persistent = (layers.param(jax.random.normal(rngs.params(), (num_persistent, d_model),
                                                          jnp.float32) * d_model ** -0.5,
                                        (None, "embed")) if num_persistent else None)

    # ---- attention with persistent keys -------------------------------------------------------
    def _persistent_kv(self, b):
        if self.persistent is None:
            return None
        p = self.persistent[...].astype(self.dtype)[None]
        a = self.attn
        k, v = (jnp.einsum("btd,dhk->bthk", p, w[...].astype(self.dtype)) for w in (a.wk, a.wv))
        return jnp.broadcast_to(k, (b, *k.shape[1:])), jnp.broadcast_to(v, (b, *v.shape[1:]))

    def _local_attend(self, q, kvs, span: int, labels):
        """The parallel forms' attention (before the output projection) without [t, t]
        scores: query i sees key j of each
        (k, v) pair in `kvs` (all at the query positions) when i - span < j <= i and every
        `labels` array ([b, t] int) agrees at i and j, plus the persistent keys always.

        Such keys lie in the query's block of `span` positions or the one before, so each block
        of queries attends over 2 x span keys per pair (+ the persistent ones): O(t span)
        memory instead of O(t^2), the same softmax (rounding aside) as the dense mask.
        """
        b, T, H, d = q.shape
        n = -(-T // span)
        pad = n * span - T

        def blocks(x):                  # [b, T, ...] -> [b * n, span, ...]
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            return x.reshape(b * n, span, *x.shape[2:])

        def with_previous(x):           # [b, T, ...] -> [b * n, 2 span, ...]: block i-1, block i
            x = blocks(x).reshape(b, n, span, *x.shape[2:])
            prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
            both = jnp.concatenate([prev, x], axis=2)
            return both.reshape(b * n, 2 * span, *x.shape[3:])

        q_pos = jnp.arange(n * span, dtype=jnp.int32).reshape(n, span)
        k_pos = q_pos[:, :1] + jnp.arange(-span, span, dtype=jnp.int32)[None]     # [n, 2 span]
        ok = ((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
              & (k_pos[:, None, :] > q_pos[:, :, None] - span))[None]
        for label in labels:
            ql, kl = blocks(label).reshape(b, n, span), with_previous(label).reshape(b, n, -1)
            ok = ok & (ql[..., :, None] == kl[..., None, :])
        ok = ok.reshape(b * n, span, 2 * span)
        keys = jnp.concatenate([with_previous(k) for k, _ in kvs], axis=1)
        values = jnp.concatenate([with_previous(v) for _, v in kvs], axis=1)
        visible = jnp.concatenate([ok] * len(kvs), axis=-1)
        pkv = self._persistent_kv(b)
        if pkv is not None:
            P = self.num_persistent
            keys = jnp.concatenate([jnp.repeat(pkv[0], n, axis=0).astype(keys.dtype), keys], 1)
            values = jnp.concatenate([jnp.repeat(pkv[1], n, axis=0).astype(values.dtype),
                                      values], 1)
            visible = jnp.concatenate([jnp.ones((b * n, span, P), bool), visible], -1)
        o = jax.nn.dot_product_attention(blocks(q), keys.astype(q.dtype),
                                         values.astype(q.dtype), mask=visible[:, None])
        return o.reshape(b, n * span, H, d)[:, :T]

    def _attend(self, q, keys, values, visible):
        """Softmax attention of q [b, t, H, k] over [persistent; keys] with mask `visible`
        [t, s] or [b, t, s] for `keys` (persistent keys are always visible, to every document)."""
        b, T = q.shape[:2]
        visible = jnp.broadcast_to(visible, (b, T, visible.shape[-1]))
        pkv = self._persistent_kv(b)
        if pkv is not None:
            keys = jnp.concatenate([pkv[0].astype(keys.dtype), keys], axis=1)
            values = jnp.concatenate([pkv[1].astype(values.dtype), values], axis=1)
            visible = jnp.concatenate([jnp.ones((b, T, self.num_persistent), bool), visible], 2)
        o = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                         mask=visible[:, None])
        return self.attn._out(o)

    @staticmethod
    def _documents(b, T, memory_cache, segment_ids):
        """(doc_pos, doc), both [b, t] int32: each token's position in its document (rotary
        phases, MAC's segments) and which document it is in, counted from 0 (the document the
        memory's cache holds, or the first)."""
        t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (b, T))
        offset = None if memory_cache is None else memory_cache.position
        if segment_ids is None:
            return (t if offset is None else t + offset[:, None]), jnp.zeros((b, T), jnp.int32)
        previous = None if memory_cache is None else memory_cache.segment
        doc = jnp.cumsum(segment_starts(segment_ids, previous), axis=1, dtype=jnp.int32)
        return segment_positions(segment_ids, offset, previous), doc

    def _window_parallel(self, x, segment_ids=None):
        b, T, _ = x.shape
        doc_pos, doc = self._documents(b, T, None, segment_ids)
        q, k, v = self.attn._project(x, doc_pos)
        return self.attn._out(self._local_attend(q, [(k, v)], self.window, [doc]))

    def _window_cached(self, x, cache: KVCache, memory_cache, segment_ids=None):
        """The ring-cache form of the window attention (memzoo.attention's slot layout: stream
        position p in slot p % W), with the persistent keys in front. Each row sees only keys
        from its query's document, which began at stream position q_pos - doc_pos."""
        b, T, _ = x.shape
        index, W = cache.index, cache.k.shape[1]
        q_pos = index + jnp.arange(T, dtype=jnp.int32)
        doc_pos, _ = self._documents(b, T, memory_cache, segment_ids)
        q, k, v = self.attn._project(x, doc_pos)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        s = jnp.arange(W, dtype=jnp.int32)
        ring_pos = index - W + jnp.mod(s - index, W)
        keys = jnp.concatenate([cache.k, k], axis=1)
        values = jnp.concatenate([cache.v, v], axis=1)
        k_pos = jnp.concatenate([ring_pos, q_pos])
        m = min(T, W)
        write = jnp.mod(index + T - m + jnp.arange(m, dtype=jnp.int32), W)
        new = KVCache(cache.k.at[:, write].set(k[:, T - m:]),
                      cache.v.at[:, write].set(v[:, T - m:]), index + T)
        visible = ((k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
                   & (k_pos[None, :] > q_pos[:, None] - self.window))
        doc_start = q_pos[None] - doc_pos
        visible = visible[None] & (k_pos[None, None, :] >= doc_start[:, :, None])
        return self._attend(q, keys, values, visible), new

    # ---- protocol ----------------------------------------------------------------------------
    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> TitansCache:
        del max_len  # nothing grows with the sequence
        return TitansCache(self.memory.init_cache(batch_size), self.attn.init_cache(batch_size))

    def step(self, x_t, cache: TitansCache, *, segment_ids=None):
        """One token; `segment_ids` [b] int: its document, a new one where it differs from the
        cache's (memory and attention start afresh; the persistent tokens stay)."""
        owner = f"{type(self).__name__}.step"
        layers.check_input(owner, "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        if segment_ids is not None:
            check_segment_ids(owner, segment_ids, x_t.shape[:1])
            segment_ids = segment_ids[:, None]
        y, cache = self._forward(x_t[:, None], cache, decode=True, segment_ids=segment_ids)
        return y[:, 0], cache

    def __call__(self, x, cache: TitansCache | None = None, *, segment_ids=None):
        """Parallel form, or with `cache` the prefill that continues from it. `segment_ids`
        [b, t] int: packed documents; nothing but the persistent tokens crosses a change of id."""
        owner = type(self).__name__
        layers.check_input(owner, "x", x, ndim=3, width=self.d_model)
        if cache is not None and not isinstance(cache, TitansCache):
            raise ValueError(f"{owner}: `cache` must be a TitansCache (from "
                             f"init_cache), got {type(cache).__name__}")
        if segment_ids is not None:
            check_segment_ids(owner, segment_ids, x.shape[:2])
        y, new = self._forward(x, cache, segment_ids=segment_ids)
        return y if cache is None else (y, new)


@register_mixer("titans_mag")
class TitansMAG(_TitansBase):
    """Memory as a Gate: [b, t, d] -> [b, t, d] (module docstring).

    >>> mag = TitansMAG(8, num_heads=2, window=4, rngs=nnx.Rngs(0))
    >>> mag(jnp.ones((1, 6, 8))).shape
    (1, 6, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, memory_heads: int | None = None,
                 window: int = 64, num_persistent: int = 4, chunk_size: int = 16,
                 rope: bool = True, dtype=jnp.float32, rngs: nnx.Rngs, **memory_options):
        super().__init__(d_model, num_heads=num_heads, memory_heads=memory_heads, window=window,
                         num_persistent=num_persistent, chunk_size=chunk_size, rope=rope,
                         memory_options=memory_options, dtype=dtype, rngs=rngs)
        self.gate = layers.Linear(d_model, d_model, axes=("embed", "embed"), dtype=dtype,
                                  rngs=rngs)

    def _forward(self, x, cache, decode: bool = False, segment_ids=None):
        if cache is None:
            a, m = self._window_parallel(x, segment_ids), self.memory(x, segment_ids=segment_ids)
            new = None
        else:
            a, attn = self._window_cached(x, cache.attn, cache.memory, segment_ids)
            m, _, mem = self.memory.forward(x, cache.memory, decode=decode,
                                            segment_ids=segment_ids)
            new = TitansCache(mem, attn)
        g = jax.nn.sigmoid(self.gate(x.astype(self.dtype)))
        return g * a + (1.0 - g) * m, new


@register_mixer("titans_mal")
class TitansMAL(_TitansBase):
    """Memory as a Layer: [b, t, d] -> [b, t, d] (module docstring).

    >>> mal = TitansMAL(8, num_heads=2, window=4, rngs=nnx.Rngs(0))
    >>> mal(jnp.ones((1, 6, 8))).shape
    (1, 6, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, memory_heads: int | None = None,
                 window: int = 64, num_persistent: int = 4, chunk_size: int = 16,
                 rope: bool = True, dtype=jnp.float32, rngs: nnx.Rngs, **memory_options):
        super().__init__(d_model, num_heads=num_heads, memory_heads=memory_heads, window=window,
                         num_persistent=num_persistent, chunk_size=chunk_size, rope=rope,
                         memory_options=memory_options, dtype=dtype, rngs=rngs)

    def _forward(self, x, cache, decode: bool = False, segment_ids=None):
        if cache is None:
            return self._window_parallel(self.memory(x, segment_ids=segment_ids),
                                         segment_ids), None
        m, _, mem = self.memory.forward(x, cache.memory, decode=decode, segment_ids=segment_ids)
        a, attn = self._window_cached(m, cache.attn, cache.memory, segment_ids)
        return a, TitansCache(mem, attn)


@register_mixer("titans_mac")
class TitansMAC(_TitansBase):
    """Memory as Context: [b, t, d] -> [b, t, d] (module docstring). `segment_len` is the
    attention segment and the memory's chunk; `form` "additive" | "paper" (module docstring).

    >>> mac = TitansMAC(8, num_heads=2, segment_len=4, rngs=nnx.Rngs(0))
    >>> mac(jnp.ones((1, 6, 8))).shape
    (1, 6, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, memory_heads: int | None = None,
                 segment_len: int = 32, num_persistent: int = 4, rope: bool = True,
                 form: str = "additive", dtype=jnp.float32, rngs: nnx.Rngs,
                 **memory_options):
        check_positive_int("TitansMAC", "segment_len", segment_len)
        if form not in MAC_FORMS:
            raise ValueError(f"TitansMAC: `form` must be one of {MAC_FORMS}, got {form!r}")
        self.form = form
        # The context needs the chunk-start reads, which the delta-rule path does not produce.
        super().__init__(d_model, num_heads=num_heads, memory_heads=memory_heads,
                         window=segment_len, num_persistent=num_persistent,
                         chunk_size=segment_len, rope=rope, memory_options=memory_options,
                         dtype=dtype, rngs=rngs, delta_ok=False)
        self.segment_len = segment_len

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> TitansCache:
        del max_len
        a = self.attn
        shape = (batch_size, 2 * self.segment_len, a.num_kv_heads, a.head_dim)
        memory = self.memory.init_cache(batch_size)
        return TitansCache(memory,
                           KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                                   jnp.zeros((), jnp.int32)),
                           memory.conv if self.form == "paper" else None)

    def _segment_kv(self, x, h, positions):
        """Keys/values of the segment tokens and of the memory reads h (same positions [b, t])."""
        q, kx, vx = self.attn._project(x, positions)
        _, kh, vh = self.attn._project(h, positions)
        return q, kx, vx, kh, vh

    def _forward(self, x, cache, decode: bool = False, segment_ids=None):
        if self.form == "paper":
            return self._paper_forward(x, cache, segment_ids)
        b, T, _ = x.shape
        S = self.segment_len
        memory_cache = None if cache is None else cache.memory
        # Segments are counted within each document (from its first token), like the memory's
        # chunks, so a packed document is cut where it would be cut alone.
        doc_pos, doc = self._documents(b, T, memory_cache, segment_ids)
        m, h, mem = self.memory.forward(x, memory_cache, decode=decode, segment_ids=segment_ids)
        if cache is None:
            q, kx, vx, kh, vh = self._segment_kv(x, h, doc_pos)
            # a segment's tokens are S consecutive positions: a window of S with equal labels
            o = self._local_attend(q, [(kh, vh), (kx, vx)], S, [doc, doc_pos // S])
            return self.attn._out(o) + m, None
        a, kv = self._cached_attention(x, h, cache, doc_pos, doc)
        return a + m, TitansCache(mem, kv)

    def _paper_forward(self, x, cache, segment_ids):
        """form="paper": the decoding step scanned over the tokens (module docstring)."""
        b = x.shape[0]
        carry = self.init_cache(b) if cache is None else cache

        def step(c, inputs):
            xt, ids = inputs
            xt, ids = xt[:, None], (None if ids is None else ids[:, None])
            doc_pos, doc = self._documents(b, 1, c.memory, ids)
            # the read of x (through x's own conv window), then the write with y
            _, h, read = self.memory.forward(xt, c.memory.replace(conv=c.read_conv),
                                             decode=True, segment_ids=ids)
            y, kv = self._cached_attention(xt, h, c, doc_pos, doc)
            m, _, mem = self.memory.forward(y, c.memory, decode=True, segment_ids=ids)
            return TitansCache(mem, kv, read.conv), (y * m)[:, 0]

        ids = None if segment_ids is None else jnp.swapaxes(segment_ids, 0, 1)
        carry, ys = jax.lax.scan(step, carry, (jnp.swapaxes(x, 0, 1), ids))
        return jnp.swapaxes(ys, 0, 1), (None if cache is None else carry)

    def _cached_attention(self, x, h, cache, doc_pos, doc):
        """The cached form's segment attention (with the output projection) and the segment's
        new key/value buffer."""
        b, T, _ = x.shape
        S = self.segment_len
        memory_cache = cache.memory
        q, kx, vx, kh, vh = self._segment_kv(x, h, doc_pos)
        seg = doc_pos // S
        t = jnp.arange(T, dtype=jnp.int32)
        new_ok = ((doc[:, None, :] == doc[:, :, None]) & (seg[:, None, :] == seg[:, :, None])
                  & (t[None, :] <= t[:, None])[None])
        # Cached: slots [0, S) hold the current segment's x keys, [S, 2S) its h keys, by
        # position % S in the row's document; the cache's document had written `position` % S
        # of them. Attend over [old buffer; new keys].
        buf = cache.attn
        position = memory_cache.position
        slot = jnp.arange(S, dtype=jnp.int32)
        old_ok = (((doc == 0) & (seg == (position // S)[:, None]))[:, :, None]
                  & (slot[None, None, :] < (position % S)[:, None, None]))
        keys = jnp.concatenate([buf.k[:, S:], kh, buf.k[:, :S], kx], 1)
        values = jnp.concatenate([buf.v[:, S:], vh, buf.v[:, :S], vx], 1)
        a = self._attend(q, keys, values, jnp.concatenate([old_ok, new_ok, old_ok, new_ok], -1))
        # Keep the keys of the last token's segment, each at its slot (one token per slot:
        # tokens of other segments or documents could share slots, so they are not written).
        final = (doc == doc[:, -1:]) & (seg == seg[:, -1:])
        onehot = final[:, :, None] & ((doc_pos % S)[:, :, None] == slot[None, None, :])
        written = jnp.any(onehot, axis=1)[:, :, None, None]
        source = jnp.argmax(onehot, axis=1)[:, :, None, None]            # [b, S]: its token

        def keep(old, new):
            picked = jnp.take_along_axis(new, source, axis=1)   # a gather: exact, any precision
            return jnp.where(written, picked.astype(old.dtype), old)

        kb = jnp.concatenate([keep(buf.k[:, :S], kx), keep(buf.k[:, S:], kh)], 1)
        vb = jnp.concatenate([keep(buf.v[:, :S], vx), keep(buf.v[:, S:], vh)], 1)
        return a, KVCache(kb, vb, buf.index + T)


# Name the memory's keywords in the constructors' signatures (see with_memory_keywords).
for _cls in (TitansMAG, TitansMAL, TitansMAC):
    with_memory_keywords(_cls.__init__, exclude=("use_delta_rule", "chunk_size", "head_dim",
                                                 "num_heads"))
