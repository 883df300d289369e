"""Gated Slot Attention (Zhang et al., 2024, "Gated Slot Attention for Efficient Linear-Time
Sequence Modeling"), the "gsa" mixer.

A bounded memory of m slots per key/value head, written by a forget gate alpha_t in (0, 1)^m
and read by a softmax over the slots: two gated linear attentions with the same gate,

    K~_t = diag(alpha_t) K~_{t-1} + (1 - alpha_t) k_t^T        [m, K]
    V~_t = diag(alpha_t) V~_{t-1} + (1 - alpha_t) v_t^T        [m, V]
    o_t  = V~_t^T softmax(K~_t q_t)

    alpha_t = sigmoid(x_t W_f + b_f)^(1/8)   (log alpha = logsigmoid(.) / 8, fla's
                                              gate_logit_normalizer)
    q, k = silu(x W_q), silu(x W_k);  v = silu(x W_v)
    y = W_o (RMSNorm_head(silu(o)) [* silu(x W_g)])

(fla's GatedSlotAttention defaults: swish feature map, silu values, scale 1, RMSNorm of silu(o),
no output gate; fla normalises over all heads together, the family here per head.)

The second pass is pallas_kernels.chunked_linear_attention as it stands: the state V~ [m, V]
with the vector log gate log alpha over its key (slot) axis, queried by the softmax weights. The
first pass gates K~ [m, K] along the slots but is queried along K, the other axis: the op gates
only the axis its query contracts. Each slot m is therefore run as a head of its own, a
scalar-gated linear attention with value dimension 1 (keys k_t, value 1 - alpha_t[m], decay
alpha_t[m]); the m heads together hold exactly K~. It costs m score matrices per chunk where a
value-gated kernel (fla's chunk_gsa) computes one; the state is the same size.

Decoding carries both states in the family's cache as one array [b, kv heads, m, K + V]
(K~ then V~ along the last axis). The gate bias b_f (zero at initialisation; fla's projection has
none) sets the forgetting time scale as GLA's gate bias does: tagged "ssm_dynamics".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from memzoo.linear_attention.common import (LinearMemory, check_positive_int, normal_init,
                                            run_memory)
from memzoo.registry import register_mixer


def gated_slot_attention(q, k, v, log_alpha, *, state=None, segment_ids=None, scale=1.0,
                         chunk_size=None, implementation="auto"):
    """The two passes (module docstring). q [b, t, H, K]; k [b, t, G, K]; v [b, t, G, V];
    log_alpha [b, t, G, m] float32 <= 0; state [b, G, m, K + V] (K~ | V~) or None.
    Returns (o [b, t, H, V], state [b, G, m, K + V] float32)."""
    b, t, H, K = q.shape
    G, m = k.shape[2], log_alpha.shape[-1]
    group = H // G
    s = -jnp.expm1(log_alpha)  # 1 - alpha: the write strength of each slot
    k_state = v_state = None
    if state is not None:
        k_state, v_state = state[..., :K], state[..., K:]
    # Pass 1, slot by slot as heads (g, m); query head (g, m, r) reads kv head (g, m), which is
    # run_memory's grouping of consecutive query heads.
    q1 = jnp.broadcast_to(q.reshape(b, t, G, 1, group, K), (b, t, G, m, group, K))
    k1 = jnp.broadcast_to(k[:, :, :, None], (b, t, G, m, K))
    scores, k_final = run_memory(
        "linear", q1.reshape(b, t, G * m * group, K), k1.reshape(b, t, G * m, K),
        s.astype(q.dtype).reshape(b, t, G * m, 1), log_gate=log_alpha.reshape(b, t, G * m),
        state=None if k_state is None else k_state.reshape(b, G * m, K, 1), scale=scale,
        segment_ids=segment_ids, chunk_size=chunk_size, implementation=implementation)
    scores = scores.reshape(b, t, G, m, group).transpose(0, 1, 2, 4, 3).reshape(b, t, H, m)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    # Pass 2: the slots are the op's keys, gated by the same alpha.
    o, v_final = run_memory("linear", weights, s.astype(v.dtype), v, log_gate=log_alpha,
                            state=v_state, scale=1.0, segment_ids=segment_ids,
                            chunk_size=chunk_size, implementation=implementation)
    k_final = k_final.reshape(b, G, m, K)
    return o, jnp.concatenate([k_final, v_final.astype(k_final.dtype)], axis=-1)


@register_mixer("gsa")
class GatedSlotAttention(LinearMemory):
    """Gated Slot Attention: [b, t, d] -> [b, t, d] (module docstring).

    Options beyond `LinearMemory`'s: `num_slots` (m; default head_dim, as fla),
    `gate_logit_normalizer` (8).

    >>> m = GatedSlotAttention(8, num_heads=2, num_slots=4, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    rule = "linear"

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 num_slots: int | None = None, gate_logit_normalizer: float = 8.0,
                 conv_size: int = 0, output_norm: str = "rmsnorm", output_gate: bool = False,
                 chunk_size: int | None = None, implementation: str = "auto",
                 norm_eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(gate_logit_normalizer, bool) \
                or not isinstance(gate_logit_normalizer, (int, float)) or gate_logit_normalizer <= 0:
            raise ValueError(f"GatedSlotAttention: `gate_logit_normalizer` must be a number > 0, "
                             f"got {gate_logit_normalizer!r}")
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm="none",
                         feature_map="identity", conv_size=conv_size, output_norm=output_norm,
                         output_gate=output_gate, rotary=False, chunk_size=chunk_size,
                         implementation=implementation, norm_eps=norm_eps, dtype=dtype,
                         rngs=rngs)
        num_slots = self.head_dim if num_slots is None else num_slots
        check_positive_int("GatedSlotAttention", "num_slots", num_slots)
        self.num_slots, self.gate_logit_normalizer = num_slots, float(gate_logit_normalizer)
        G = self.num_kv_heads
        self.wf = normal_init(rngs, (d_model, G, num_slots), d_model, ("embed", "kv_heads", None))
        self.gate_bias = layers.param(jnp.zeros((G, num_slots), jnp.float32), ("kv_heads", None),
                                      group="ssm_dynamics")

    @property
    def state_key_dim(self) -> int:
        return self.num_slots

    @property
    def state_value_dim(self) -> int:
        return self.head_dim + self.value_dim

    def _qk(self, q, k):
        return jax.nn.silu(q), jax.nn.silu(k)

    def _gates(self, x):
        # The gate logits in float32 (see GLA's gate).
        logits = jnp.einsum("btd,dgm->btgm", x.astype(jnp.float32), self.wf[...])
        logits = logits + self.gate_bias[...][None, None]
        return jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer, None

    def _mix(self, x, q, k, v, state, segment_ids):
        log_alpha, _ = self._gates(x)
        o, state = gated_slot_attention(q, k, jax.nn.silu(v), log_alpha, state=state,
                                        segment_ids=segment_ids, chunk_size=self.chunk_size,
                                        implementation=self.implementation)
        return jax.nn.silu(o), state
