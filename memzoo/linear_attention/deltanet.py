"""DeltaNet (Schlag et al., 2021; chunked by Yang et al., 2024) and Gated DeltaNet (Yang et al.,
2025): the "deltanet" and "gated_deltanet" mixers, on pallas_kernels.delta_rule.

    (state S [k, v]; the papers write its transpose)
    DeltaNet        S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
                        = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
    Gated DeltaNet  S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = K^-1/2 S_t^T q_t

beta_t = sigmoid(x W_b) per key/value head; q, k pass a short causal conv with SiLU (as do v)
and are L2-normalised, which keeps I - beta k k^T a contraction. Its eigenvalues are 1 (on
k's orthogonal complement) and 1 - beta_t (along k_t): with beta in (0, 1) all are in [0, 1].
`allow_neg_eigval=True` (Grazzi et al., 2025, "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues"; fla's `allow_neg_eigval`) sets beta_t = 2 sigmoid(x W_b) in (0, 2), so
1 - beta_t reaches (-1, 1): the transition can reflect (a Householder reflection at beta = 2),
which is what state tracking (parity, modular counting) needs, and still has spectral norm <= 1. Gated DeltaNet's decay is
Mamba-2's scalar per head: log alpha_t = -exp(log_A) softplus(x W_a + dt_bias), A ~ U[1, 16],
dt_bias the inverse softplus of dt ~ logU[1e-3, 1e-1] (memzoo.ssm.init, shared with Mamba-2).
log_A and the dt bias (stored as the decay projection's bias) are tagged "ssm_dynamics": no
weight decay, the SSM learning rate, as fla marks A_log and dt_bias `_no_weight_decay`.
Outputs: RMSNorm per head (DeltaNet); RMSNorm per head times swish(x W_g) (Gated DeltaNet).
`init="mimetic"` (Trockman et al., 2024): W_q W_k^T ~ I, W_v W_o ~ I and an identity short conv
at initialisation (memzoo.linear_attention.common.mimetic_projections, shared by the family).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from memzoo.linear_attention.common import LinearMemory
from memzoo.registry import register_mixer
from memzoo.ssm.init import mamba2_decay_init, mamba2_log_decay


def mamba2_decay(rngs: nnx.Rngs, d_model: int, shape, axes):
    """(log_A param `shape`, decay projection d_model -> prod(shape) whose bias is the dt
    bias), both tagged "ssm_dynamics", for log alpha = -exp(log_A) softplus(decay_proj(x))."""
    log_A, dt_bias = mamba2_decay_init(rngs.params(), shape)
    size = 1
    for n in shape:
        size *= n
    proj = layers.Linear(d_model, size, axes=("embed", axes[-1]), rngs=rngs)
    proj.bias = layers.param(dt_bias.reshape(size), axes[-1:], group="ssm_dynamics")
    return layers.param(log_A, axes, group="ssm_dynamics"), proj


@register_mixer("deltanet")
class DeltaNet(LinearMemory):
    """DeltaNet: [b, t, d] -> [b, t, d].

    >>> net = DeltaNet(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    rule = "delta"

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 qk_norm: str = "l2", conv_size: int = 4, output_norm: str = "rmsnorm",
                 output_gate: bool = False, chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float = 1e-6,
                 allow_neg_eigval: bool = False, init: str = "default", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not isinstance(allow_neg_eigval, bool):
            raise ValueError(f"{type(self).__name__}: `allow_neg_eigval` must be a bool, got "
                             f"{allow_neg_eigval!r}")
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm=qk_norm,
                         feature_map="identity", conv_size=conv_size, output_norm=output_norm,
                         output_gate=output_gate, rotary=False, chunk_size=chunk_size,
                         implementation=implementation, norm_eps=norm_eps, init=init,
                         dtype=dtype, rngs=rngs)
        self.allow_neg_eigval = allow_neg_eigval
        self.beta_proj = layers.Linear(d_model, self.num_kv_heads, axes=("embed", "kv_heads"),
                                       use_bias=False, rngs=rngs)

    def _beta(self, x):
        # The projection in float32: beta near 0 or 1 is where bfloat16 rounds hardest.
        beta = jax.nn.sigmoid(x.astype(jnp.float32) @ self.beta_proj.kernel[...])
        return 2.0 * beta if self.allow_neg_eigval else beta

    def _gates(self, x):
        return None, self._beta(x)


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: [b, t, d] -> [b, t, d].

    >>> net = GatedDeltaNet(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 qk_norm: str = "l2", conv_size: int = 4, output_norm: str = "rmsnorm",
                 output_gate: bool = True, chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float = 1e-6,
                 allow_neg_eigval: bool = False, init: str = "default", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm=qk_norm,
                         conv_size=conv_size, output_norm=output_norm, output_gate=output_gate,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=norm_eps, allow_neg_eigval=allow_neg_eigval, init=init,
                         dtype=dtype, rngs=rngs)
        self.log_A, self.decay_proj = mamba2_decay(rngs, d_model, (self.num_kv_heads,),
                                                   ("kv_heads",))

    def _gates(self, x):
        logits = self.decay_proj(x.astype(jnp.float32))
        return mamba2_log_decay(logits, self.log_A[...]), self._beta(x)
