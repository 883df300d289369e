"""RWKV-6 time mixing (Peng et al., 2024, "Eagle and Finch: RWKV with Matrix-Valued States and
Dynamic Recurrence"), the "rwkv6" mixer.

Token shift with a data-dependent lerp (ddlerp, low rank), per channel c in r, w, k, v, g:

    delta_t = x_{t-1} - x_t                       (x_{-1} = 0, and 0 across a document start)
    xx_t    = x_t + delta_t * mu_x
    m_c,t   = lambda_c + tanh(xx_t A) B_c          (A [d, 5 R] shared, B_c [R, d])
    x_c,t   = x_t + delta_t * m_c,t

the projections r = x_r W_r, k = x_k W_k, v = x_v W_v, g = x_g W_g, and a data-dependent decay
per key channel from a low-rank MLP, w_t = exp(-exp(d_t)), d_t = d_0 + tanh(x_w A_w) B_w.
Per head, with the bonus u [heads, key_dim] for the current token:

    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),    S_t = diag(w_t) S_{t-1} + k_t v_t^T
    y_t = W_o (GroupNorm_head(o_t) * silu(g_t))

The read of the previous state plus the bonus is `chunked_linear_attention(..., bonus=u)` (the
op on inputs shifted one step in time, pallas_kernels/chunked_linear_attention), with the log
decay -exp(d_t) as its vector gate and scale 1 as in the paper. The channel mixing (RWKV's
squared-ReLU FFN) is the block's MLP, not a mixer, and is not here.

Structure as fla's RWKV6Attention (fla/layers/rwkv6.py): ddlerp rank 32, decay rank 64 with a
bias, per-head group norm, silu gate, scale 1. Differences: the group norm's scale and bias are
[value_dim], shared by the heads (memzoo's per-head output norm; fla and the official code keep
one per channel); the initialisation is the official one's shape, layer-independent: mu_x and
the lambdas at 0.5 (a half shift), d_0 from -6 to -1 over the key channels (time scales from
~400 tokens down to ~3), u = 0.5 on average with a small per-channel ripple, and A, B small.

Decoding (`LinearAttentionCache`): the state [b, heads, k, v], the last input token [b, 1, d]
(the token shift's x_{t-1}, in the cache's `conv` slot) and the tokens seen. `step` is the same
forward at T = 1 from the cache.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from memzoo import layers
from memzoo.linear_attention.common import (LinearAttentionCache, LinearMemory,
                                            check_positive_int, normal_init)
from memzoo.registry import register_mixer

# The five ddlerp'd inputs, in the order of the lerp parameters' leading axis.
BRANCHES = ("r", "w", "k", "v", "g")


def token_shift(x, previous=None, segment_ids=None):
    """x_{t-1} for every t: `previous` [b, 1, d] (or 0) before the first token, 0 at a
    document's first token (segment ids [b, t])."""
    first = jnp.zeros_like(x[:, :1]) if previous is None else previous.astype(x.dtype)
    shifted = jnp.concatenate([first, x[:, :-1]], axis=1)
    if segment_ids is not None:
        start = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                                 segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        shifted = jnp.where(start[..., None], jnp.zeros_like(shifted), shifted)
    return shifted


@register_mixer("rwkv6")
class RWKV6(LinearMemory):
    """RWKV-6 (Finch) time mixing: [b, t, d] -> [b, t, d].

    Options: num_heads (4), head_dim (d_model / num_heads), value_dim (head_dim), lerp_rank (32),
    decay_rank (64), scale (1.0, the paper's; None: head_dim ** -0.5), norm_eps (1e-5, fla's
    group norm), chunk_size, implementation.

    >>> mixer = RWKV6(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> mixer(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    rule = "linear"

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 value_dim: int | None = None, lerp_rank: int = 32, decay_rank: int = 64,
                 scale: float | None = 1.0, chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float = 1e-5, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        check_positive_int("RWKV6", "lerp_rank", lerp_rank)
        check_positive_int("RWKV6", "decay_rank", decay_rank)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or scale <= 0):
            raise ValueError(f"RWKV6: `scale` must be a number > 0 or None, got {scale!r}")
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=None, head_dim=head_dim,
                         value_dim=value_dim, qk_norm="none", feature_map="identity",
                         conv_size=0, output_norm="layernorm", output_gate=True, rotary=False,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=norm_eps, dtype=dtype, rngs=rngs)
        self.lerp_rank, self.decay_rank = lerp_rank, decay_rank
        self.scale = None if scale is None else float(scale)
        H, K, D, R = self.num_heads, self.head_dim, d_model, lerp_rank
        # wq is the receptance r, wg the output gate's projection (of x_g).
        self.lerp_mu = layers.param(jnp.full((D,), 0.5, jnp.float32), ("embed",),
                                    weight_decay=False)
        self.lerp_bias = layers.param(jnp.full((len(BRANCHES), D), 0.5, jnp.float32),
                                      (None, "embed"), weight_decay=False)
        self.lerp_down = normal_init(rngs, (D, len(BRANCHES) * R), D, ("embed", None), 0.1)
        self.lerp_up = normal_init(rngs, (len(BRANCHES), R, D), R, (None, None, "embed"), 0.1)
        self.decay_down = normal_init(rngs, (D, decay_rank), D, ("embed", None), 0.1)
        self.decay_up = normal_init(rngs, (decay_rank, H, K), decay_rank,
                                    (None, "heads", "kv"), 0.1)
        channel = jnp.arange(H * K, dtype=jnp.float32) / max(H * K - 1, 1)
        self.decay_bias = layers.param((-6.0 + 5.0 * channel ** 1.35).reshape(H, K),
                                       ("heads", "kv"), group="ssm_dynamics")
        ripple = 0.1 * ((jnp.arange(H * K) + 1) % 3 - 1).astype(jnp.float32)
        self.bonus = layers.param((0.5 * (1.0 - channel) + ripple).reshape(H, K),
                                  ("heads", "kv"), weight_decay=False)

    def _ddlerp(self, x, delta):
        """The five token-shifted inputs x_c = x + delta * (lambda_c + tanh(xx A) B_c)."""
        xx = x + delta * self.lerp_mu[...].astype(x.dtype)[None, None]
        low = jnp.tanh(xx @ self.lerp_down[...].astype(x.dtype))
        low = low.reshape(*low.shape[:-1], len(BRANCHES), self.lerp_rank)
        mix = jnp.einsum("btnr,nrd->btnd", low, self.lerp_up[...].astype(x.dtype))
        mix = mix + self.lerp_bias[...].astype(x.dtype)[None, None]
        return tuple(x + delta * mix[:, :, i] for i in range(len(BRANCHES)))

    def _log_decay(self, x_w):
        """log w_t = -exp(d_t) [b, t, heads, k] float32 (d in float32: exp(exp(.)) amplifies
        bfloat16 rounding)."""
        low = jnp.tanh(x_w.astype(jnp.float32) @ self.decay_down[...])
        d = jnp.einsum("btr,rhk->bthk", low, self.decay_up[...])
        return -jnp.exp(d + self.decay_bias[...][None, None])

    def _forward(self, x, cache, segment_ids, decode: bool = False):
        del decode   # the same ops at any length: the token shift reads the cached token
        x = x.astype(self.dtype)
        T = x.shape[1]
        previous = None if cache is None else cache.conv
        delta = token_shift(x, previous, segment_ids) - x
        x_r, x_w, x_k, x_v, x_g = self._ddlerp(x, delta)
        proj = lambda xc, w: jnp.einsum("btd,dhk->bthk", xc, w[...].astype(self.dtype))
        r, k, v = proj(x_r, self.wq), proj(x_k, self.wk), proj(x_v, self.wv)
        o, state = pallas_kernels.chunked_linear_attention(
            r, k, v, log_gate=self._log_decay(x_w), bonus=self.bonus[...],
            initial_state=None if cache is None else cache.state, scale=self.scale,
            segment_ids=segment_ids, chunk_size=self.chunk_size,
            implementation=self.implementation)
        y = self._output(o, x_g)
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        return y, LinearAttentionCache(state, x[:, -1:].astype(jnp.float32), index + T)

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> LinearAttentionCache:
        """Zero state, a zero previous token (what a sequence's first token shifts in)."""
        del max_len
        state = jnp.zeros((batch_size, self.num_heads, self.head_dim, self.value_dim),
                          jnp.float32)
        return LinearAttentionCache(state, jnp.zeros((batch_size, 1, self.d_model), jnp.float32),
                                    jnp.zeros((), jnp.int32))
