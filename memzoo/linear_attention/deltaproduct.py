"""Gated DeltaProduct (Siems et al., 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs
via Householder Products"): the "gated_deltaproduct" mixer, on pallas_kernels.delta_rule.

    (state S [k, v]; the paper writes its transpose)
    per token t, n = n_householder rank-one steps j = 1 .. n with their own k_tj, v_tj, beta_tj:
        S_t0 = alpha_t S_{t-1}
        S_tj = (I - beta_tj k_tj k_tj^T) S_t(j-1) + beta_tj k_tj v_tj^T
        S_t  = S_tn
    o_t = K^-1/2 S_t^T q_t

so the token's transition alpha_t prod_j (I - beta_tj k_tj k_tj^T) is a product of n generalised
Householder matrices (rank up to n), which is what lifts DeltaNet's (n = 1) state tracking.
The scalar decay is applied once per token: log alpha_t = -exp(log_A) softplus(x W_a + dt_bias)
(Gated DeltaNet's Mamba-2 gate, log_A and the dt bias tagged "ssm_dynamics").

The recurrence is the delta rule over an interleaved sequence of length T n: micro-step (t, j)
carries k_tj, v_tj, beta_tj, the log gate log alpha_t at j = 1 and 0 after, and the query q_t at
j = n only (zero before), where the op's read (state after the step, current token included) is
o_t. Packed documents repeat each token's segment id over its micro-steps; decoding one token is
n micro-steps. k_tj are L2-normalised; beta = sigmoid(x W_b) per step, or 2 sigmoid with
`allow_neg_eigval` (reflections, as fla's option). The short convolution runs over q and every
step's k_j, v_j channels. Output: RMSNorm per head times swish(x W_g), as Gated DeltaNet.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from memzoo.linear_attention.common import check_positive_int, normal_init, run_memory
from memzoo.linear_attention.deltanet import GatedDeltaNet
from memzoo.registry import register_mixer


def interleave(x: jax.Array, n: int) -> jax.Array:
    """[b, t, n * h, ...] (step-major: index j * h + g) -> [b, t * n, h, ...], micro-step
    (t, j) at t * n + j."""
    b, T = x.shape[:2]
    x = x.reshape(b, T, n, x.shape[2] // n, *x.shape[3:])
    return x.reshape(b, T * n, *x.shape[3:])


def spread(x: jax.Array, n: int, last: bool) -> jax.Array:
    """[b, t, ...] -> [b, t * n, ...]: x at micro-step j = n - 1 (`last`) or j = 0, zeros
    elsewhere."""
    b, T = x.shape[:2]
    out = jnp.zeros((b, T, n) + x.shape[2:], x.dtype).at[:, :, n - 1 if last else 0].set(x)
    return out.reshape((b, T * n) + x.shape[2:])


@register_mixer("gated_deltaproduct")
class GatedDeltaProduct(GatedDeltaNet):
    """Gated DeltaProduct: [b, t, d] -> [b, t, d]. Gated DeltaNet's options plus
    `n_householder` (rank-one steps per token, default 2).

    >>> net = GatedDeltaProduct(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, n_householder: int = 2, num_heads: int = 4,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 value_dim: int | None = None, qk_norm: str = "l2", conv_size: int = 4,
                 output_norm: str = "rmsnorm", output_gate: bool = True,
                 chunk_size: int | None = None, implementation: str = "auto",
                 norm_eps: float = 1e-6, allow_neg_eigval: bool = False, init: str = "default",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        owner = type(self).__name__
        check_positive_int(owner, "n_householder", n_householder)
        if init != "default":
            # Mimetic init pairs one key with one query per head; n keys per head have no
            # such pairing.
            raise ValueError(f"{owner}: `init` must be 'default', got {init!r}")
        # Read by conv_channels while the base constructor sizes the short convolution.
        self.n_householder = n_householder
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm=qk_norm,
                         conv_size=conv_size, output_norm=output_norm, output_gate=output_gate,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=norm_eps, allow_neg_eigval=allow_neg_eigval, init=init,
                         dtype=dtype, rngs=rngs)
        n, G, K, V = n_householder, self.num_kv_heads, self.head_dim, self.value_dim
        # Step-major heads: index j * G + g is step j of key/value head g.
        self.wk = normal_init(rngs, (d_model, n * G, K), d_model, ("embed", "kv_heads", "kv"))
        self.wv = normal_init(rngs, (d_model, n * G, V), d_model, ("embed", "kv_heads", "kv"))
        self.beta_proj = layers.Linear(d_model, n * G, axes=("embed", "kv_heads"),
                                       use_bias=False, rngs=rngs)

    @property
    def conv_channels(self) -> int:
        n = self.n_householder
        return (self.num_heads + n * self.num_kv_heads) * self.head_dim \
            + n * self.num_kv_heads * self.value_dim

    def _mix(self, x, q, k, v, state, segment_ids):
        n = self.n_householder
        log_gate, beta = self._gates(x)
        segs = None if segment_ids is None else jnp.repeat(segment_ids, n, axis=1)
        o, state = run_memory("delta", spread(q, n, last=True), interleave(k, n),
                              interleave(v, n), log_gate=spread(log_gate, n, last=False),
                              beta=interleave(beta, n), state=state, segment_ids=segs,
                              scale=self.head_dim ** -0.5, chunk_size=self.chunk_size,
                              implementation=self.implementation)
        b, T = q.shape[:2]
        return o.reshape(b, T, n, *o.shape[2:])[:, :, n - 1], state


@register_mixer("comba")
class Comba(GatedDeltaNet):
    """Comba (Hu et al., 2025, "Comba: Improving Bilinear RNNs with Closed-loop Control"):
    [b, t, d] -> [b, t, d], on pallas_kernels.delta_rule. In fla's form (fla.layers.comba):

        (state S [k, v])
        S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T p_t)^T
            = (I - beta_t k_t p_t^T) alpha_t S_{t-1} + beta_t k_t v_t^T    (state feedback p_t)
        o_t = K^-1/2 S_t^T (q_t - D p_t)                                   (output correction)

    p_t = c k_t with the inner decay c = sigmoid(lambda) per key/value head (lambda = 1 at
    init; c = 1 without `use_inner_decay`); D per query head (`correction_factor` at init,
    no weight decay; D = 0 without `use_output_correction`). alpha_t and beta_t are Gated
    DeltaNet's (Mamba-2 decay; sigmoid beta), q, k L2-normalised after the short conv.

    With p = c k the transition is Gated DeltaNet's with beta' = c beta, so the op is the delta
    rule with beta' = c beta and v' = v / c: beta' k (v' - S'^T k)^T = beta k (v - S'^T p)^T,
    exactly, and I - c beta k k^T keeps its eigenvalues in [0, 1] (c beta in (0, 1)).
    fla L2-normalises p inside its kernel (and corrects q before normalising it), which makes
    its scalar inner decay a no-op; here p = c k_hat, so c acts.

    >>> net = Comba(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 conv_size: int = 4, output_norm: str = "rmsnorm", output_gate: bool = True,
                 use_inner_decay: bool = True, use_output_correction: bool = True,
                 correction_factor: float = 1.0, chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float = 1e-6, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        owner = type(self).__name__
        for name, value in (("use_inner_decay", use_inner_decay),
                            ("use_output_correction", use_output_correction)):
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: `{name}` must be a bool, got {value!r}")
        if isinstance(correction_factor, bool) or not isinstance(correction_factor, (int, float)):
            raise ValueError(f"{owner}: `correction_factor` must be a number, got "
                             f"{correction_factor!r}")
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm="l2",
                         conv_size=conv_size, output_norm=output_norm, output_gate=output_gate,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=norm_eps, dtype=dtype, rngs=rngs)
        self.use_inner_decay, self.use_output_correction = use_inner_decay, use_output_correction
        self.inner_decay = (layers.param(jnp.ones((self.num_kv_heads,), jnp.float32),
                                         ("kv_heads",)) if use_inner_decay else None)
        self.correction = (layers.param(jnp.full((self.num_heads,), float(correction_factor),
                                                 jnp.float32), ("heads",), weight_decay=False)
                           if use_output_correction else None)

    def _mix(self, x, q, k, v, state, segment_ids):
        log_gate, beta = self._gates(x)
        G = self.num_kv_heads
        group = self.num_heads // G
        c = (jax.nn.sigmoid(self.inner_decay[...]) if self.inner_decay is not None
             else jnp.ones((G,), jnp.float32))
        if self.correction is not None:
            p = (jnp.repeat(c, group)[None, None, :, None]
                 * jnp.repeat(k.astype(jnp.float32), group, axis=2))
            q = (q.astype(jnp.float32)
                 - self.correction[...][None, None, :, None] * p).astype(q.dtype)
        v = (v.astype(jnp.float32) / c[None, None, :, None]).astype(v.dtype)
        return run_memory("delta", q, k, v, log_gate=log_gate, beta=beta * c[None, None],
                          state=state, segment_ids=segment_ids, chunk_size=self.chunk_size,
                          implementation=self.implementation)
