"""Kimi Delta Attention (Kimi Team, 2025, "Kimi Linear: An Expressive, Efficient Attention
Architecture"): the "kda" mixer, on pallas_kernels.dplr_delta_rule.

    (state S [k, v]; the paper writes its transpose)
    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T
    o_t = K^-1/2 S_t^T q_t

Gated DeltaNet with a decay per key channel: alpha_t [k] per key/value head,
log alpha_t = -exp(log_A) softplus(f_t + dt_bias), f_t = x W_f1 W_f2 through a rank-v
bottleneck (d -> v -> heads * k), log_A one per head (A ~ U[1, 16]) and dt_bias one per
channel (the inverse softplus of dt ~ logU[1e-3, 1e-1]); both tagged "ssm_dynamics" (fla marks
them `_no_weight_decay`). beta_t = sigmoid(x W_b) per head (2 sigmoid with `allow_neg_eigval`).
q, k, v pass a short causal conv (SiLU); q and k are L2-normalised. Output: RMSNorm per head
times sigmoid(x W_g1 W_g2 + b_g), W_g through the same rank-v bottleneck (fla's KDA layer).

On the DPLR op (S_t = Diag(exp(w_t)) S_{t-1} + a_t b_t^T S_{t-1} + k'_t v_t^T):
w = log alpha, a = -beta k, b = alpha * k, k' = beta k, since
(I - beta k k^T) Diag(alpha) = Diag(alpha) - beta k (alpha * k)^T.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from memzoo import layers
from memzoo.attention import check_segment_ids
from memzoo.linear_attention.common import (LinearAttentionCache, LinearMemory,
                                            check_positive_int, l2_normalize, normal_init,
                                            repeat_heads)
from memzoo.linear_attention.rwkv6 import RWKV6, token_shift
from memzoo.registry import register_mixer
from memzoo.ssm.init import dt_bias_init, mamba2_decay_init, mamba2_log_decay


def run_dplr(q, k, v, a, b, log_decay, state, *, segment_ids, chunk_size, implementation,
             scale=None):
    """dplr_delta_rule with key/value heads broadcast to the query heads: q [b, t, H, k];
    k, a, b, log_decay [b, t, G, k]; v [b, t, G, v]; state [b, G, k, v] or None.
    Returns (o [b, t, H, v], final state [b, G, k, v] float32)."""
    group = q.shape[2] // k.shape[2]
    k, v, a, b, log_decay = (repeat_heads(x, group) for x in (k, v, a, b, log_decay))
    state = repeat_heads(state, group, axis=1)
    o, final = pallas_kernels.dplr_delta_rule(
        q, k, v, a, b, log_decay=log_decay, initial_state=state, scale=scale,
        segment_ids=segment_ids, chunk_size=chunk_size, implementation=implementation)
    return o, final[:, ::group]


@register_mixer("kda")
class KimiDeltaAttention(LinearMemory):
    """Kimi Delta Attention: [b, t, d] -> [b, t, d].

    >>> net = KimiDeltaAttention(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_dim: int | None = None,
                 conv_size: int = 4, chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float = 1e-6,
                 allow_neg_eigval: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        owner = type(self).__name__
        if not isinstance(allow_neg_eigval, bool):
            raise ValueError(f"{owner}: `allow_neg_eigval` must be a bool, got "
                             f"{allow_neg_eigval!r}")
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, qk_norm="l2",
                         feature_map="identity", conv_size=conv_size, output_norm="rmsnorm",
                         output_gate=False, rotary=False, chunk_size=chunk_size,
                         implementation=implementation, norm_eps=norm_eps, dtype=dtype,
                         rngs=rngs)
        self.allow_neg_eigval = allow_neg_eigval
        H, G, K, V = self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim
        self.beta_proj = layers.Linear(d_model, G, axes=("embed", "kv_heads"), use_bias=False,
                                       rngs=rngs)
        self.decay_down = layers.Linear(d_model, V, axes=("embed", None), use_bias=False,
                                        rngs=rngs)
        self.decay_up = layers.Linear(V, G * K, axes=(None, "kv_heads"), rngs=rngs)
        key_a, key_dt = jax.random.split(rngs.params())
        log_A, _ = mamba2_decay_init(key_a, (G,))
        self.log_A = layers.param(log_A, ("kv_heads",), group="ssm_dynamics")
        self.decay_up.bias = layers.param(dt_bias_init(key_dt, (G * K,)), ("kv_heads",),
                                          group="ssm_dynamics")
        self.gate_down = layers.Linear(d_model, V, axes=("embed", None), use_bias=False,
                                       rngs=rngs)
        self.gate_up = layers.Linear(V, H * V, axes=(None, "heads"), rngs=rngs)

    def _gates(self, x):
        """(log alpha [b, t, G, k] float32, beta [b, t, G] float32)."""
        b, T = x.shape[:2]
        x32 = x.astype(jnp.float32)
        f = self.decay_up(self.decay_down(x32)).reshape(b, T, self.num_kv_heads, self.head_dim)
        log_alpha = mamba2_log_decay(f, self.log_A[...][:, None])
        beta = jax.nn.sigmoid(x32 @ self.beta_proj.kernel[...])
        return log_alpha, 2.0 * beta if self.allow_neg_eigval else beta

    def _mix(self, x, q, k, v, state, segment_ids):
        log_alpha, beta = self._gates(x)
        k32 = k.astype(jnp.float32)
        bk = beta[..., None] * k32
        return run_dplr(q, bk.astype(k.dtype), v, -bk.astype(k.dtype),
                        (jnp.exp(log_alpha) * k32).astype(k.dtype), log_alpha, state,
                        segment_ids=segment_ids, chunk_size=self.chunk_size,
                        implementation=self.implementation)

    def _output(self, o, x):
        b, T = x.shape[:2]
        o = self.o_norm(o.astype(self.dtype))
        g = self.gate_up(self.gate_down(x)).reshape(b, T, self.num_heads, self.value_dim)
        o = o * jax.nn.sigmoid(g).astype(self.dtype)
        return jnp.einsum("bthv,hvd->btd", o.astype(self.dtype), self.wo[...].astype(self.dtype))


# RWKV-7's lerp'd inputs, in the order of `lerp_mu`'s leading axis.
RWKV7_BRANCHES = ("r", "w", "k", "v", "a", "g")
RWKV7_MAX_LOG_DECAY = -math.exp(-0.5)  # w_t in (exp(-e^-1/2), 1): fla's and the paper's bound


@register_mixer("rwkv7")
class RWKV7(LinearMemory):
    """RWKV-7 "Goose" time mixing (Peng et al., 2025, "RWKV-7 "Goose" with Expressive Dynamic
    State Evolution"): [b, t, d] -> [b, t, d], on pallas_kernels.dplr_delta_rule.

        delta_t = x_{t-1} - x_t (0 across a document start); x_c = x_t + delta_t * mu_c
        r = x_r W_r, k = x_k W_k, v = x_v W_v                       (per head)
        log w_t = -e^-1/2 sigmoid(w_0 + tanh(x_w A_w) B_w)           (decay per key channel)
        a_t = sigmoid(a_0 + x_a A_a B_a)                             (in-context learning rate)
        g_t = sigmoid(x_g A_g) B_g                                   (output gate)
        kappa_hat = L2norm(k * k_k),  k~ = k * (1 + (a - 1) * k_a)
        RWKV's row convention, state [v, k], row vectors:
            S_t = S_{t-1} (diag(w_t) - kappa_hat^T (a_t * kappa_hat)) + v_t^T k~_t
        transposed to memzoo's state [k, v] (M^T for M = kappa_hat^T (a * kappa_hat)):
            S_t = (diag(w_t) - (a_t * kappa_hat) kappa_hat^T) S_{t-1} + k~_t v_t^T
        o_t = (GroupNorm_head(S_t^T r_t) + (r_t . (r_k * k~_t)) v_t) * g_t,  y = W_o o
    value residual (`value_residual=True`, the paper's default), in every layer after the first:
        v_t <- v_t + (v1_t - v_t) * sigmoid(v_0 + x_v A_v B_v)       (v1: layer 1's v_t)

so the op's (S_t = diag(exp(w)) S + a (b^T S) + k v^T) a = -a_t * kappa_hat, b = kappa_hat,
log_decay = log w, key k~, scale 1. (fla's dplr kernels name the two the other way round: their
`a` is contracted with the state, so fla passes a = -kappa_hat, b = kappa_hat * a_t.)
Structure as fla's RWKV7Attention (fla/layers/rwkv7.py). The value residual rides in CausalLM's
side channel (memzoo.models): the first RWKV-7 layer to run writes its v there ("v_first",
per token) and every later one lerps towards it, through the layer scan and in decoding (each
token's v1 comes from layer 1 of the same step). A mixer called alone, or the first layer, is
its own v1, where the lerp is the identity (its gate LoRA then gets no gradient). Left out: the
official per-layer initialisation (here: lerps 0.5, w_0 from -6 to -1 over channels, a_0 = 0,
v_0 = 1, k_k = 0.85, k_a = 1, r_k = 0; LoRAs small). The group norm's scale and bias are
[value_dim], shared by the heads (memzoo's per-head output norm), eps head_dim * 1e-5 as fla's.

Decoding: RWKV-6's cache (state, the last input token for the shift, tokens seen).

    >>> net = RWKV7(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 value_dim: int | None = None, decay_rank: int = 32, a_rank: int = 32,
                 gate_rank: int = 64, value_residual: bool = True, value_rank: int = 16,
                 chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        for name, value in (("decay_rank", decay_rank), ("a_rank", a_rank),
                            ("gate_rank", gate_rank), ("value_rank", value_rank)):
            check_positive_int("RWKV7", name, value)
        if not isinstance(value_residual, bool):
            raise ValueError(f"RWKV7: `value_residual` must be a bool, got {value_residual!r}")
        if head_dim is None and isinstance(num_heads, int) and num_heads > 0 \
                and d_model % num_heads == 0:
            eps_dim = d_model // num_heads
        else:
            eps_dim = head_dim if isinstance(head_dim, int) else 1
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=None, head_dim=head_dim,
                         value_dim=value_dim, qk_norm="none", feature_map="identity",
                         conv_size=0, output_norm="layernorm", output_gate=False, rotary=False,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=eps_dim * 1e-5 if norm_eps is None else norm_eps,
                         dtype=dtype, rngs=rngs)
        H, K, V, D = self.num_heads, self.head_dim, self.value_dim, d_model
        self.lerp_mu = layers.param(jnp.full((len(RWKV7_BRANCHES), D), 0.5, jnp.float32),
                                    (None, "embed"), weight_decay=False)
        self.decay_down = normal_init(rngs, (D, decay_rank), D, ("embed", None), 0.1)
        self.decay_up = normal_init(rngs, (decay_rank, H, K), decay_rank,
                                    (None, "heads", "kv"), 0.1)
        channel = jnp.arange(H * K, dtype=jnp.float32) / max(H * K - 1, 1)
        self.decay_bias = layers.param((-6.0 + 5.0 * channel).reshape(H, K), ("heads", "kv"),
                                       group="ssm_dynamics")
        self.a_down = normal_init(rngs, (D, a_rank), D, ("embed", None), 0.1)
        self.a_up = normal_init(rngs, (a_rank, H, K), a_rank, (None, "heads", "kv"), 0.1)
        self.a_bias = layers.param(jnp.zeros((H, K), jnp.float32), ("heads", "kv"),
                                   weight_decay=False)
        self.gate_down = normal_init(rngs, (D, gate_rank), D, ("embed", None), 0.1)
        self.gate_up = normal_init(rngs, (gate_rank, H, V), gate_rank, (None, "heads", "kv"))
        self.k_k = layers.param(jnp.full((H, K), 0.85, jnp.float32), ("heads", "kv"),
                                weight_decay=False)
        self.k_a = layers.param(jnp.ones((H, K), jnp.float32), ("heads", "kv"),
                                weight_decay=False)
        self.r_k = layers.param(jnp.zeros((H, K), jnp.float32), ("heads", "kv"),
                                weight_decay=False)
        self.value_residual = value_residual
        if value_residual:
            self.v_down = normal_init(rngs, (D, value_rank), D, ("embed", None), 0.1)
            self.v_up = normal_init(rngs, (value_rank, H, V), value_rank,
                                    (None, "heads", "kv"), 0.1)
            self.v_bias = layers.param(jnp.ones((H, V), jnp.float32), ("heads", "kv"),
                                       weight_decay=False)

    init_cache = RWKV6.init_cache

    # ---- the residual stream's side channel (memzoo.models) ----------------------------------
    def side_channel(self, batch_size: int, length: int) -> dict:
        """Before the first layer: no v1 yet (`v_first_set` False; `v_first` its placeholder)."""
        if not self.value_residual:
            return {}
        return {"v_first": jnp.zeros((batch_size, length, self.num_heads, self.value_dim),
                                     self.dtype),
                "v_first_set": jnp.zeros((), bool)}

    def _check_side(self, owner: str, side, batch: int, length: int) -> None:
        want = (batch, length, self.num_heads, self.value_dim)
        if self.value_residual and (not isinstance(side, dict) or "v_first" not in side
                                    or tuple(side["v_first"].shape) != want
                                    or "v_first_set" not in side):
            got = ({k: tuple(getattr(v, "shape", ())) for k, v in side.items()}
                   if isinstance(side, dict) else type(side).__name__)
            raise ValueError(f"{owner}: `side` must be a dict with v_first {want} and "
                             f"v_first_set (from side_channel({batch}, {length})), got {got}")

    def _value_residual(self, x_v, v, side):
        """(v lerped towards layer 1's, the side channel after this layer)."""
        first = jnp.where(side["v_first_set"], side["v_first"].astype(v.dtype), v)
        gate = jax.nn.sigmoid(jnp.einsum("btr,rhv->bthv", x_v.astype(jnp.float32)
                                         @ self.v_down[...], self.v_up[...])
                              + self.v_bias[...][None, None])
        v32 = v.astype(jnp.float32)
        v = (v32 + (first.astype(jnp.float32) - v32) * gate).astype(v.dtype)
        return v, {**side, "v_first": first.astype(side["v_first"].dtype),
                   "v_first_set": jnp.ones((), bool)}

    def __call__(self, x, cache: LinearAttentionCache | None = None, *, segment_ids=None,
                 side=None):
        """LinearMemory's forms; with `side` (CausalLM's side channel) (their result, side)."""
        if side is None:
            return super().__call__(x, cache, segment_ids=segment_ids)
        layers.check_input("RWKV7", "x", x, ndim=3, width=self.d_model)
        self._check_side("RWKV7", side, *x.shape[:2])
        if cache is None:
            if segment_ids is not None:
                check_segment_ids("RWKV7", segment_ids, x.shape[:2])
            y, _, side = self._forward(x, None, segment_ids, side=side)
            return y, side
        if segment_ids is not None:
            raise ValueError("RWKV7: `segment_ids` applies to the parallel form only; a cache "
                             "holds one document per batch row")
        self._check_cache(cache, x.shape[0])
        y, cache, side = self._forward(x, cache, None, side=side)
        return (y, cache), side

    def step(self, x_t, cache: LinearAttentionCache, side=None):
        if side is None:
            return super().step(x_t, cache)
        layers.check_input("RWKV7.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        self._check_side("RWKV7.step", side, x_t.shape[0], 1)
        y, cache, side = self._forward(x_t[:, None], cache, None, side=side)
        return (y[:, 0], cache), side

    def _forward(self, x, cache, segment_ids, decode: bool = False, side=None):
        """(y, cache), or (y, cache, side) when a side channel is given."""
        del decode   # the same ops at any length: the token shift reads the cached token
        x = x.astype(self.dtype)
        T = x.shape[1]
        delta = token_shift(x, None if cache is None else cache.conv, segment_ids) - x
        mu = self.lerp_mu[...].astype(x.dtype)
        x_r, x_w, x_k, x_v, x_a, x_g = (x + delta * mu[i][None, None]
                                        for i in range(len(RWKV7_BRANCHES)))
        proj = lambda xc, w: jnp.einsum("btd,dhk->bthk", xc, w[...].astype(self.dtype))
        r, k, v = proj(x_r, self.wq), proj(x_k, self.wk), proj(x_v, self.wv)
        if side is not None and self.value_residual:
            v, side = self._value_residual(x_v, v, side)
        # The gates in float32: w sits in exp(exp(.))-like sensitivity, a multiplies the state.
        low = jnp.tanh(x_w.astype(jnp.float32) @ self.decay_down[...])
        log_w = RWKV7_MAX_LOG_DECAY * jax.nn.sigmoid(
            jnp.einsum("btr,rhk->bthk", low, self.decay_up[...]) + self.decay_bias[...][None, None])
        a = jax.nn.sigmoid(jnp.einsum("btr,rhk->bthk", x_a.astype(jnp.float32) @ self.a_down[...],
                                      self.a_up[...]) + self.a_bias[...][None, None])
        g = jnp.einsum("btr,rhv->bthv", jax.nn.sigmoid(x_g.astype(jnp.float32)
                                                       @ self.gate_down[...]), self.gate_up[...])
        k32 = k.astype(jnp.float32)
        kappa = l2_normalize(k32 * self.k_k[...][None, None])
        k_tilde = k32 * (1.0 + (a - 1.0) * self.k_a[...][None, None])
        o, state = run_dplr(r, k_tilde.astype(k.dtype), v, (-a * kappa).astype(k.dtype),
                            kappa.astype(k.dtype), log_w,
                            None if cache is None else cache.state, segment_ids=segment_ids,
                            chunk_size=self.chunk_size, implementation=self.implementation,
                            scale=1.0)
        bonus = jnp.sum(r.astype(jnp.float32) * k_tilde * self.r_k[...][None, None], -1,
                        keepdims=True) * v.astype(jnp.float32)
        o = (self.o_norm(o.astype(self.dtype)).astype(jnp.float32) + bonus) * g
        y = jnp.einsum("bthv,hvd->btd", o.astype(self.dtype), self.wo[...].astype(self.dtype))
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        cache = LinearAttentionCache(state, x[:, -1:].astype(jnp.float32), index + T)
        return (y, cache) if side is None else (y, cache, side)
