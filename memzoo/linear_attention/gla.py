"""Gated linear attention (Yang et al., 2024), the "gla" mixer.

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = K^-1/2 S_t^T q_t
    alpha_t = sigmoid(W_2 W_1 x_t + b)^(1/16)   (low rank 16; log alpha = logsigmoid(.) / 16)
    y = W_o (RMSNorm_head(o) * swish(x W_r))

The gate is a vector over the key dimension per key/value head, the op's [b, t, h, k] log gate.
The temperature 16 keeps alpha near 1 at initialisation (slow forgetting), as in the paper.
The gate bias b sets the forgetting time scale as a dt bias does, so it is tagged
"ssm_dynamics" (no weight decay, the SSM learning rate).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from memzoo.linear_attention.common import LinearMemory, check_positive_int, normal_init
from memzoo.registry import register_mixer


@register_mixer("gla")
class GLA(LinearMemory):
    """Gated linear attention: [b, t, d] -> [b, t, d].

    Options beyond `LinearMemory`'s: `gate_rank` (16), `gate_temperature` (16).

    >>> gla = GLA(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> gla(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    rule = "linear"

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 gate_rank: int = 16, gate_temperature: float = 16.0, qk_norm: str = "none",
                 feature_map: str = "identity", conv_size: int = 0,
                 output_norm: str = "rmsnorm", output_gate: bool = True,
                 chunk_size: int | None = None, implementation: str = "auto",
                 norm_eps: float = 1e-6, init: str = "default", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        check_positive_int("GLA", "gate_rank", gate_rank)
        if not isinstance(gate_temperature, (int, float)) or gate_temperature <= 0:
            raise ValueError(f"GLA: `gate_temperature` must be a number > 0, "
                             f"got {gate_temperature!r}")
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm=qk_norm,
                         feature_map=feature_map, conv_size=conv_size, output_norm=output_norm,
                         output_gate=output_gate, rotary=False, chunk_size=chunk_size,
                         implementation=implementation, norm_eps=norm_eps, init=init,
                         dtype=dtype, rngs=rngs)
        self.gate_rank, self.gate_temperature = gate_rank, float(gate_temperature)
        G, K = self.num_kv_heads, self.head_dim
        self.gate_down = normal_init(rngs, (d_model, gate_rank), d_model, ("embed", None))
        self.gate_up = normal_init(rngs, (gate_rank, G, K), gate_rank, (None, "kv_heads", "kv"))
        self.gate_bias = layers.param(jnp.zeros((G, K), jnp.float32), ("kv_heads", "kv"),
                                      group="ssm_dynamics")

    def _gates(self, x):
        # Gate logits in float32: logsigmoid / 16 of a bfloat16 logit loses the slow decays.
        x32 = x.astype(jnp.float32)
        low = x32 @ self.gate_down[...]
        logits = jnp.einsum("btr,rhk->bthk", low, self.gate_up[...])
        logits = logits + jnp.broadcast_to(self.gate_bias[...], logits.shape)
        return jax.nn.log_sigmoid(logits) / self.gate_temperature, None
