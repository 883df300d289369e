"""Linear attention (Katharopoulos et al., 2020), the "linear_attention" mixer.

    S_t = S_{t-1} + phi(k_t) v_t^T        z_t = z_{t-1} + phi(k_t)
    normalised:    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)
    unnormalised:  o_t = K^-1/2 phi(q_t)^T S_t

phi is elu + 1 (the paper's), relu or identity. The normaliser z rides along in the same op:
a ones column appended to v makes the state [S | z], so one chunked_linear_attention call gives
numerator and denominator (its scale is set to 1 there, the ratio does not need it).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from memzoo.linear_attention.common import LinearMemory, run_memory
from memzoo.registry import register_mixer

EPS = 1e-6


@register_mixer("linear_attention")
class LinearAttention(LinearMemory):
    """Multi-head (GQA-capable) linear attention: [b, t, d] -> [b, t, d].

    Options beyond `LinearMemory`'s: `feature_map` ("elu+1" | "relu" | "identity"),
    `normalize` (divide by phi(q)^T z; not with "identity", whose denominator can vanish).

    >>> la = LinearAttention(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> la(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    rule = "linear"

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 feature_map: str = "elu+1", normalize: bool = True, qk_norm: str = "none",
                 conv_size: int = 0, output_norm: str = "none", output_gate: bool = False,
                 chunk_size: int | None = None, implementation: str = "auto",
                 norm_eps: float = 1e-6, init: str = "default", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if normalize and feature_map == "identity":
            raise ValueError("LinearAttention: `normalize`=True needs a positive `feature_map` "
                             "('elu+1' or 'relu'); with 'identity' phi(q)^T z can be 0")
        if normalize and qk_norm == "rmsnorm":
            # A learned scale can turn features negative; l2 keeps them positive.
            raise ValueError("LinearAttention: `qk_norm`='rmsnorm' can make features negative, "
                             "which `normalize`=True cannot divide by; use 'none' or 'l2'")
        self.normalize = bool(normalize)
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm=qk_norm,
                         feature_map=feature_map, conv_size=conv_size, output_norm=output_norm,
                         output_gate=output_gate, rotary=False, chunk_size=chunk_size,
                         implementation=implementation, norm_eps=norm_eps, init=init,
                         dtype=dtype, rngs=rngs)

    @property
    def state_value_dim(self) -> int:
        return self.value_dim + (1 if self.normalize else 0)

    def _memory(self, q, k, v, log_gate, beta, state, segment_ids):
        if not self.normalize:
            return super()._memory(q, k, v, log_gate, beta, state, segment_ids)
        v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        o, state = run_memory("linear", q, k, v1, state=state, scale=1.0,
                              segment_ids=segment_ids, chunk_size=self.chunk_size,
                              implementation=self.implementation)
        o = o.astype(jnp.promote_types(o.dtype, jnp.float32))
        return o[..., :-1] / (o[..., -1:] + EPS), state
