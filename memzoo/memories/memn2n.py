"""End-to-End Memory Networks (Sukhbaatar, Szlam, Weston and Fergus, 2015, "End-To-End Memory
Networks"), the "memn2n" mixer.

The paper's memory holds sentences, each a bag of words with position encoding (PE): with
embedding matrices A^k, C^k per hop k and words x_i1 ... x_iJ of sentence i,

    m_i^k = sum_j l_j * A^k x_ij + T_A^k(i),    c_i^k = sum_j l_j * C^k x_ij + T_C^k(i)
    l_kj  = (1 - j/J) - (k/e)(1 - 2j/J)         (j = 1..J the word, k = 1..e the channel)

where T(i) is the temporal encoding of memory slot i (slots ordered by recency: the most recent
sentence is slot 0). K hops refine the query u_1 = B q:

    p_i^k   = softmax_i(u_k . m_i^k),   o_k = sum_i p_i^k c_i^k,   u_{k+1} = u_k + o_k

and the answer is read from W u_{K+1}. Adjacent weight tying (section 2.2): A^{k+1} = C^k,
B = A^1, W^T = C^K; here the K + 1 distinct maps are E_0 .. E_K [d_model, e] (A^k = E_{k-1},
C^k = E_k, B = E_0, the output y = u_{K+1} E_K^T) and the temporal tables are tied the same way
(T_A^k = T_{k-1}, T_C^k = T_k).

As a token mixer: the tokens of each document are cut into sentences of `sentence_len` (J)
tokens from its first token. The memory of token t is every COMPLETE sentence before the
sentence t belongs to, the `memory_size` most recent of them (the paper's memory is likewise
capped, at 50); with none, o_k = 0. The query is the token's own projection E_0 x_t, or with
`query_sentence` (default) its sentence so far with the same position encoding,
u_1 = sum_{j <= word(t)} l_j * E_0 x_j: a question sentence's last token then asks the whole
question, as in the paper. The encodings are sums of float32 projections.

Parallel form: every token's memory gathered from the sentence ends ([b, t, memory_size, K+1,
e]); the hops are the one function `hops` that the decoding step runs on its cached memory.
The cache (`MemN2NCache`): the memory slots by recency, their count, the partial sentence's
encodings and the position in it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from memzoo import layers
from memzoo.attention import check_segment_ids, segment_positions
from memzoo.linear_attention.common import check_positive_int
from memzoo.memories.ttm import keep_where
from memzoo.registry import register_mixer


@struct.dataclass
class MemN2NCache:
    """memory [b, memory_size, K+1, e] (slot 0 the most recent complete sentence); count [b]
    int32 (slots filled); partial [b, K+1, e] (the current sentence's encodings so far); word [b]
    int32 (tokens of the current sentence seen). Encodings float32."""
    memory: jax.Array
    count: jax.Array
    partial: jax.Array
    word: jax.Array


def position_encoding(sentence_len: int, embed_dim: int) -> np.ndarray:
    """The paper's l [J, e]: l_kj = (1 - j/J) - (k/e)(1 - 2j/J), 1-based j and k."""
    j = np.arange(1, sentence_len + 1, dtype=np.float64)[:, None] / sentence_len
    k = np.arange(1, embed_dim + 1, dtype=np.float64)[None, :] / embed_dim
    return ((1 - j) - k * (1 - 2 * j)).astype(np.float32)


def hops(u, memory, valid, temporal):
    """K hops of the memory read, float32: u [..., e]; memory [..., M, K+1, e] (the sentence
    encodings under E_0..E_K); valid [..., M]; temporal [K+1, M, e] -> u_{K+1} [..., e]."""
    floor = jnp.finfo(jnp.float32).min
    any_valid = jnp.any(valid, -1, keepdims=True)
    for k in range(1, temporal.shape[0]):
        keys = memory[..., k - 1, :]
        keys = keys + jnp.broadcast_to(temporal[k - 1], keys.shape)
        values = memory[..., k, :]
        values = values + jnp.broadcast_to(temporal[k], values.shape)
        scores = jnp.einsum("...e,...me->...m", u, keys)
        # a finite floor, not -inf: a query with no memory must stay finite before it is zeroed
        # (its NaN would reach the gradients through 0 * NaN)
        p = jax.nn.softmax(jnp.where(valid, scores, floor), axis=-1)
        p = jnp.where(any_valid, p, 0.0)
        u = u + jnp.einsum("...m,...me->...e", p, values)
    return u


@register_mixer("memn2n")
class MemN2N(nnx.Module):
    """End-to-end memory network over fixed-length sentences: [b, t, d] -> [b, t, d].

    Options: sentence_len (J tokens per sentence), num_hops (K), memory_size (most recent
    complete sentences kept), embed_dim (e, default d_model), query_sentence (the query is the
    sentence so far, not the token alone).

    >>> net = MemN2N(8, sentence_len=2, num_hops=2, memory_size=3, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, sentence_len: int = 4, num_hops: int = 3,
                 memory_size: int = 50, embed_dim: int | None = None,
                 query_sentence: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        embed_dim = d_model if embed_dim is None else embed_dim
        for name, value in (("d_model", d_model), ("sentence_len", sentence_len),
                            ("num_hops", num_hops), ("memory_size", memory_size),
                            ("embed_dim", embed_dim)):
            check_positive_int("MemN2N", name, value)
        if not isinstance(query_sentence, bool):
            raise ValueError(f"MemN2N: `query_sentence` must be a bool, got {query_sentence!r}")
        self.d_model, self.sentence_len, self.num_hops = d_model, sentence_len, num_hops
        self.memory_size, self.embed_dim, self.dtype = memory_size, embed_dim, dtype
        self.query_sentence = query_sentence
        self.embeddings = layers.param(
            jax.random.normal(rngs.params(), (num_hops + 1, d_model, embed_dim), jnp.float32)
            * d_model ** -0.5, (None, "embed", None))
        # the paper's N(0, 0.1) for its tables
        self.temporal = layers.param(
            0.1 * jax.random.normal(rngs.params(), (num_hops + 1, memory_size, embed_dim),
                                    jnp.float32), (None, None, None))

    def _pe(self):
        return jnp.asarray(position_encoding(self.sentence_len, self.embed_dim))

    def _project(self, x):
        """x [..., d] -> [..., K+1, e] float32: the token under E_0 .. E_K."""
        e = jnp.einsum("...d,kde->...ke", x.astype(self.dtype),
                       self.embeddings[...].astype(self.dtype))
        return e.astype(jnp.float32)

    def _answer(self, u0, memory, valid):
        u = hops(u0, memory, valid, self.temporal[...])
        return jnp.einsum("...e,de->...d", u.astype(self.dtype),
                          self.embeddings[-1].astype(self.dtype))

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> MemN2NCache:
        """An empty memory (`max_len` ignored: at most memory_size sentences are kept)."""
        del max_len
        M, K1, e = self.memory_size, self.num_hops + 1, self.embed_dim
        return MemN2NCache(jnp.zeros((batch_size, M, K1, e), jnp.float32),
                           jnp.zeros((batch_size,), jnp.int32),
                           jnp.zeros((batch_size, K1, e), jnp.float32),
                           jnp.zeros((batch_size,), jnp.int32))

    def _step(self, cache: MemN2NCache, x_t):
        z = self._project(x_t)
        partial = cache.partial + self._pe()[cache.word][:, None, :] * z
        u0 = partial[:, 0] if self.query_sentence else z[:, 0]
        valid = jnp.arange(self.memory_size)[None, :] < cache.count[:, None]
        y = self._answer(u0, cache.memory, valid)
        done = cache.word == self.sentence_len - 1
        pushed = jnp.concatenate([partial[:, None], cache.memory[:, :-1]], 1)
        new = MemN2NCache(keep_where(done, pushed, cache.memory),
                          jnp.where(done, jnp.minimum(cache.count + 1, self.memory_size),
                                    cache.count),
                          keep_where(done, jnp.zeros_like(partial), partial),
                          (cache.word + 1) % self.sentence_len)
        return new, y

    def step(self, x_t, cache: MemN2NCache):
        layers.check_input("MemN2N.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        cache, y = self._step(cache, x_t)
        return y, cache

    def __call__(self, x, cache: MemN2NCache | None = None, *, segment_ids=None):
        """Parallel form, or with `cache` the prefill that continues from it (a scan of the
        decoding step): (y, cache). `segment_ids` [b, t] (parallel form only): sentences are
        counted from each document's first token and the memory holds its own sentences only."""
        layers.check_input("MemN2N", "x", x, ndim=3, width=self.d_model)
        b, T, _ = x.shape
        if segment_ids is not None:
            check_segment_ids("MemN2N", segment_ids, (b, T))
            if cache is not None:
                raise ValueError("MemN2N: `segment_ids` applies to the parallel form only; a "
                                 "cache holds one document per batch row")
        if cache is not None:
            self._check_cache(cache, b)
            graphdef, state = nnx.split(self)

            def body(carry, x_t):
                return nnx.merge(graphdef, state)._step(carry, x_t)

            final, ys = jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
            return jnp.swapaxes(ys, 0, 1), final
        S, M = self.sentence_len, self.memory_size
        pos = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T)) if segment_ids is None
               else segment_positions(segment_ids))
        word, sentence = pos % S, pos // S
        proj = self._project(x)                                           # [b, t, K+1, e]
        z = self._pe()[word][:, :, None, :] * proj
        # partial[t] = the encodings of t's sentence up to t: its words l <= word(t) back
        partial = z
        for lag in range(1, S):
            shifted = jnp.pad(z, ((0, 0), (lag, 0), (0, 0), (0, 0)))[:, :T]
            partial = partial + jnp.where((lag <= word)[:, :, None, None], shifted, 0.0)
        u0 = partial[:, :, 0] if self.query_sentence else proj[:, :, 0]
        # slot r of token t: the sentence r + 1 before its own, whose last token stands at
        # t - word(t) - 1 - r S
        r = jnp.arange(M, dtype=jnp.int32)
        src = (jnp.arange(T, dtype=jnp.int32)[None, :, None] - word[:, :, None] - 1
               - r[None, None, :] * S)
        valid = r[None, None, :] < sentence[:, :, None]
        memory = partial[jnp.arange(b)[:, None, None], jnp.clip(src, 0, T - 1)]
        return self._answer(u0, memory, valid)

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, self.memory_size, self.num_hops + 1, self.embed_dim)
        if not isinstance(cache, MemN2NCache) or tuple(cache.memory.shape) != want:
            got = tuple(cache.memory.shape) if isinstance(cache, MemN2NCache) \
                else type(cache).__name__
            raise ValueError(f"MemN2N: `cache` must be a MemN2NCache with memory {want} (from "
                             f"init_cache({batch})), got {got}")
