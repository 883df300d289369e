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

No auxiliary load-balancing loss is added (the mixer API returns only y).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.linear_attention.common import (LinearMemory, check_option, check_positive_int,
                                            normal_init)
from memzoo.linear_attention.deltanet import mamba2_decay
from memzoo.ssm.init import mamba2_log_decay
from memzoo.registry import register_mixer

MOM_RULES = {"gated_deltanet": "delta", "linear_attention": "linear"}


@register_mixer("mom")
class MixtureOfMemories(LinearMemory):
    """Mixture-of-Memories: [b, t, d] -> [b, t, d].

    Options beyond `LinearMemory`'s: `num_memories` (M), `top_k`, `shared_memory`,
    `memory_rule` ("gated_deltanet" | "linear_attention").

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
                 implementation: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        owner = "MixtureOfMemories"
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
        probs = jax.nn.softmax(x.astype(jnp.float32) @ self.router[...], axis=-1)
        _, idx = jax.lax.top_k(probs, self.top_k)
        mask = jnp.sum(jax.nn.one_hot(idx, self.num_memories, dtype=jnp.float32), axis=-2) > 0
        chosen = jnp.where(mask, probs, 0.0)
        return mask, chosen / jnp.sum(chosen, axis=-1, keepdims=True)

    def _project(self, x):
        b, T, _ = x.shape
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(self.dtype))
        k, v = (jnp.einsum("btd,dehk->btehk", x, w[...].astype(self.dtype)).reshape(
                    b, T, self.state_heads, -1) for w in (self.wk, self.wv))
        return q, k, v

    def _mix(self, x, q, k, v, state, segment_ids):
        b, T, _ = x.shape
        E, G = self.num_slots, self.num_kv_heads
        mask, weights = self.route(x)
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
        o = jnp.einsum("bte,btehv->bthv", weights.astype(jnp.float32), o.astype(jnp.float32))
        return o, state
