"""What every linear-attention memory shares: the multi-head projections, the optional short
causal convolution, feature maps and q/k normalisation, key/value heads shared across query
heads (GQA), the memory update on the shared ops, and the output norm and gate.

The family keeps a matrix state per key/value head, S [k, v], updated by one of two rules:

  "linear"  S_t = exp(g_t) S_{t-1} + k_t v_t^T                   pallas_kernels.chunked_linear_attention
  "delta"   S_t = exp(g_t) S_{t-1}
                  + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T  pallas_kernels.delta_rule

read out as o_t = scale * S_t^T q_t, with the log decay g_t <= 0 fixed (RetNet), data-dependent
(GLA, Gated DeltaNet) or absent. Each module (`LinearMemory` subclass) supplies its gates; the
path from x to y is here, once:

  x -> q, k, v projections -> [short causal conv (SiLU)] -> [feature map] -> [q/k norm]
    -> [rotary on q, k] -> memory (op) -> [per-head output norm] -> [* swish(x W_g)] -> W_o

GQA: `num_kv_heads` key/value heads, each shared by `num_heads / num_kv_heads` query heads.
Keys, values and every gate live on the key/value heads and are broadcast to the query heads
only to call the op (which wants the same number of heads for q, k, v), so the query heads of
a group keep identical states; the cache keeps one state per key/value head.

Decoding (`LinearAttentionCache`): the matrix states [b, kv heads, k, v] float32, the short
convolution's last `conv_size - 1` inputs, and the number of tokens seen (rotary positions).
`step` runs the same ops on one token (the convolution through `causal_conv1d_update`), so the
chunked and the recurrent forms share one home for their math.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

import pallas_kernels
from memzoo import layers
from memzoo.attention import check_segment_ids, rope, segment_positions

RULES = ("linear", "delta")
QK_NORMS = ("none", "l2", "rmsnorm")
OUTPUT_NORMS = ("none", "rmsnorm", "layernorm")


def _upper_products(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_i x_j for i < j, x_i^2): the distinct entries of x (x) x, [..., k(k-1)/2] and [..., k]."""
    i, j = jnp.triu_indices(x.shape[-1], 1)
    return x[..., i] * x[..., j], x * x


def taylor_features(x: jax.Array) -> jax.Array:
    """Based's 2nd-order Taylor map (Arora et al., 2024): with x' = x / k^(1/4),
    phi(x) = [1, x', x'_i^2 / sqrt 2, x'_i x'_j (i < j)], so phi(q) . phi(k) = 1 + s + s^2 / 2,
    s = q . k / sqrt(k): exp(s) to second order, positive for every s. 1 + k + k(k+1)/2
    features: the symmetric products once each (the full k^2 outer product would double the
    state for nothing)."""
    x = x * x.shape[-1] ** -0.25
    off, diag = _upper_products(x)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x, diag * 2.0 ** -0.5, off], axis=-1)


FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "elu+1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "taylor": taylor_features,
}


class RebasedFeatureMap(nnx.Module):
    """ReBased's learnable quadratic kernel (Aksenov et al., 2024, "Linear Transformers with
    Learnable Kernel Functions are Better In-Context Models"): x~ = gamma * LayerNorm(x) + beta,
    phi(x) = [x~_i^2 / sqrt k, x~_i x~_j sqrt(2 / k) (i < j)], so phi(q) . phi(k) =
    (q~ . k~)^2 / k. One gamma, beta [k] for queries and keys of every head (as fla's
    RebasedFeatureMap); gamma = 1, beta = 0 at initialisation."""

    def __init__(self, head_dim: int, *, eps: float = 1e-5):
        self.eps = eps
        self.gamma = layers.param(jnp.ones((head_dim,), jnp.float32), ("kv",))
        self.beta = layers.param(jnp.zeros((head_dim,), jnp.float32), ("kv",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        lead = (None,) * (x.ndim - 1)
        x32 = ((x32 - mu) * jax.lax.rsqrt(var + self.eps) * self.gamma[...][lead]
               + self.beta[...][lead])
        off, diag = _upper_products(x32)
        k = x.shape[-1]
        return jnp.concatenate([diag * k ** -0.5, off * (2.0 / k) ** 0.5], -1).astype(x.dtype)


class HedgehogFeatureMap(nnx.Module):
    """Hedgehog's learnable map (Zhang et al., 2024, "The Hedgehog & the Porcupine: Expressive
    Linear Attentions with Softmax Mimicry"): per head, z = x W_h + b_h and
    phi(x) = [softmax(z), softmax(-z)] (2k features, positive, each half summing to 1). W = I,
    b = 0 at initialisation (fla's init). The paper's two softmaxes; fla's HedgehogFeatureMap
    takes one softmax over [2z, -2z] instead."""

    def __init__(self, heads: int, head_dim: int, axes, *, rngs: nnx.Rngs):
        del rngs  # a deterministic init; the argument keeps every layer's signature
        self.weight = layers.param(jnp.broadcast_to(jnp.eye(head_dim, dtype=jnp.float32),
                                                    (heads, head_dim, head_dim)),
                                   (axes, "kv", None))
        self.bias = layers.param(jnp.zeros((heads, head_dim), jnp.float32), (axes, None))

    def __call__(self, x: jax.Array) -> jax.Array:
        # The softmaxes in float32: bfloat16 exponentials of small differences are coarse.
        z = jnp.einsum("bthk,hkj->bthj", x.astype(jnp.float32), self.weight[...]) \
            + self.bias[...][None, None]
        return jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1).astype(x.dtype)


LEARNED_FEATURE_MAPS = ("rebased", "hedgehog")


def feature_dim(feature_map: str, head_dim: int) -> int:
    """Features per head after `feature_map`: the state's key dimension."""
    k = head_dim
    return {"taylor": 1 + k + k * (k + 1) // 2, "rebased": k * (k + 1) // 2,
            "hedgehog": 2 * k}.get(feature_map, k)

L2_EPS = 1e-6


@struct.dataclass
class LinearAttentionCache:
    """state [b, kv heads (x memories), k, v] float32; conv [b, conv_size - 1, channels] float32
    or None without a short convolution; index int32 scalar: tokens seen."""
    state: jax.Array
    conv: jax.Array | None
    index: jax.Array


def check_option(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: `{name}` must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(owner: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an integer >= {minimum}, got {value!r}")


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    """x / sqrt(sum x^2 + eps) over the last axis, in float32 at least (bfloat16 sums drift)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def normal_init(rngs: nnx.Rngs, shape, fan_in: int, axes, scale: float = 1.0) -> nnx.Param:
    return layers.param(jax.random.normal(rngs.params(), shape, jnp.float32)
                        * (scale * fan_in ** -0.5), axes)


INITS = ("default", "mimetic")
# Trockman & Kolter (2023), "Mimetic Initialization of Self-Attention Layers": W_q W_k^T =
# MIMETIC_QK[0] Z + MIMETIC_QK[1] I and W_v W_o = MIMETIC_VO[0] Z' + MIMETIC_VO[1] I, Z ~ N(0, 1/d).
# Their values (0.7 / 0.7, 0.4 / 0.4); W_v W_o positive here (a token's read returns its value).
MIMETIC_QK = (0.7, 0.7)
MIMETIC_VO = (0.4, 0.4)


def mimetic_factors(key, d: int, cols: int, noise: float, identity: float):
    """A, B [d, cols] with A B^T = noise Z + identity I (Z ~ N(0, 1/d)) when cols >= d, else its
    best rank-`cols` approximation (SVD). The singular vectors are spread over the columns by a
    random orthogonal Q [r, cols] (r = min(d, cols), Q Q^T = I_r): A = U_r S_r^1/2 Q,
    B = V_r S_r^1/2 Q, so no head is favoured."""
    kz, kq = jax.random.split(key)
    m = noise * jax.random.normal(kz, (d, d), jnp.float32) / math.sqrt(d) \
        + identity * jnp.eye(d, dtype=jnp.float32)
    u, sv, vt = jnp.linalg.svd(m)
    r = min(d, cols)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (cols, r), jnp.float32))  # [cols, r]
    root = jnp.sqrt(sv[:r])[None, :]
    return (u[:, :r] * root) @ q.T, (vt[:r].T * root) @ q.T


def _spread_over_group(key, w, group: int, noise: float):
    """Query-side weights [groups, ...] -> [groups * group, ...]: each key/value head's factor
    shared by its `group` query heads as w / group plus noise of zero sum over the group, so the
    heads differ but their sum (what the products over heads see) is w."""
    if group == 1:
        return w
    n = noise * jax.random.normal(key, (w.shape[0], group) + w.shape[1:], jnp.float32)
    n = n - n.mean(axis=1, keepdims=True)
    return (w[:, None] / group + n).reshape((-1,) + w.shape[1:])


def mimetic_projections(m, rngs: nnx.Rngs) -> None:
    """Mimetic initialisation (Trockman et al., 2024, "Mimetic Initialization Helps State Space
    Models Learn to Recall"; the attention form of Trockman & Kolter, 2023) of a LinearMemory
    `m` in place: summed over query heads h (key/value head g(h)),

        sum_h W_q,h W_k,g(h)^T = 0.7 Z + 0.7 I      (queries start matched to their own key)
        sum_h W_v,g(h) W_o,h   = 0.4 Z' + 0.4 I     (a read returns the value's token)

    [d, d], exact when key/value heads x head_dim (value_dim) >= d_model, else the best
    approximation of that rank (the keys span no more); and the short convolution, if any, starts as the identity (weight 1 on the
    current token), as Mamba's mimetic init (memzoo/ssm/mamba.py) does, so q, k and v are the
    token's own projections."""
    d, H, G, K, V = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.value_dim
    group = H // G
    kqk, kvo, kq, ko = jax.random.split(rngs.params(), 4)
    a, b = mimetic_factors(kqk, d, G * K, *MIMETIC_QK)
    wq = _spread_over_group(kq, a.reshape(d, G, K).transpose(1, 0, 2), group,
                            MIMETIC_QK[0] / math.sqrt(d))
    m.wq[...] = wq.transpose(1, 0, 2)
    m.wk[...] = b.reshape(d, G, K)
    a, b = mimetic_factors(kvo, d, G * V, *MIMETIC_VO)
    m.wv[...] = a.reshape(d, G, V)
    m.wo[...] = _spread_over_group(ko, b.reshape(d, G, V).transpose(1, 2, 0), group,
                                   MIMETIC_VO[0] / math.sqrt(d))
    if m.conv_weight is not None:
        m.conv_weight[...] = jnp.zeros_like(m.conv_weight[...]).at[-1].set(1.0)


def repeat_heads(x: jax.Array | None, group: int, axis: int = 2):
    """Key/value head g serves query heads g*group .. g*group + group - 1."""
    if x is None or group == 1:
        return x
    return jnp.repeat(x, group, axis=axis)


def run_memory(rule: str, q, k, v, *, log_gate=None, beta=None, state=None, scale=None,
               segment_ids=None, chunk_size=None, implementation="auto"):
    """The memory update and read on the shared ops, with key/value heads broadcast.

    q [b, t, H, k]; k [b, t, G, k]; v [b, t, G, v]; log_gate [b, t, G] or [b, t, G, k];
    beta [b, t, G] (delta rule); state [b, G, k, v]: H a multiple of G.
    Returns (o [b, t, H, v], final state [b, G, k, v] float32).
    """
    H, G = q.shape[2], k.shape[2]
    group = H // G
    k, v = repeat_heads(k, group), repeat_heads(v, group)
    log_gate, beta = repeat_heads(log_gate, group), repeat_heads(beta, group)
    state = repeat_heads(state, group, axis=1)
    kw = dict(log_gate=log_gate, initial_state=state, scale=scale, segment_ids=segment_ids,
              chunk_size=chunk_size, implementation=implementation)
    if rule == "linear":
        o, final = pallas_kernels.chunked_linear_attention(q, k, v, **kw)
    else:
        o, final = pallas_kernels.delta_rule(q, k, v, beta, **kw)
    # The query heads of a group carry the same state: keep one.
    return o, final[:, ::group]


class LinearMemory(nnx.Module):
    """The common body of every linear-attention mixer: [b, t, d] -> [b, t, d].

    Subclasses set `rule` and override `_gates(x) -> (log_gate, beta)` (log_gate [b, t, G] or
    [b, t, G, k] float32 <= 0, or None; beta [b, t, G] or None), and call this constructor with
    their defaults. Options shared by the family:

      num_heads, num_kv_heads   query heads; key/value heads (a divisor; default num_heads)
      head_dim, value_dim       k and v per head (default d_model / num_heads; value_dim = head_dim)
      qk_norm                   "none" | "l2" | "rmsnorm" (per head, over k)
      feature_map               phi applied to q and k: "identity" | "elu+1" | "relu" |
                                "taylor" (Based) | "rebased" | "hedgehog" (learned); the last
                                three change the state's key dim (`feature_dim`)
      conv_size                 width of a depthwise causal conv (SiLU) over q, k, v; 0: none
      output_norm               per-head "none" | "rmsnorm" | "layernorm" (group norm) on o
      output_gate               o * swish(x W_g) before the output projection
      rotary                    rotary positions on q, k (memzoo.attention.rope)
      norm_eps                  epsilon of the output norm (1e-6; checkpoints from elsewhere
                                may carry another, e.g. fla's norm_eps)
      init                      "default" | "mimetic" (Trockman et al., 2024: W_q W_k^T ~ I,
                                W_v W_o ~ I, identity conv; `mimetic_projections`)
      chunk_size, implementation  passed to the op
    """

    rule = "linear"

    def __init__(self, d_model: int, *, num_heads: int, num_kv_heads: int | None,
                 head_dim: int | None, value_dim: int | None, qk_norm: str, feature_map: str,
                 conv_size: int, output_norm: str, output_gate: bool, rotary: bool,
                 rope_base: float = 10_000.0, chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float = 1e-6, init: str = "default",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        owner = type(self).__name__
        check_option(owner, "init", init, INITS)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"{owner}: `norm_eps` must be a number > 0, got {norm_eps!r}")
        check_positive_int(owner, "d_model", d_model)
        check_positive_int(owner, "num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int(owner, "num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{owner}: `num_heads`={num_heads} must be a multiple of "
                             f"`num_kv_heads`={num_kv_heads}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"{owner}: d_model={d_model} is not divisible by "
                                 f"`num_heads`={num_heads}; pass `head_dim`")
            head_dim = d_model // num_heads
        check_positive_int(owner, "head_dim", head_dim)
        value_dim = head_dim if value_dim is None else value_dim
        check_positive_int(owner, "value_dim", value_dim)
        check_option(owner, "qk_norm", qk_norm, QK_NORMS)
        check_option(owner, "feature_map", feature_map,
                     tuple(FEATURE_MAPS) + LEARNED_FEATURE_MAPS)
        check_option(owner, "output_norm", output_norm, OUTPUT_NORMS)
        check_option(owner, "implementation", implementation, pallas_kernels.IMPLEMENTATIONS)
        if not (isinstance(conv_size, int) and not isinstance(conv_size, bool)
                and (conv_size == 0 or conv_size >= 2)):
            raise ValueError(f"{owner}: `conv_size` must be 0 (no convolution) or an integer "
                             f">= 2, got {conv_size!r}")
        if chunk_size is not None:
            check_positive_int(owner, "chunk_size", chunk_size)
        if rotary and head_dim % 2:
            raise ValueError(f"{owner}: `rotary` needs an even `head_dim`, got {head_dim}")
        if (rotary or qk_norm == "rmsnorm") and feature_dim(feature_map, head_dim) != head_dim:
            raise ValueError(f"{owner}: `rotary` and `qk_norm`='rmsnorm' act after the feature "
                             f"map, which must then keep head_dim; got `feature_map`="
                             f"{feature_map!r}")
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim, self.value_dim = head_dim, value_dim
        self.qk_norm, self.feature_map, self.conv_size = qk_norm, feature_map, conv_size
        self.output_norm, self.output_gate, self.rotary = output_norm, output_gate, rotary
        self.rope_base, self.chunk_size, self.implementation = rope_base, chunk_size, implementation
        self.dtype = dtype

        H, G, K, V = num_heads, num_kv_heads, head_dim, value_dim
        self.wq = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wk = normal_init(rngs, (d_model, G, K), d_model, ("embed", "kv_heads", "kv"))
        self.wv = normal_init(rngs, (d_model, G, V), d_model, ("embed", "kv_heads", "kv"))
        self.wo = normal_init(rngs, (H, V, d_model), H * V, ("heads", "kv", "embed"))
        self.wg = (normal_init(rngs, (d_model, H, V), d_model, ("embed", "heads", "kv"))
                   if output_gate else None)
        # Uniform in +-1/sqrt(width), the usual fan-in init of a depthwise convolution.
        bound = 1.0 / math.sqrt(max(conv_size, 1))
        self.conv_weight = layers.param(
            jax.random.uniform(rngs.params(), (conv_size, self.conv_channels), jnp.float32,
                               -bound, bound), (None, None)) if conv_size else None
        if qk_norm == "rmsnorm":
            self.q_norm = layers.RMSNorm(K, dtype=dtype)
            self.k_norm = layers.RMSNorm(K, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.o_norm = (layers.norm(output_norm, V, dtype=dtype, rngs=rngs, epsilon=norm_eps)
                       if output_norm != "none" else None)
        self.init = init
        if init == "mimetic":  # drawn after the default init, which stays bit for bit
            mimetic_projections(self, rngs)
        # Learned feature maps: ReBased shares one between q and k, Hedgehog has one each.
        if feature_map == "rebased":
            self.phi_q = self.phi_k = RebasedFeatureMap(K)
        elif feature_map == "hedgehog":
            self.phi_q = HedgehogFeatureMap(H, K, "heads", rngs=rngs)
            self.phi_k = HedgehogFeatureMap(G, K, "kv_heads", rngs=rngs)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def conv_channels(self) -> int:
        return (self.num_heads + self.num_kv_heads) * self.head_dim \
            + self.num_kv_heads * self.value_dim

    @property
    def state_heads(self) -> int:
        """Matrix states per layer (one per key/value head; MoM: times its memories)."""
        return self.num_kv_heads

    @property
    def state_key_dim(self) -> int:
        """The state's key dimension: head_dim through the feature map."""
        return feature_dim(self.feature_map, self.head_dim)

    @property
    def state_value_dim(self) -> int:
        return self.value_dim

    @property
    def state_size(self) -> int:
        """Numbers in the matrix memory per sequence: heads x k x v (the MQAR comparison axis)."""
        return self.state_heads * self.state_key_dim * self.state_value_dim

    # ---- the pieces --------------------------------------------------------------------------
    def _gates(self, x):
        return None, None

    def _project(self, x):
        return tuple(jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
                     for w in (self.wq, self.wk, self.wv))

    def _conv(self, parts, conv_state, segment_ids, decode: bool):
        """Depthwise causal conv + SiLU over the concatenated channels of `parts` ([b, t, h, *]
        each); returns the parts and the new conv state (None without a convolution)."""
        if self.conv_weight is None:
            return parts, None
        b, T = parts[0].shape[:2]
        flat = jnp.concatenate([p.reshape(b, T, -1) for p in parts], axis=-1)
        w = self.conv_weight[...]
        if decode:
            y, new_state = pallas_kernels.causal_conv1d_update(flat[:, 0], conv_state, w,
                                                               activation="silu")
            y = y[:, None]
        else:
            y, new_state = pallas_kernels.causal_conv1d(flat, w, activation="silu",
                                                        initial_state=conv_state,
                                                        segment_ids=segment_ids)
        y = y.astype(self.dtype)
        out, start = [], 0
        for p in parts:
            n = p.shape[2] * p.shape[3]
            out.append(y[..., start:start + n].reshape(p.shape))
            start += n
        return tuple(out), new_state

    def _qk(self, q, k):
        if self.feature_map in LEARNED_FEATURE_MAPS:
            q, k = self.phi_q(q), self.phi_k(k)
        else:
            phi = FEATURE_MAPS[self.feature_map]
            q, k = phi(q), phi(k)
        if self.qk_norm == "l2":
            q, k = l2_normalize(q), l2_normalize(k)
        elif self.qk_norm == "rmsnorm":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def _positions(self, b, T, index, segment_ids):
        if segment_ids is not None:
            return segment_positions(segment_ids)
        return jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32)[None], (b, T))

    def _mix(self, x, q, k, v, state, segment_ids):
        log_gate, beta = self._gates(x)
        return self._memory(q, k, v, log_gate, beta, state, segment_ids)

    def _memory(self, q, k, v, log_gate, beta, state, segment_ids):
        return run_memory(self.rule, q, k, v, log_gate=log_gate, beta=beta, state=state,
                          segment_ids=segment_ids, chunk_size=self.chunk_size,
                          implementation=self.implementation)

    def _output(self, o, x):
        o = o.astype(self.dtype)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.wg is not None:
            g = jnp.einsum("btd,dhv->bthv", x, self.wg[...].astype(self.dtype))
            o = o * jax.nn.silu(g)
        return jnp.einsum("bthv,hvd->btd", o.astype(self.dtype), self.wo[...].astype(self.dtype))

    def _forward(self, x, cache, segment_ids, decode: bool = False):
        b, T, _ = x.shape
        x = x.astype(self.dtype)
        parts, conv_state = self._conv(self._project(x), None if cache is None else cache.conv,
                                       segment_ids, decode)
        q, k, v = parts
        q, k = self._qk(q, k)
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if self.rotary:
            pos = self._positions(b, T, index, segment_ids)
            q, k = rope(q, pos, self.rope_base), rope(k, pos, self.rope_base)
        o, state = self._mix(x, q, k, v, None if cache is None else cache.state, segment_ids)
        y = self._output(o, x)
        return y, LinearAttentionCache(state, conv_state, index + T)

    # ---- the SequenceMixer protocol ----------------------------------------------------------
    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> LinearAttentionCache:
        """The state before any token. `max_len` is accepted and ignored: the state does not
        grow with the sequence."""
        del max_len
        state = jnp.zeros((batch_size, self.state_heads, self.state_key_dim,
                           self.state_value_dim), jnp.float32)
        conv = (jnp.zeros((batch_size, self.conv_size - 1, self.conv_channels), jnp.float32)
                if self.conv_size else None)
        return LinearAttentionCache(state, conv, jnp.zeros((), jnp.int32))

    def step(self, x_t, cache: LinearAttentionCache):
        owner = type(self).__name__
        layers.check_input(f"{owner}.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        y, cache = self._forward(x_t[:, None], cache, None, decode=True)
        return y[:, 0], cache

    def __call__(self, x, cache: LinearAttentionCache | None = None, *, segment_ids=None):
        """Parallel (chunked) form, or with `cache` the prefill that continues from it:
        (y, cache). `segment_ids` [b, t] int: the state (and the conv window, and rotary
        positions) restart where the id changes; parallel form only."""
        owner = type(self).__name__
        layers.check_input(owner, "x", x, ndim=3, width=self.d_model)
        if segment_ids is not None:
            check_segment_ids(owner, segment_ids, x.shape[:2])
        if cache is None:
            return self._forward(x, None, segment_ids)[0]
        if segment_ids is not None:
            raise ValueError(f"{owner}: `segment_ids` applies to the parallel form only; a "
                             "cache holds one document per batch row")
        self._check_cache(cache, x.shape[0])
        return self._forward(x, cache, None)

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, self.state_heads, self.state_key_dim, self.state_value_dim)
        if not isinstance(cache, LinearAttentionCache) or tuple(cache.state.shape) != want:
            got = tuple(cache.state.shape) if isinstance(cache, LinearAttentionCache) \
                else type(cache).__name__
            raise ValueError(f"{type(self).__name__}: `cache` must be a LinearAttentionCache with "
                             f"state {want} (from init_cache({batch})), got {got}")
