"""RetNet's multi-scale retention (Sun et al., 2023), the "retnet" mixer.

    S_t = gamma_h S_{t-1} + k_t v_t^T,   o_t = K^-1/2 S_t^T q_t,   gamma_h = 1 - 2^(-5-h)
    y = W_o (GroupNorm_heads(o) * swish(x W_G))

q and k carry rotary positions (memzoo.attention.rope). The paper writes xPos; its released
code (torchscale) rotates without xPos's extra length scaling, since the decay already bounds
what a distant token contributes, and so do we. GroupNorm over heads is a LayerNorm per head
("layernorm" output_norm, one scale/bias shared by the heads). The decay is a constant scalar
log gate log(gamma_h), one per key/value head: with GQA the query heads of a group share it.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from memzoo.linear_attention.common import LinearMemory
from memzoo.registry import register_mixer


def retention_decays(num_heads: int) -> jnp.ndarray:
    """gamma_h = 1 - 2^(-5 - h), h = 0..num_heads-1 (float32)."""
    return 1.0 - 2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))


@register_mixer("retnet")
class RetNet(LinearMemory):
    """Multi-scale retention: [b, t, d] -> [b, t, d].

    >>> ret = RetNet(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> ret(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    rule = "linear"

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 qk_norm: str = "none", conv_size: int = 0, output_norm: str = "layernorm",
                 output_gate: bool = True, rotary: bool = True, rope_base: float = 10_000.0,
                 chunk_size: int | None = None, implementation: str = "auto",
                 norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm=qk_norm,
                         feature_map="identity", conv_size=conv_size, output_norm=output_norm,
                         output_gate=output_gate, rotary=rotary, rope_base=rope_base,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=norm_eps, dtype=dtype, rngs=rngs)

    def _gates(self, x):
        b, T, _ = x.shape
        log_gamma = jnp.log(retention_decays(self.num_kv_heads))
        return jnp.broadcast_to(log_gamma[None, None], (b, T, self.num_kv_heads)), None
