"""Token Turing Machines (Ryoo et al., 2023, "Token Turing Machines"), the "ttm" mixer.

An external memory of m tokens M [m, d] is read and written by token summarisation
(TokenLearner): a set of tokens X [n, d] is summarised into k tokens by importance weights,
softmax-normalised over the n tokens,

    S_k(X) = A^T X,      A = softmax_over_tokens(X W) [n, k]

Each step of the machine, on the input tokens I:

    Z  = S_r([M; I])                read: r tokens from the memory and the input
    O  = Z + MLP(Z)                 process (the paper's processing unit; here a residual MLP)
    M' = S_m([M; O; I])             write: the memory summarised anew from itself, the
                                    processed tokens and the input

As a causal mixer over a sequence the input is cut into segments of `segment_len` (s) tokens,
each one step of the machine: the memory carries across segments (M_0 is learned, and again at
each document start), and within a segment token t reads the memory and the segment's tokens
up to itself (the softmax over [M; I_{<=t}]), so that its output y_t = W_out vec(O_t) never sees
the future. When a segment is complete, its last read O is what the write uses, so the memory
after a segment depends only on that segment and the ones before.

Parallel form: lax.scan of the one-token step over time (the read at every token and the write
at the segments' ends), so the step and the parallel form are the same computation. The cache
(`TTMCache`): the memory tokens, the partial segment's inputs (float32) and each row's fill.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from memzoo import layers
from memzoo.attention import check_segment_ids, segment_starts
from memzoo.linear_attention.common import check_positive_int
from memzoo.registry import register_mixer


@struct.dataclass
class TTMCache:
    """memory [b, m, d] float32; segment [b, s, d] float32 (the partial segment's inputs);
    fill [b] int32 (tokens of the partial segment seen)."""
    memory: jax.Array
    segment: jax.Array
    fill: jax.Array


def summarize(tokens, weights_proj, valid=None):
    """TokenLearner summarisation: tokens [b, n, d] -> [b, k, d] with importance weights
    softmax over the n tokens of tokens W [n, k]; `valid` [b, n] masks tokens out."""
    logits = weights_proj(tokens)
    if valid is not None:
        logits = jnp.where(valid[:, :, None], logits, -jnp.inf)
    a = jax.nn.softmax(logits.astype(jnp.float32), axis=1).astype(tokens.dtype)
    return jnp.einsum("bnk,bnd->bkd", a, tokens)


@register_mixer("ttm")
class TokenTuringMachine(nnx.Module):
    """Token Turing Machine over segments: [b, t, d] -> [b, t, d].

    Options: memory_size (m memory tokens), num_read (r read tokens), segment_len (s tokens per
    step of the machine), mlp_ratio (the processor MLP's width, x d_model).

    >>> ttm = TokenTuringMachine(8, memory_size=4, num_read=2, segment_len=2, rngs=nnx.Rngs(0))
    >>> ttm(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, memory_size: int = 16, num_read: int = 4,
                 segment_len: int = 8, mlp_ratio: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
        for name, value in (("d_model", d_model), ("memory_size", memory_size),
                            ("num_read", num_read), ("segment_len", segment_len),
                            ("mlp_ratio", mlp_ratio)):
            check_positive_int("TokenTuringMachine", name, value)
        self.d_model, self.memory_size, self.num_read = d_model, memory_size, num_read
        self.segment_len, self.dtype = segment_len, dtype
        self.initial_memory = layers.param(
            jax.random.normal(rngs.params(), (memory_size, d_model), jnp.float32), (None, "embed"))
        # No biases: a bias shifts every token's logit alike, which the softmax over tokens drops.
        kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.read_weights = layers.Linear(d_model, num_read, axes=("embed", None), **kw)
        self.write_weights = layers.Linear(d_model, memory_size, axes=("embed", None), **kw)
        self.processor = layers.MLP(d_model, mlp_ratio * d_model, dtype=dtype, rngs=rngs)
        self.out = layers.Linear(num_read * d_model, d_model, axes=("mlp", "embed"), **kw)

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> TTMCache:
        """The machine before any token (`max_len` ignored: the state does not grow)."""
        del max_len
        m, s, d = self.memory_size, self.segment_len, self.d_model
        return TTMCache(jnp.broadcast_to(self.initial_memory[...], (batch_size, m, d)),
                        jnp.zeros((batch_size, s, d), jnp.float32),
                        jnp.zeros((batch_size,), jnp.int32))

    def _step(self, cache: TTMCache, x_t, start):
        """One token: x_t [b, d]; start [b] bool (a document begins here)."""
        b = x_t.shape[0]
        cache = jax.tree.map(lambda new, old: keep_where(start, new, old), self.init_cache(b),
                             cache)
        fill = cache.fill
        segment = cache.segment.at[jnp.arange(b), fill].set(x_t.astype(jnp.float32))
        mem, seg = cache.memory.astype(self.dtype), segment.astype(self.dtype)
        m, s = self.memory_size, self.segment_len
        valid = jnp.concatenate([jnp.ones((b, m), bool),
                                 jnp.arange(s)[None, :] <= fill[:, None]], axis=1)
        z = summarize(jnp.concatenate([mem, seg], 1), self.read_weights, valid)
        o = z + self.processor(z)
        y = self.out(o.reshape(b, -1))
        written = summarize(jnp.concatenate([mem, o, seg], 1), self.write_weights)
        done = fill + 1 == s
        new = TTMCache(keep_where(done, written.astype(jnp.float32), cache.memory),
                       keep_where(done, jnp.zeros_like(segment), segment),
                       jnp.where(done, 0, fill + 1))
        return new, y

    def step(self, x_t, cache: TTMCache):
        layers.check_input("TokenTuringMachine.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        cache, y = self._step(cache, x_t, jnp.zeros((x_t.shape[0],), bool))
        return y, cache

    def __call__(self, x, cache: TTMCache | None = None, *, segment_ids=None):
        """Parallel form (a scan of the step), or with `cache` the prefill that continues from
        it: (y, cache). `segment_ids` [b, t] (parallel form only): the machine restarts from
        its learned memory at each document."""
        layers.check_input("TokenTuringMachine", "x", x, ndim=3, width=self.d_model)
        b, T, _ = x.shape
        if segment_ids is not None:
            check_segment_ids("TokenTuringMachine", segment_ids, (b, T))
            if cache is not None:
                raise ValueError("TokenTuringMachine: `segment_ids` applies to the parallel "
                                 "form only; a cache holds one document per batch row")
            starts = segment_starts(segment_ids)
        else:
            starts = jnp.zeros((b, T), bool)
        if cache is not None:
            self._check_cache(cache, b)
        graphdef, state = nnx.split(self)

        def body(carry, inputs):
            return nnx.merge(graphdef, state)._step(carry, *inputs)

        final, ys = jax.lax.scan(body, self.init_cache(b) if cache is None else cache,
                                 (jnp.swapaxes(x, 0, 1), jnp.swapaxes(starts, 0, 1)))
        y = jnp.swapaxes(ys, 0, 1)
        return y if cache is None else (y, final)

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, self.memory_size, self.d_model)
        if not isinstance(cache, TTMCache) or tuple(cache.memory.shape) != want:
            got = tuple(cache.memory.shape) if isinstance(cache, TTMCache) \
                else type(cache).__name__
            raise ValueError(f"TokenTuringMachine: `cache` must be a TTMCache with memory {want} "
                             f"(from init_cache({batch})), got {got}")


def keep_where(cond, new, old):
    """Per batch row: `new` where cond [b], else `old`."""
    return jnp.where(cond.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
