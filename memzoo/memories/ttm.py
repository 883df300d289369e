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

Parallel form: lax.scan over segments, as the paper steps the machine: within a segment the s
reads are computed at once (token t's softmax over [M; I] masks the segment's tokens after t),
then the one write; T/s sequential steps instead of T. Packed documents (`segment_ids`: a
document may start mid-segment and restarts the machine) and the prefill from a cache (which
may hold a partial segment) run lax.scan of the one-token step, the decoding step itself. Both
forms compute the same reads and writes (tests/memzoo/test_ttm.py checks each against the
machine written out in float64). The cache (`TTMCache`): the memory tokens, the partial
segment's inputs (float32) and each row's fill.

`conv_size=W >= 2` (not in the paper) first passes the inputs through a residual short causal
depthwise convolution, x_t + sum_i w_i x_{t-i} (w initialised to 0, per document; the cache
carries its last W-1 inputs), the one memzoo.attention and HCAM offer. The summaries weigh each
token by its own content and are sums over sets, so without it (or positions) a token's place
in the segment, and which token came before it, is invisible to the machine: with it, a token
carries its predecessors, and the write can select "the token after the marker".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

import pallas_kernels
from memzoo import layers
from memzoo.attention import check_segment_ids, segment_starts
from memzoo.linear_attention.common import check_positive_int
from memzoo.registry import register_mixer


@struct.dataclass
class TTMCache:
    """memory [b, m, d] float32; segment [b, s, d] float32 (the partial segment's inputs);
    fill [b] int32 (tokens of the partial segment seen); conv [b, W-1, d] (conv_size W > 0:
    the last inputs, float32 at least) or None."""
    memory: jax.Array
    segment: jax.Array
    fill: jax.Array
    conv: jax.Array | None = None


def summarize(tokens, weights_proj, valid=None):
    """TokenLearner summarisation: tokens [b, n, d] -> [b, k, d] with importance weights
    softmax over the n tokens of tokens W [n, k]; `valid` [b, n] masks tokens out."""
    logits = weights_proj(tokens)
    if valid is not None:
        logits = jnp.where(valid[:, :, None], logits, -jnp.inf)
    return jnp.einsum("bnk,bnd->bkd", token_softmax(logits, axis=1, dtype=tokens.dtype), tokens)


def token_softmax(logits, axis, dtype):
    """The importance weights: softmax over the tokens' axis, in float32 whatever the dtype."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=axis).astype(dtype)


@register_mixer("ttm")
class TokenTuringMachine(nnx.Module):
    """Token Turing Machine over segments: [b, t, d] -> [b, t, d].

    Options: memory_size (m memory tokens), num_read (r read tokens), segment_len (s tokens per
    step of the machine), mlp_ratio (the processor MLP's width, x d_model), conv_size (0: none,
    or W >= 2: the short convolution over the inputs).

    >>> ttm = TokenTuringMachine(8, memory_size=4, num_read=2, segment_len=2, rngs=nnx.Rngs(0))
    >>> ttm(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, memory_size: int = 16, num_read: int = 4,
                 segment_len: int = 8, mlp_ratio: int = 2, conv_size: int = 0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        for name, value in (("d_model", d_model), ("memory_size", memory_size),
                            ("num_read", num_read), ("segment_len", segment_len),
                            ("mlp_ratio", mlp_ratio)):
            check_positive_int("TokenTuringMachine", name, value)
        if not isinstance(conv_size, int) or conv_size < 0 or conv_size == 1:
            raise ValueError(f"TokenTuringMachine: `conv_size` must be 0 (none) or an int >= 2, "
                             f"got {conv_size!r}")
        self.conv_size = conv_size
        self.conv_weight = None if not conv_size else layers.param(
            jnp.zeros((conv_size, d_model), jnp.float32), (None, "embed"))
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
        conv = None if self.conv_weight is None else jnp.zeros(
            (batch_size, self.conv_size - 1, self.d_model),
            jnp.promote_types(self.dtype, jnp.float32))
        return self._machine(batch_size).replace(conv=conv)

    def _machine(self, batch_size: int) -> TTMCache:
        """The machine's own state before any token (the convolution's is kept apart)."""
        m, s, d = self.memory_size, self.segment_len, self.d_model
        return TTMCache(jnp.broadcast_to(self.initial_memory[...], (batch_size, m, d)),
                        jnp.zeros((batch_size, s, d), jnp.float32),
                        jnp.zeros((batch_size,), jnp.int32))

    def _convolve(self, x, state=None, segment_ids=None):
        """(inputs after the short convolution, its new state); x itself without one."""
        if self.conv_weight is None:
            return x, None
        x = x.astype(self.dtype)
        mixed, state = pallas_kernels.causal_conv1d(
            x, self.conv_weight[...].astype(self.dtype), initial_state=state,
            segment_ids=segment_ids)
        return x + mixed.astype(self.dtype), state

    def _step(self, cache: TTMCache, x_t, start):
        """One token: x_t [b, d]; start [b] bool (a document begins here)."""
        b = x_t.shape[0]
        cache = jax.tree.map(lambda new, old: keep_where(start, new, old), self._machine(b),
                             cache)
        fill = cache.fill
        segment = cache.segment.at[jnp.arange(b), fill].set(x_t.astype(jnp.float32))
        mem, seg = cache.memory.astype(self.dtype), segment.astype(self.dtype)
        m, s = self.memory_size, self.segment_len
        valid = jnp.concatenate([jnp.ones((b, m), bool),
                                 jnp.arange(s)[None, :] <= fill[:, None]], axis=1)
        z = summarize(jnp.concatenate([mem, seg], 1), self.read_weights, valid)
        o, y = self._process(z)
        written = summarize(jnp.concatenate([mem, o, seg], 1), self.write_weights)
        done = fill + 1 == s
        new = TTMCache(keep_where(done, written.astype(jnp.float32), cache.memory),
                       keep_where(done, jnp.zeros_like(segment), segment),
                       jnp.where(done, 0, fill + 1))
        return new, y

    def _process(self, z):
        """Read tokens z [..., r, d] -> (processed O, the output W_out vec(O) [..., d])."""
        o = z + self.processor(z)
        return o, self.out(o.reshape(o.shape[:-2] + (-1,)))

    def _segments(self, x):
        """The parallel form without packed documents: one scan step per segment of s tokens."""
        b, T, d = x.shape
        m, s = self.memory_size, self.segment_len
        n = -(-T // s)
        # As the step does: inputs rounded through the float32 segment buffer, then to dtype.
        x = x.astype(jnp.float32).astype(self.dtype)
        segs = jnp.pad(x, ((0, 0), (0, n * s - T), (0, 0))).reshape(b, n, s, d)
        # Token j reads [M; I_0..I_j]: the memory always, the segment up to itself.
        valid = jnp.concatenate([jnp.ones((s, m), bool), jnp.tril(jnp.ones((s, s), bool))], 1)

        graphdef, state = nnx.split(self)

        def body(memory, seg):
            ttm = nnx.merge(graphdef, state)
            mem = memory.astype(self.dtype)
            tokens = jnp.concatenate([mem, seg], 1)                          # [b, m + s, d]
            logits = jnp.where(valid[None, :, :, None], ttm.read_weights(tokens)[:, None],
                               -jnp.inf)                                     # [b, s, m + s, r]
            z = jnp.einsum("bjnk,bnd->bjkd", token_softmax(logits, 2, self.dtype), tokens)
            o, y = ttm._process(z)                                           # [b, s, r, d]
            written = summarize(jnp.concatenate([mem, o[:, -1], seg], 1), ttm.write_weights)
            return written.astype(jnp.float32), y

        memory0 = jnp.broadcast_to(self.initial_memory[...], (b, m, d)).astype(jnp.float32)
        _, ys = jax.lax.scan(body, memory0, jnp.swapaxes(segs, 0, 1))
        return jnp.swapaxes(ys, 0, 1).reshape(b, n * s, d)[:, :T]

    def step(self, x_t, cache: TTMCache):
        layers.check_input("TokenTuringMachine.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        x_t, conv = self._convolve(x_t[:, None], cache.conv)
        machine, y = self._step(cache.replace(conv=None), x_t[:, 0],
                                jnp.zeros((x_t.shape[0],), bool))
        return y, machine.replace(conv=conv)

    def __call__(self, x, cache: TTMCache | None = None, *, segment_ids=None):
        """Parallel form (a scan over segments), or with `cache` the prefill that continues
        from it: (y, cache). `segment_ids` [b, t] (parallel form only): the machine restarts from
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
        x, conv = self._convolve(x, None if cache is None else cache.conv, segment_ids)
        if cache is None and segment_ids is None:
            return self._segments(x)
        graphdef, state = nnx.split(self)

        def body(carry, inputs):
            return nnx.merge(graphdef, state)._step(carry, *inputs)

        machine = self._machine(b) if cache is None else cache.replace(conv=None)
        final, ys = jax.lax.scan(body, machine,
                                 (jnp.swapaxes(x, 0, 1), jnp.swapaxes(starts, 0, 1)))
        y = jnp.swapaxes(ys, 0, 1)
        return y if cache is None else (y, final.replace(conv=conv))

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, self.memory_size, self.d_model)
        if not isinstance(cache, TTMCache) or tuple(cache.memory.shape) != want:
            got = tuple(cache.memory.shape) if isinstance(cache, TTMCache) \
                else type(cache).__name__
            raise ValueError(f"TokenTuringMachine: `cache` must be a TTMCache with memory {want} "
                             f"(from init_cache({batch})), got {got}")
        if (cache.conv is None) != (self.conv_weight is None):
            raise ValueError("TokenTuringMachine: the cache's conv state does not match "
                             f"conv_size={self.conv_size}; make it with this layer's init_cache")


def keep_where(cond, new, old):
    """Per batch row: `new` where cond [b], else `old`."""
    return jnp.where(cond.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
