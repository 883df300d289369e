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
FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "elu+1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
}
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
      feature_map               phi applied to q and k: "identity" | "elu+1" | "relu"
      conv_size                 width of a depthwise causal conv (SiLU) over q, k, v; 0: none
      output_norm               per-head "none" | "rmsnorm" | "layernorm" (group norm) on o
      output_gate               o * swish(x W_g) before the output projection
      rotary                    rotary positions on q, k (memzoo.attention.rope)
      norm_eps                  epsilon of the output norm (1e-6; checkpoints from elsewhere
                                may carry another, e.g. fla's norm_eps)
      chunk_size, implementation  passed to the op
    """

    rule = "linear"

    def __init__(self, d_model: int, *, num_heads: int, num_kv_heads: int | None,
                 head_dim: int | None, value_dim: int | None, qk_norm: str, feature_map: str,
                 conv_size: int, output_norm: str, output_gate: bool, rotary: bool,
                 rope_base: float = 10_000.0, chunk_size: int | None = None,
                 implementation: str = "auto", norm_eps: float = 1e-6, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        owner = type(self).__name__
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
        check_option(owner, "feature_map", feature_map, FEATURE_MAPS)
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
    def state_value_dim(self) -> int:
        return self.value_dim

    @property
    def state_size(self) -> int:
        """Numbers in the matrix memory per sequence: heads x k x v (the MQAR comparison axis)."""
        return self.state_heads * self.head_dim * self.state_value_dim

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
        state = jnp.zeros((batch_size, self.state_heads, self.head_dim, self.state_value_dim),
                          jnp.float32)
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
        want = (batch, self.state_heads, self.head_dim, self.state_value_dim)
        if not isinstance(cache, LinearAttentionCache) or tuple(cache.state.shape) != want:
            got = tuple(cache.state.shape) if isinstance(cache, LinearAttentionCache) \
                else type(cache).__name__
            raise ValueError(f"{type(self).__name__}: `cache` must be a LinearAttentionCache with "
                             f"state {want} (from init_cache({batch})), got {got}")
