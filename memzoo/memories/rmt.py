"""Recurrent Memory Transformer and Hierarchical Memory Transformer: model wrappers.

Neither memory is a token mixer: both cut the sequence into segments and run the *whole* stack
once per segment, so they wrap `memzoo.models.CausalLM` (its embedding, BlockStack, final norm
and head) instead of registering a mixer.

**RMT** (Bulatov, Kuratov and Burtsev, 2022, "Recurrent Memory Transformer"; the decoder-only
form). The tokens are cut into segments x_n of `segment_len` L; with m_n [M, d] the memory
(`num_memory` M tokens) entering segment n,

    [r ; h_n ; w] = Stack([m_n ; E x_n ; m_n])        causal attention inside this input only
    logits_n      = head(final_norm(h_n))
    m_{n+1}       = memory_norm(w)                    the write tokens' outputs
    m_0           = a learned [M, d] parameter

Attention never crosses segments: the memory is the only path from one segment to the next.
`memory_norm` (an RMSNorm of its own) keeps the carried memory at a fixed scale over many
segments; the paper feeds the raw outputs back. Truncated back-propagation through time
(`bptt_segments` k > 0): the memory (and HMT's bank) entering segments n = k, 2k, ... is
`stop_gradient`ed, so no gradient crosses more than k segments (k = 0: all of them), as RMT's
training loop detaches the memory between its unrolls.

**HMT** (`hierarchical=True`; He et al., 2024, "HMT: Hierarchical Memory Transformer for
Efficient Long Context Language Processing"). On top of RMT's read memory, each segment recalls
from a bank of the memories written by the last `recall_segments` N segments (newest first; at
the start the bank holds m_0 alone):

    s_n  = final_norm(Stack([m_n ; E x_n[:j]])[-1])            representation extraction
    a_n  = softmax_i((W_q s_n) . (W_k mean(B_i)) / sqrt(d))     over the filled bank slots i
    P_n  = sum_i a_n,i B_i                                      [M, d], the recalled memory
    [r ; h_a ; p ; h_b ; w] = Stack([m_n ; E x_n[:j] ; P_n ; E x_n[j:] ; m_n])
    m_{n+1} = memory_norm(w);   B <- [m_{n+1}, B_0, ..., B_{N-2}]

with j = `summary_len`. Where this departs from the paper (HMT runs a separate extraction
pass over [T ; x_n[:j] ; T] with a learned token T and *prepends* P_n to the segment, so the
first j tokens' next-token predictions would see up to j - 1 tokens ahead): here the summary is
the stack's own output at token j - 1 (the same pass, so decoding reads it from the step), and
P_n is inserted *after* the j tokens it is computed from, which keeps the model causal and
decode == parallel exactly. The read memory m_n is kept (the paper's segment has P_n alone plus
k "sensory" tokens of the previous segment, which are not modelled), so HMT here is RMT plus
hierarchical recall; a memory is M tokens (the paper's is one embedding, M = 1), and the keys
of the recall are each slot's mean token.

`num_memory=0` (RMT only) leaves plain segment-local attention: the baseline that cannot pass
anything between segments.

Decoding (`init_cache`, `prefill`, `decode_step`): the stack's cache holds the current segment;
a segment opens with its read memory prefilled into a fresh cache, HMT's recall is prefilled
after token j - 1, and after the segment's last token the write tokens run through the cached
stack, their outputs become the next memory and the next segment opens; all under `nnx.cond`
on the position in the segment, so `memzoo.generate` runs it in one compiled loop. `prefill`
is a scan of `decode_step` (exact; a chunked prefill per segment is not written).

Packed documents (`segment_ids`) are refused: the memory runs on a fixed grid of segments over
the row, and a document starting inside a segment would need the grid restarted there.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from memzoo import layers
from memzoo.models import CausalLM, StackCache, check_tokens


@struct.dataclass
class MemoryState:
    """The memory between segments: `memory` [b, M, d] the next segment's read memory; HMT only:
    `bank` [b, N, M, d] the memories written by the last N segments (newest first) and `filled`
    [b, N] float32 (1 where a slot holds a memory)."""
    memory: Any
    bank: Any = None
    filled: Any = None


@struct.dataclass
class RecurrentMemoryCache:
    """Decoding state: `stack` the BlockStack cache of the current segment's input so far,
    `state` the MemoryState, `position` the next token's index in its segment (int32 scalar)."""
    stack: StackCache
    state: MemoryState
    position: Any


def _int(value, lowest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


class RecurrentMemoryLM(nnx.Module):
    """tokens [batch, time] int -> logits [batch, time, vocab] float32, segment by segment
    through memory tokens (RMT; with `hierarchical=True` HMT's recall; module docstring).

    >>> lm = RecurrentMemoryLM(vocab_size=16, d_model=8, num_layers=1, mixer="attention",
    ...                        segment_len=4, num_memory=2, rngs=nnx.Rngs(0))
    >>> lm(jnp.zeros((1, 10), jnp.int32)).shape
    (1, 10, 16)

    `lm_options` go to the wrapped CausalLM (mixer, mixer_options, dtype, scan_layers, remat,
    mlp_*...); learned absolute positions (max_positions) are refused, since each segment's
    input restarts at position 0.
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, segment_len: int,
                 num_memory: int = 4, bptt_segments: int = 0, hierarchical: bool = False,
                 recall_segments: int = 4, summary_len: int | None = None,
                 mixer: str = "attention", rngs: nnx.Rngs, **lm_options):
        owner = "RecurrentMemoryLM"
        if not _int(segment_len, 1):
            raise ValueError(f"{owner}: segment_len must be an int >= 1, got {segment_len!r}")
        if not _int(num_memory, 0):
            raise ValueError(f"{owner}: num_memory must be an int >= 0 (0: segment-local "
                             f"attention, no memory), got {num_memory!r}")
        if not _int(bptt_segments, 0):
            raise ValueError(f"{owner}: bptt_segments must be an int >= 0 (0: back-propagate "
                             f"through every segment), got {bptt_segments!r}")
        if not isinstance(hierarchical, bool):
            raise ValueError(f"{owner}: hierarchical must be a bool, got {hierarchical!r}")
        if lm_options.get("max_positions"):
            raise ValueError(f"{owner}: max_positions must be 0: every segment's input restarts "
                             f"at position 0, so learned absolute positions do not apply")
        if hierarchical:
            if num_memory < 1:
                raise ValueError(f"{owner}: hierarchical=True recalls memories, so num_memory "
                                 f"must be >= 1, got {num_memory!r}")
            if not _int(recall_segments, 1):
                raise ValueError(f"{owner}: recall_segments must be an int >= 1, got "
                                 f"{recall_segments!r}")
            if summary_len is None:
                summary_len = max(1, segment_len // 2)
            if not _int(summary_len, 1) or summary_len >= segment_len:
                raise ValueError(f"{owner}: summary_len must be an int in [1, segment_len - 1] = "
                                 f"[1, {segment_len - 1}] (the recall is inserted after the "
                                 f"segment's first summary_len tokens), got {summary_len!r}")
        self.segment_len, self.num_memory = segment_len, num_memory
        self.bptt_segments, self.hierarchical = bptt_segments, hierarchical
        self.recall_segments = recall_segments if hierarchical else 0
        self.summary_len = summary_len if hierarchical else 0
        self.lm = CausalLM(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                           mixer=mixer, rngs=rngs, **lm_options)
        self.dtype, self.d_model = self.lm.dtype, d_model
        # Embedding-sized start (the token table's d^-0.5) so m_0 enters like a token.
        self.memory_init = layers.param(
            jax.random.normal(rngs.params(), (num_memory, d_model), jnp.float32)
            * d_model ** -0.5, (None, "embed"))
        self.memory_norm = layers.RMSNorm(d_model, dtype=self.dtype)
        if hierarchical:
            self.recall_q = layers.Linear(d_model, d_model, axes=("embed", "mlp"),
                                          use_bias=False, dtype=self.dtype, rngs=rngs)
            self.recall_k = layers.Linear(d_model, d_model, axes=("embed", "mlp"),
                                          use_bias=False, dtype=self.dtype, rngs=rngs)
        else:
            self.recall_q = self.recall_k = None

    # ---------------------------------------------------------------------------- pieces

    @property
    def input_len(self) -> int:
        """Length of one full segment's stack input: read memory, recall, tokens, write."""
        return self.segment_len + (3 if self.hierarchical else 2) * self.num_memory

    def initial_state(self, batch_size: int) -> MemoryState:
        m0 = jnp.broadcast_to(self.memory_init[...].astype(self.dtype),
                              (batch_size, self.num_memory, self.d_model))
        if not self.hierarchical:
            return MemoryState(m0)
        n = self.recall_segments
        bank = jnp.zeros((batch_size, n) + m0.shape[1:], self.dtype).at[:, 0].set(m0)
        filled = jnp.zeros((batch_size, n), jnp.float32).at[:, 0].set(1.0)
        return MemoryState(m0, bank, filled)

    def _recall(self, summary, state: MemoryState):
        """summary [b, d] -> the recalled memory [b, M, d]: attention over the bank's slots."""
        q = self.recall_q(summary).astype(jnp.float32)
        k = self.recall_k(jnp.mean(state.bank, axis=2)).astype(jnp.float32)
        scores = jnp.einsum("bd,bnd->bn", q, k) / math.sqrt(self.d_model)
        weights = jax.nn.softmax(jnp.where(state.filled > 0, scores, -jnp.inf), axis=-1)
        return jnp.einsum("bn,bnmd->bmd", weights.astype(self.dtype), state.bank)

    def _written(self, write_out, state: MemoryState) -> MemoryState:
        memory = self.memory_norm(write_out).astype(self.dtype)
        if not self.hierarchical:
            return MemoryState(memory)
        bank = jnp.concatenate([memory[:, None], state.bank[:, :-1]], axis=1)
        filled = jnp.concatenate([jnp.ones_like(state.filled[:, :1]), state.filled[:, :-1]],
                                 axis=1)
        return MemoryState(memory, bank, filled)

    def _segment(self, x, state: MemoryState):
        """One segment's embeddings x [b, l, d] (l <= L) -> (stack outputs at its tokens
        [b, l, d], the state after it: written only when the segment is whole)."""
        stack, mem, M = self.lm.stack, state.memory, self.num_memory
        length, j = x.shape[1], self.summary_len
        write = length == self.segment_len
        if not self.hierarchical or length <= j:
            out = stack(jnp.concatenate([mem, x] + ([mem] if write else []), axis=1))
            h = out[:, M:M + length]
        else:
            head = stack(jnp.concatenate([mem, x[:, :j]], axis=1))
            recalled = self._recall(self.lm.final_norm(head[:, -1]), state)
            out = stack(jnp.concatenate([mem, x[:, :j], recalled, x[:, j:]]
                                        + ([mem] if write else []), axis=1))
            h = jnp.concatenate([out[:, M:M + j], out[:, 2 * M + j:2 * M + length]], axis=1)
        if write:
            state = self._written(out[:, -M:] if M else out[:, :0], state)
        return h, state

    # ------------------------------------------------------------------------ parallel form

    def _check(self, owner: str, tokens, segment_ids) -> None:
        check_tokens(owner, tokens)
        if segment_ids is not None:
            raise ValueError(
                f"{owner}: `segment_ids` (packed documents) are not supported: the memory is "
                f"carried over a fixed grid of segment_len={self.segment_len} tokens per row, "
                f"and a document starting inside a segment would need the grid restarted "
                f"there; pass one document per row (segment_ids=None)")

    def features(self, tokens, *, segment_ids=None):
        """The final hidden states [batch, time, d_model] that `project` turns into logits
        (what memzoo.losses.cross_entropy_sums reads)."""
        self._check("RecurrentMemoryLM", tokens, segment_ids)
        x = self.lm._embed(tokens)
        state = self.initial_state(tokens.shape[0])
        outs = []
        for n, start in enumerate(range(0, tokens.shape[1], self.segment_len)):
            if n and self.bptt_segments and n % self.bptt_segments == 0:
                state = jax.lax.stop_gradient(state)
            h, state = self._segment(x[:, start:start + self.segment_len], state)
            outs.append(h)
        return self.lm.final_norm(jnp.concatenate(outs, axis=1))

    def project(self, h):
        """Final hidden states [..., d_model] -> float32 logits [..., vocab]."""
        return self.lm.project(h)

    def __call__(self, tokens, *, segment_ids=None):
        return self.project(self.features(tokens, segment_ids=segment_ids))

    # ---------------------------------------------------------------------------- decoding

    def _open(self, state: MemoryState):
        """A fresh stack cache with the segment's read memory prefilled."""
        cache = self.lm.stack.init_cache(state.memory.shape[0], self.input_len)
        if self.num_memory:
            _, cache = self.lm.stack.prefill(state.memory, cache)
        return cache

    def init_cache(self, batch_size: int, max_len: int | None = None) -> RecurrentMemoryCache:
        """The state before any token (`max_len` is accepted for memzoo.generate and unused:
        the stack's cache spans one segment's input)."""
        del max_len
        state = self.initial_state(batch_size)
        return RecurrentMemoryCache(self._open(state), state, jnp.zeros((), jnp.int32))

    def decode_step(self, token_t, cache: RecurrentMemoryCache):
        """(logits [b, vocab], cache) for one token per row, token_t [b] int."""
        check_tokens("RecurrentMemoryLM.decode_step", token_t, ndim=1, legend="[batch]")
        x_t, stack_cache = self.lm.stack.step(self.lm._embed(token_t), cache.stack)
        h_t = self.lm.final_norm(x_t)
        state, position = cache.state, cache.position + 1

        if self.hierarchical:
            def recall(model, stack_cache, state, h_t):
                recalled = model._recall(h_t, state)
                return model.lm.stack.prefill(recalled, stack_cache)[1]

            def keep(model, stack_cache, state, h_t):
                return stack_cache
            stack_cache = nnx.cond(position == self.summary_len, recall, keep,
                                   self, stack_cache, state, h_t)

        def close(model, stack_cache, state):
            if model.num_memory:
                out, _ = model.lm.stack.prefill(state.memory, stack_cache)
            else:
                out = state.memory
            state = model._written(out, state)
            return model._open(state), state

        def go_on(model, stack_cache, state):
            return stack_cache, state
        stack_cache, state = nnx.cond(position == self.segment_len, close, go_on,
                                      self, stack_cache, state)
        position = jnp.where(position == self.segment_len, 0, position).astype(jnp.int32)
        return self.project(h_t), RecurrentMemoryCache(stack_cache, state, position)

    def prefill(self, tokens, cache: RecurrentMemoryCache):
        """(logits [b, t, vocab], cache after tokens), continuing from `cache`: decode_step
        scanned over the tokens."""
        check_tokens("RecurrentMemoryLM.prefill", tokens)

        @nnx.scan(in_axes=(nnx.Carry, None, 1), out_axes=(nnx.Carry, 1))
        def body(cache, model, token_t):
            logits_t, cache = model.decode_step(token_t, cache)
            return cache, logits_t
        cache, logits = body(cache, self, tokens)
        return logits, cache
