"""HGRN (Qin et al., 2023, "Hierarchically Gated Recurrent Neural Network for Sequence
Modeling") and HGRN-2 (Qin et al., 2024, "HGRN2: Gated Linear RNNs with State Expansion"): the
"hgrn" and "hgrn2" mixers.

HGRN, an elementwise gated linear recurrence over L = expand_ratio * d channels, on
pallas_kernels.linear_scan:

    f_t = gamma + (1 - gamma) sigmoid(x_t W_f + b_f)       forget gate, lower bound gamma
    c_t = silu(x_t W_i)
    h_t = f_t * h_{t-1} + (1 - f_t) * c_t
    y_t = W_o (RMSNorm(h_t) * silu(x_t W_g))

HGRN-2 expands the state by an outer product: per head, a forget gate f_t in (0, 1)^K with the
same lower bound, the input gate tied to it (k_t = 1 - f_t), the query q_t = silu(x_t W_q) (the
HGRN output gate in the role of a query) and the head's slice of x_t W_i as value:

    S_t = diag(f_t) S_{t-1} + (1 - f_t) v_t^T,   o_t = K^-1/2 S_t^T q_t
    y_t = W_o (RMSNorm_head(o_t) [* silu(x_t W_g)])

which is gated linear attention with the vector log gate log f_t, on
pallas_kernels.chunked_linear_attention (common.LinearMemory).

The lower bound: the papers learn one per layer, increasing with depth (a cumulative softmax
over the layers of a model; the first layer's is 0), which a stand-alone mixer cannot see; here
it is the constructor option `lower_bound` in [0, 1), a constant, so a model can pass each
layer its own. log f = logaddexp(log gamma, log(1 - gamma) + logsigmoid(.)) keeps it in log
space, as fla does. The gate bias b_f (zero at initialisation; fla's projections have none)
sets the forgetting time scale as GLA's gate bias does: tagged "ssm_dynamics". HGRN's paper
recurrence is complex-valued; fla's (and this) is the real one. fla's HGRN-2 normalises the
output over all heads together and has no output gate; here the norm is per head (the
family's) and `output_gate` is an option, off by default.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

import pallas_kernels
from memzoo import layers
from memzoo.attention import check_segment_ids
from memzoo.linear_attention.common import LinearMemory, check_positive_int, normal_init
from memzoo.registry import register_mixer


def check_lower_bound(owner: str, lower_bound) -> float:
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)) \
            or not 0.0 <= lower_bound < 1.0:
        raise ValueError(f"{owner}: `lower_bound` must be a number in [0, 1), got "
                         f"{lower_bound!r}")
    return float(lower_bound)


def bounded_log_forget(logits: jax.Array, lower_bound: float) -> jax.Array:
    """log f, f = gamma + (1 - gamma) sigmoid(logits), in float32 (log space throughout: f near
    1 is the slow memory, which 1 - f in linear space would round away)."""
    log_f = jax.nn.log_sigmoid(logits.astype(jnp.float32))
    if lower_bound == 0.0:
        return log_f
    return jnp.logaddexp(math.log(lower_bound), math.log1p(-lower_bound) + log_f)


@struct.dataclass
class HGRNCache:
    """state [b, L] float32: h after the tokens seen."""
    state: jax.Array


@register_mixer("hgrn")
class HGRN(nnx.Module):
    """HGRN's gated linear recurrent layer: [b, t, d] -> [b, t, d] (module docstring).

    Options: `expand_ratio` (1; L = expand_ratio * d_model channels), `lower_bound` (0.0),
    `norm_eps` (1e-5, fla's), `implementation` (linear_scan's).

    >>> m = HGRN(8, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, expand_ratio: int = 1, lower_bound: float = 0.0,
                 norm_eps: float = 1e-5, implementation: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        owner = "HGRN"
        check_positive_int(owner, "d_model", d_model)
        check_positive_int(owner, "expand_ratio", expand_ratio)
        self.lower_bound = check_lower_bound(owner, lower_bound)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"{owner}: `norm_eps` must be a number > 0, got {norm_eps!r}")
        if implementation not in pallas_kernels.IMPLEMENTATIONS:
            raise ValueError(f"{owner}: `implementation` must be one of "
                             f"{pallas_kernels.IMPLEMENTATIONS}, got {implementation!r}")
        L = d_model * expand_ratio
        self.d_model, self.width, self.expand_ratio = d_model, L, expand_ratio
        self.implementation, self.dtype = implementation, dtype
        self.w_i = normal_init(rngs, (d_model, L), d_model, ("embed", "mlp"))
        self.w_f = normal_init(rngs, (d_model, L), d_model, ("embed", "mlp"))
        self.w_g = normal_init(rngs, (d_model, L), d_model, ("embed", "mlp"))
        self.forget_bias = layers.param(jnp.zeros((L,), jnp.float32), ("mlp",),
                                        group="ssm_dynamics")
        self.norm = layers.RMSNorm(L, epsilon=norm_eps, dtype=dtype)
        self.w_o = normal_init(rngs, (L, d_model), L, ("mlp", "embed"))

    def init_cache(self, batch_size: int) -> HGRNCache:
        return HGRNCache(jnp.zeros((batch_size, self.width), jnp.float32))

    def _forward(self, x, cache, segment_ids):
        x = x.astype(self.dtype)
        # The forget logits in float32: the gate near 1 is where bfloat16 rounds hardest.
        logits = x.astype(jnp.float32) @ self.w_f[...] + self.forget_bias[...][None, None]
        log_f = bounded_log_forget(logits, self.lower_bound)
        c = jax.nn.silu(x @ self.w_i[...].astype(self.dtype)).astype(jnp.float32)
        h, last = pallas_kernels.linear_scan(
            jnp.exp(log_f), -jnp.expm1(log_f) * c,
            initial_state=None if cache is None else cache.state, segment_ids=segment_ids,
            implementation=self.implementation)
        g = jax.nn.silu(x @ self.w_g[...].astype(self.dtype))
        y = (self.norm(h.astype(self.dtype)) * g) @ self.w_o[...].astype(self.dtype)
        return y, HGRNCache(last.astype(jnp.float32))

    def __call__(self, x, cache: HGRNCache | None = None, *, segment_ids=None):
        """Parallel form (one linear_scan), or with `cache` the prefill that continues from it:
        (y, cache). `segment_ids` [b, t] int: the state restarts where the id changes;
        parallel form only."""
        layers.check_input("HGRN", "x", x, ndim=3, width=self.d_model)
        if segment_ids is not None:
            check_segment_ids("HGRN", segment_ids, x.shape[:2])
        if cache is None:
            return self._forward(x, None, segment_ids)[0]
        if segment_ids is not None:
            raise ValueError("HGRN: `segment_ids` applies to the parallel form only; a cache "
                             "holds one document per batch row")
        self._check_cache(cache, x.shape[0])
        return self._forward(x, cache, None)

    def step(self, x_t, cache: HGRNCache):
        layers.check_input("HGRN.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        y, cache = self._forward(x_t[:, None], cache, None)
        return y[:, 0], cache

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, self.width)
        if not isinstance(cache, HGRNCache) or tuple(cache.state.shape) != want:
            got = tuple(cache.state.shape) if isinstance(cache, HGRNCache) \
                else type(cache).__name__
            raise ValueError(f"HGRN: `cache` must be an HGRNCache with state {want} (from "
                             f"init_cache({batch})), got {got}")


@register_mixer("hgrn2")
class HGRN2(LinearMemory):
    """HGRN-2: [b, t, d] -> [b, t, d] (module docstring). The family's key projection wk is the
    forget gate's (k_t = 1 - f_t is derived from it); the feature map acts on q alone (SiLU).

    Options beyond `LinearMemory`'s: `expand_ratio` (the state's key dim per head, K; default
    head_dim = d_model / num_heads), `lower_bound` (0.0).

    >>> m = HGRN2(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    rule = "linear"

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 expand_ratio: int | None = None, value_dim: int | None = None,
                 lower_bound: float = 0.0, conv_size: int = 0, output_norm: str = "rmsnorm",
                 output_gate: bool = False, chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float = 1e-5, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.lower_bound = check_lower_bound("HGRN2", lower_bound)
        if value_dim is None and isinstance(num_heads, int) and num_heads > 0 \
                and d_model % num_heads == 0:
            value_dim = d_model // num_heads
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=expand_ratio, value_dim=value_dim, qk_norm="none",
                         feature_map="identity", conv_size=conv_size, output_norm=output_norm,
                         output_gate=output_gate, rotary=False, chunk_size=chunk_size,
                         implementation=implementation, norm_eps=norm_eps, dtype=dtype,
                         rngs=rngs)
        self.forget_bias = layers.param(jnp.zeros((self.num_kv_heads, self.head_dim),
                                                  jnp.float32), ("kv_heads", "kv"),
                                        group="ssm_dynamics")

    def _project(self, x):
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(self.dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(self.dtype))
        # The forget logits in float32 (see GLA's gate).
        f = jnp.einsum("btd,dhk->bthk", x.astype(jnp.float32), self.wk[...])
        return q, f, v

    def _qk(self, q, f):
        return jax.nn.silu(q), f

    def _mix(self, x, q, f, v, state, segment_ids):
        log_f = bounded_log_forget(f.astype(jnp.float32) + self.forget_bias[...][None, None],
                                   self.lower_bound)
        k = (-jnp.expm1(log_f)).astype(q.dtype)
        return self._memory(q, k, v, log_f, None, state, segment_ids)
