"""Modern Hopfield retrieval (Ramsauer et al., 2020, "Hopfield Networks is All You Need").

With stored patterns X = [x_1 .. x_N] (columns) and a state (query) pattern xi, one update is

    xi_new = X softmax(beta X^T xi)

which descends the energy E(xi) = -lse(beta, X^T xi) + xi^T xi / 2 (+ constants) and, for
well-separated patterns and large beta, retrieves the stored pattern nearest to xi in one step.
`hopfield_retrieve` is that update, `hopfield_energy` the energy (the tests check the descent).

`Hopfield` is the layer around it, in one of two modes:
  * stored (default): learned patterns [num_patterns, pattern_dim] are the memory; the token's
    query W_q x is updated `update_steps` times and projected back, W_o xi. A per-token layer.
    `num_heads` = H splits the pattern dimension: head h's stored patterns are the columns
    h*dh .. (h+1)*dh - 1 of X (dh = pattern_dim / H), each head its own softmax over the N
    patterns (beta defaults to 1 / sqrt(dh)). This mode is the MLP slot `mlp="hopfield"`
    (memzoo.models): a per-token retrieval from learned patterns needs no decoding cache.
  * over the input (`__call__(x, memory=y)` or `associate_input=True`): the patterns are the
    projected input tokens themselves, keys Y W_k and values Y W_v (Ramsauer's Hopfield layer,
    an associative attention with inverse temperature beta), causal by default so that a token
    reads only itself and earlier tokens.
beta defaults to 1 / sqrt(pattern_dim), the attention scaling.

`HopfieldMixer`, the registered mixer "hopfield": the over-the-input layer as a multi-head
causal sequence mixer. Per head, the stored patterns at token t are the keys k_1..k_t of the
tokens so far (Y W_k), the state pattern starts as the query xi^(0) = q_t and takes
`update_steps` - 1 Hopfield updates in key space before the read-out through the values:

    xi^(s+1) = K_<=t^T softmax(beta K_<=t xi^(s))          s = 0 .. update_steps - 2
    o_t      = V_<=t^T softmax(beta K_<=t xi^(last))       y = concat_h(o_t) W_o

(Ramsauer et al., 2020, sec. 3, the `Hopfield` layer with the keys as stored patterns and its
"update_steps_max"). One step is causal softmax attention with inverse temperature beta
(default 1 / sqrt(head_dim)), so every step is `pallas_kernels.flash_attention` with
scale=beta (values = keys for the updates), and the cache is memzoo.attention's KV cache: the
stored patterns are the past keys and values, written once per token as in attention.
Packed documents (segment_ids): each document's tokens store and retrieve only among their own
patterns. Projections, GQA and the KV cache come from memzoo.attention.Attention; no positions
by default (`rope=False`: stored patterns are a set), rotary positions as an option.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from memzoo import layers
from memzoo.attention import (DEFAULT_MAX_LEN, Attention, KVCache, check_segment_ids,
                              segment_positions, segment_starts)
from memzoo.registry import register_mixer


def hopfield_retrieve(patterns, xi, beta, steps: int = 1):
    """patterns [..., N, d] (rows are the stored x_i), xi [..., d] -> xi after `steps` updates."""
    for _ in range(steps):
        p = jax.nn.softmax(beta * jnp.einsum("...nd,...d->...n", patterns, xi), axis=-1)
        xi = jnp.einsum("...n,...nd->...d", p, patterns)
    return xi


def hopfield_energy(patterns, xi, beta):
    """E(xi) = -lse(beta, X^T xi) / beta + xi^T xi / 2 (Ramsauer et al., eq. 2, constants dropped)."""
    scores = beta * jnp.einsum("...nd,...d->...n", patterns, xi)
    return -jax.nn.logsumexp(scores, axis=-1) / beta + 0.5 * jnp.sum(xi * xi, axis=-1)


class Hopfield(nnx.Module):
    """[..., d_model] -> [..., d_model] (module docstring).

    >>> hop = Hopfield(8, num_patterns=16, rngs=nnx.Rngs(0))
    >>> hop(jnp.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(self, d_model: int, *, num_patterns: int = 64, pattern_dim: int | None = None,
                 beta: float | None = None, update_steps: int = 1, associate_input: bool = False,
                 causal: bool = True, num_heads: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        for name, v in (("d_model", d_model), ("num_patterns", num_patterns),
                        ("update_steps", update_steps), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Hopfield: `{name}` must be an integer >= 1, got {v!r}")
        pattern_dim = pattern_dim or d_model
        if pattern_dim % num_heads:
            raise ValueError(f"Hopfield: `pattern_dim` ({pattern_dim}) must be divisible by "
                             f"`num_heads` ({num_heads})")
        if num_heads > 1 and associate_input:
            raise ValueError("Hopfield: `num_heads` > 1 is for the stored patterns; over the "
                             "input use the mixer 'hopfield' (HopfieldMixer)")
        if beta is not None and not beta > 0:
            raise ValueError(f"Hopfield: `beta` must be > 0, got {beta!r}")
        self.d_model, self.pattern_dim, self.update_steps = d_model, pattern_dim, update_steps
        self.num_heads = num_heads
        self.beta = (float(beta) if beta is not None
                     else 1.0 / math.sqrt(pattern_dim // num_heads))
        self.associate_input, self.causal, self.dtype = associate_input, causal, dtype
        lin = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.query = layers.Linear(d_model, pattern_dim, axes=("embed", "heads"), **lin)
        self.out = layers.Linear(pattern_dim, d_model, axes=("heads", "embed"), **lin)
        if associate_input:
            self.key = layers.Linear(d_model, pattern_dim, axes=("embed", "heads"), **lin)
            self.value = layers.Linear(d_model, pattern_dim, axes=("embed", "heads"), **lin)
            self.patterns = None
        else:
            # Unit-RMS rows: scores beta * x_i . xi start O(1) for O(1) queries.
            self.patterns = layers.param(
                jax.random.normal(rngs.params(), (num_patterns, pattern_dim), jnp.float32),
                (None, "heads"))

    def __call__(self, x, memory=None):
        """x [..., d_model]; over the input: x [batch, time, d_model] and memory (default x)
        [batch, source, d_model] (causal masking needs source == time)."""
        layers.check_input("Hopfield", "x", x, ndim=x.ndim, width=self.d_model,
                           legend="[..., d_model]")
        xi = self.query(x).astype(jnp.float32)
        if not self.associate_input and memory is None:
            # Heads split the pattern dimension: head h retrieves from columns h*dh:(h+1)*dh
            # of every stored pattern, its own softmax over the N patterns.
            h, dh = self.num_heads, self.pattern_dim // self.num_heads
            patterns = self.patterns[...].reshape(-1, h, dh).swapaxes(0, 1)   # [h, N, dh]
            xi = xi.reshape(*xi.shape[:-1], h, dh)
            xi = hopfield_retrieve(patterns, xi, self.beta, self.update_steps)
            return self.out(xi.reshape(*xi.shape[:-2], self.pattern_dim).astype(self.dtype))
        y = x if memory is None else memory
        if not self.associate_input:
            raise ValueError("Hopfield: `memory=` needs associate_input=True (key and value "
                             "projections of the input)")
        layers.check_input("Hopfield", "memory", y, ndim=3, width=self.d_model)
        keys = self.key(y).astype(jnp.float32)        # [b, s, p]
        values = self.value(y).astype(jnp.float32)
        scores = self.beta * jnp.einsum("btp,bsp->bts", xi, keys)
        if self.causal:
            if y.shape[1] != x.shape[1]:
                raise ValueError(f"Hopfield: causal association needs memory of the input's "
                                 f"length {x.shape[1]}, got {y.shape[1]}")
            t = x.shape[1]
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        out = jnp.einsum("bts,bsp->btp", jax.nn.softmax(scores, axis=-1), values)
        return self.out(out.astype(self.dtype))


@register_mixer("hopfield")
class HopfieldMixer(Attention):
    """Multi-head causal Hopfield association: [b, t, d] -> [b, t, d] (module docstring).

    Options: num_heads, num_kv_heads (GQA), head_dim, beta (inverse temperature, default
    head_dim^-1/2), update_steps (Hopfield updates of the state pattern + the read-out, >= 1;
    1 is softmax attention), rope (False), rope_base, max_len (the decoding cache's length),
    implementation (pallas_kernels.flash_attention's).

    >>> hop = HopfieldMixer(8, num_heads=2, update_steps=2, rngs=nnx.Rngs(0))
    >>> hop(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 num_kv_heads: int | None = None, beta: float | None = None,
                 update_steps: int = 1, rope: bool = False, rope_base: float = 10_000.0,
                 max_len: int = DEFAULT_MAX_LEN, implementation: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if not isinstance(update_steps, int) or isinstance(update_steps, bool) \
                or update_steps < 1:
            raise ValueError(f"HopfieldMixer: `update_steps` must be an integer >= 1, got "
                             f"{update_steps!r}")
        if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float))
                                 or not beta > 0):
            raise ValueError(f"HopfieldMixer: `beta` must be a number > 0, got {beta!r}")
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim,
                         num_kv_heads=num_kv_heads, rope=rope, rope_base=rope_base,
                         max_len=max_len, implementation=implementation, dtype=dtype, rngs=rngs)
        self.update_steps = update_steps
        self.beta = float(beta) if beta is not None else self.head_dim ** -0.5

    def _associate(self, q, k, v, attend):
        """The update_steps - 1 updates in key space, then the read through the values;
        `attend(xi, keys, values)` is one causal softmax step at inverse temperature beta."""
        xi = q
        for _ in range(self.update_steps - 1):
            xi = attend(xi, k, k)
        return attend(xi, k, v)

    def __call__(self, x, cache: KVCache | None = None, *, segment_ids=None):
        """Parallel form, or with `cache` the prefill that continues from it: (y, cache).
        `segment_ids` [b, t]: patterns stored and retrieved within a document only (and
        rotary positions, if any, restart); parallel form only."""
        layers.check_input("HopfieldMixer", "x", x, ndim=3, width=self.d_model)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("HopfieldMixer: `segment_ids` applies to the parallel form "
                                 "only; a cache holds one document per batch row")
            return self._cached(x, cache)
        b, T, _ = x.shape
        if segment_ids is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (b, T))
            docs = None
        else:
            check_segment_ids("HopfieldMixer", segment_ids, (b, T))
            positions = segment_positions(segment_ids)
            docs = jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)
        q, k, v = self._project(x, positions)

        def attend(xi, keys, values):
            return pallas_kernels.flash_attention(xi, keys, values, segment_ids=docs,
                                                  scale=self.beta,
                                                  implementation=self.implementation)
        return self._out(self._associate(q, k, v, attend))

    def _cached(self, x, cache: KVCache):
        b, T, _ = x.shape
        if cache.k.shape[0] != b:
            raise ValueError(f"HopfieldMixer: cache is for batch {cache.k.shape[0]}, x has {b}")
        slots = cache.k.shape[1]
        if T > slots:
            raise ValueError(f"HopfieldMixer: {T} tokens do not fit a cache of max_len={slots}")
        index = cache.index
        q_pos = index + jnp.arange(T, dtype=jnp.int32)
        q, k, v = self._project(x, jnp.broadcast_to(q_pos[None], (b, T)))
        keys = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, index, 0, 0))
        values = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype),
                                              (0, index, 0, 0))
        visible = jnp.arange(slots, dtype=jnp.int32)[None, :] <= q_pos[:, None]

        def attend(xi, kk, vv):
            return jax.nn.dot_product_attention(xi, kk.astype(xi.dtype), vv.astype(xi.dtype),
                                                mask=visible[None, None], scale=self.beta)
        y = self._out(self._associate(q, keys, values, attend))
        # As memzoo.attention: an overflowing write would be clamped silently; poison instead.
        y = jnp.where(index + T <= slots, y, jnp.nan)
        return y, KVCache(keys, values, index + T)
