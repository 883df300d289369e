"""Mixture-of-Memories (Du et al., 2025), the "mom" mixer.

M memory states per key/value head plus (optionally) one shared memory. A router scores the M
memories per token (softmax of x W_r); the token writes only to its top-k, and reads

    o_t = sum_{m in topk(t)} w_t^m  S^m_t^T q_t  +  S^shared_t^T q_t,
    w_t^m = p_t^m / sum_{m' in topk(t)} p_t^{m'}   (renormalised router probabilities)

with q shared and keys, values (and gates) projected per memory. The memory rule is an option:
"gated_deltanet" (the paper's main variant: S^m updated by the gated delta rule) or
"linear_attention" (S^m_t = S^m_{t-1} + k^m_t v^m_t^T).

Realised on the shared ops with the memories as extra heads: one call covers M+1 memories x
heads, and a token that is not routed to memory m leaves S^m exactly as it was, because its
key (linear rule) or its beta and log gate (gated delta rule: beta = 0, alpha = 1) are masked
to zero there. The reads of unrouted memories are computed and weighted by 0.

`dispatch` picks how the routed memories run (equal results; tested against each other and a
float64 token loop):
  "dense" (default)  the masked extra heads above: every memory sees every token, cost ~ M + 1.
  "sparse"           MoE-style dispatch, cost ~ k + 1 (fla's MoM gathers per memory likewise):
                     a memory's state moves only at the tokens routed to it, so its recurrence
                     is the op over that subsequence alone. The T x k (token, memory) pairs of a
                     row (plus the T tokens of the shared memory) are sorted by memory, then time,
                     into one packed sequence of T (k + 1) tokens, with segment_ids = (memory,
                     document) so each memory's run restarts from its own zero state; q, k, v,
                     beta and gates are gathered to it, and each read is scattered back to its
                     token with its router weight. Only the parallel form (no cache) is
                     sparse: a cache holds a state per memory, which one packed row cannot start
                     from, so prefill and decoding (T = 1, where dense costs little) stay dense.

Load balancing (Switch Transformer, Fedus et al., 2022): `load_balancing_loss(x)` =
M sum_i f_i P_i, f_i the fraction of the row's top-k assignments that go to memory i and P_i
the mean router probability of i (1 when balanced, up to M when collapsed). With
`sow_aux_loss=True` every parallel call also records it with nnx.sow (nnx.Intermediate,
"aux_loss"); a training loss captures and adds it as (train/: `optim.aux_loss_weight`)
    y, aux = nnx.capture(model, nnx.Intermediate)(tokens)
    loss = loss + coefficient * sum(jax.tree.leaves(aux))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from memzoo.attention import segment_starts
from memzoo.linear_attention.common import (LinearMemory, check_option, check_positive_int,
                                            normal_init)
from memzoo.linear_attention.deltanet import mamba2_decay
from memzoo.ssm.init import mamba2_log_decay
from memzoo.registry import register_mixer

MOM_RULES = {"gated_deltanet": "delta", "linear_attention": "linear"}
DISPATCHES = ("dense", "sparse")


@register_mixer("mom")
class MixtureOfMemories(LinearMemory):
    """Mixture-of-Memories: [b, t, d] -> [b, t, d].

    Options beyond `LinearMemory`'s: `num_memories` (M), `top_k`, `shared_memory`,
    `memory_rule` ("gated_deltanet" | "linear_attention"), `dispatch` ("dense" | "sparse"),
    `sow_aux_loss` (record the load-balancing loss; module docstring).

    >>> mom = MixtureOfMemories(8, num_heads=2, num_memories=3, top_k=1, rngs=nnx.Rngs(0))
    >>> mom(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_memories: int = 4, top_k: int = 2,
                 shared_memory: bool = True, memory_rule: str = "gated_deltanet",
                 num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 qk_norm: str = "l2", conv_size: int = 4, output_norm: str = "rmsnorm",
                 output_gate: bool = True, chunk_size: int | None = None,
                 implementation: str = "auto", dispatch: str = "dense",
                 sow_aux_loss: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        owner = "MixtureOfMemories"
        check_option(owner, "dispatch", dispatch, DISPATCHES)
        if not isinstance(sow_aux_loss, bool):
            raise ValueError(f"{owner}: `sow_aux_loss` must be a bool, got {sow_aux_loss!r}")
        self.dispatch, self.sow_aux_loss = dispatch, sow_aux_loss
        check_positive_int(owner, "num_memories", num_memories)
        check_positive_int(owner, "top_k", top_k)
        if top_k > num_memories:
            raise ValueError(f"{owner}: `top_k`={top_k} exceeds `num_memories`={num_memories}")
        check_option(owner, "memory_rule", memory_rule, MOM_RULES)
        self.num_memories, self.top_k = num_memories, top_k
        self.shared_memory, self.memory_rule = bool(shared_memory), memory_rule
        self.rule = MOM_RULES[memory_rule]
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm=qk_norm,
                         feature_map="identity", conv_size=conv_size, output_norm=output_norm,
                         output_gate=output_gate, rotary=False, chunk_size=chunk_size,
                         implementation=implementation, dtype=dtype, rngs=rngs)
        E, G, K, V = self.num_slots, self.num_kv_heads, self.head_dim, self.value_dim
        # Per-memory keys and values replace the base's single ones.
        self.wk = normal_init(rngs, (d_model, E, G, K), d_model, ("embed", None, "kv_heads", "kv"))
        self.wv = normal_init(rngs, (d_model, E, G, V), d_model, ("embed", None, "kv_heads", "kv"))
        self.router = normal_init(rngs, (d_model, num_memories), d_model, ("embed", None))
        if self.rule == "delta":
            self.beta_proj = normal_init(rngs, (d_model, E, G), d_model,
                                         ("embed", None, "kv_heads"))
            self.log_A, self.decay_proj = mamba2_decay(rngs, d_model, (E, G),
                                                       (None, "kv_heads"))

    @property
    def num_slots(self) -> int:
        """Memories per key/value head: the routed ones, then the shared one."""
        return self.num_memories + (1 if self.shared_memory else 0)

    @property
    def conv_channels(self) -> int:
        return self.num_heads * self.head_dim \
            + self.num_slots * self.num_kv_heads * (self.head_dim + self.value_dim)

    @property
    def state_heads(self) -> int:
        return self.num_slots * self.num_kv_heads

    def route(self, x):
        """(mask [b, t, M] bool: the token's top-k memories, weights [b, t, M] float32: the
        renormalised router probabilities there, 0 elsewhere)."""
        mask, weights, _, _ = self._route(x)
        return mask, weights

    def _route(self, x):
        """route(x) and (probs [b, t, M], idx [b, t, k]: the top-k memories' indices)."""
        probs = jax.nn.softmax(x.astype(jnp.float32) @ self.router[...], axis=-1)
        _, idx = jax.lax.top_k(probs, self.top_k)
        mask = jnp.sum(jax.nn.one_hot(idx, self.num_memories, dtype=jnp.float32), axis=-2) > 0
        chosen = jnp.where(mask, probs, 0.0)
        return mask, chosen / jnp.sum(chosen, axis=-1, keepdims=True), probs, idx

    def load_balancing_loss(self, x):
        """Switch's auxiliary loss M sum_i f_i P_i over the tokens of x [b, t, d] (the mixer's
        input): f_i = the fraction of top-k assignments to memory i, P_i = its mean router
        probability. 1 for a uniform router, M when every token picks the same memories."""
        mask, _, probs, _ = self._route(x)
        return self._balance(mask, probs)

    def _balance(self, mask, probs):
        # top_k picks per token: each counts 1/top_k, so the assignments sum to 1 per token
        return layers.balance_loss(mask.astype(jnp.float32) / self.top_k, probs)

    def _project(self, x):
        b, T, _ = x.shape
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(self.dtype))
        k, v = (jnp.einsum("btd,dehk->btehk", x, w[...].astype(self.dtype)).reshape(
                    b, T, self.state_heads, -1) for w in (self.wk, self.wv))
        return q, k, v

    def _mix(self, x, q, k, v, state, segment_ids):
        b, T, _ = x.shape
        E, G = self.num_slots, self.num_kv_heads
        mask, weights, probs, idx = self._route(x)
        if self.sow_aux_loss and state is None:
            self.sow(nnx.Intermediate, "aux_loss", self._balance(mask, probs))
        if self.dispatch == "sparse" and state is None:
            return self._mix_sparse(x, q, k, v, weights, idx, segment_ids)
        if self.shared_memory:
            mask = jnp.concatenate([mask, jnp.ones_like(mask[..., :1])], axis=-1)
            weights = jnp.concatenate([weights, jnp.ones_like(weights[..., :1])], axis=-1)
        write = jnp.repeat(mask, G, axis=-1)  # [b, t, E * G], memory-major like the heads
        log_gate = beta = None
        if self.rule == "delta":
            x32 = x.astype(jnp.float32)
            beta = jax.nn.sigmoid(jnp.einsum("btd,deg->bteg", x32, self.beta_proj[...]))
            logits = self.decay_proj(x32)
            log_gate = mamba2_log_decay(logits, self.log_A[...].reshape(E * G))
            beta = jnp.where(write, beta.reshape(b, T, E * G), 0.0)
            log_gate = jnp.where(write, log_gate, 0.0)
        else:
            k = jnp.where(write[..., None], k, jnp.zeros_like(k))
        # Every memory is read by the same queries: memory-major heads (e, h).
        q_all = jnp.tile(q, (1, 1, E, 1))
        o, state = self._memory(q_all, k, v, log_gate, beta, state, segment_ids)
        o = o.reshape(b, T, E, self.num_heads, -1)
        acc = jnp.promote_types(o.dtype, jnp.float32)  # float64 runs stay float64
        o = jnp.einsum("bte,btehv->bthv", weights.astype(acc), o.astype(acc))
        return o, state

    def _gates_per_memory(self, x):
        """(log_gate, beta) [b, t, E, G] float32 for the delta rule, else (None, None)."""
        if self.rule != "delta":
            return None, None
        b, T, _ = x.shape
        E, G = self.num_slots, self.num_kv_heads
        x32 = x.astype(jnp.float32)
        beta = jax.nn.sigmoid(jnp.einsum("btd,deg->bteg", x32, self.beta_proj[...]))
        log_gate = mamba2_log_decay(self.decay_proj(x32), self.log_A[...].reshape(E * G))
        return log_gate.reshape(b, T, E, G), beta

    def _mix_sparse(self, x, q, k, v, weights, idx, segment_ids):
        """dispatch="sparse" (module docstring): the (token, memory) pairs sorted by memory
        then time into one packed sequence per row, T (k + 1) long with the shared memory."""
        b, T, _ = x.shape
        E, G, M, top = self.num_slots, self.num_kv_heads, self.num_memories, self.top_k
        pairs_m = idx.reshape(b, T * top)                            # pair f = t * k + j
        order = jnp.argsort(pairs_m * T + jnp.arange(T * top, dtype=jnp.int32)[None] // top,
                            axis=-1, stable=True)
        tok = (order // top).astype(jnp.int32)
        mem = jnp.take_along_axis(pairs_m, order, axis=-1).astype(jnp.int32)
        if self.shared_memory:                                       # memory M: every token
            tok = jnp.concatenate([tok, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))],
                                  axis=-1)
            mem = jnp.concatenate([mem, jnp.full((b, T), M, jnp.int32)], axis=-1)
            weights = jnp.concatenate([weights, jnp.ones_like(weights[..., :1])], axis=-1)
        rows = jnp.arange(b)[:, None]
        doc = (jnp.zeros((b, T), jnp.int32) if segment_ids is None else
               jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32))
        packed_ids = mem * (T + 1) + doc[rows, tok]
        k, v = k.reshape(b, T, E, G, -1), v.reshape(b, T, E, G, -1)
        log_gate, beta = self._gates_per_memory(x)
        if log_gate is not None:
            log_gate, beta = log_gate[rows, tok, mem], beta[rows, tok, mem]
        o, _ = self._memory(q[rows, tok], k[rows, tok, mem], v[rows, tok, mem], log_gate, beta,
                            None, packed_ids)
        acc = jnp.promote_types(o.dtype, jnp.float32)
        w = weights[rows, tok, mem].astype(acc)                      # [b, pairs]
        contrib = w[:, :, None, None] * o.astype(acc)
        out = jnp.zeros((b, T) + o.shape[2:], acc)
        return out.at[rows, tok].add(contrib), None
