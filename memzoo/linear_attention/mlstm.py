"""The mLSTM (Beck et al., 2024, "xLSTM: Extended Long Short-Term Memory"), the "mlstm" mixer.

The cell, per head, with an exponential input gate and a sigmoid forget gate:

    C_t = f_t C_{t-1} + i_t k_t v_t^T,   n_t = f_t n_{t-1} + i_t k_t,   i_t = exp(itilde_t),
    f_t = sigmoid(ftilde_t),             h_t = C_t^T q_t / max(|n_t^T q_t|, 1)

(k carries the 1 / sqrt(head_dim)). xLSTM runs it stabilised, m_t = max(log f_t + m_{t-1},
itilde_t), C and n kept in units of exp(m_t), the floor then exp(-m_t): the same h_t, since
C / max(|n q|, exp(-m)) is exactly C^true / max(|n^true q|, 1) in any common unit.

Here (`mlstm_memory`) the cell is `pallas_kernels.chunked_linear_attention` with the scalar
log gate log f_t = logsigmoid(ftilde_t), keys scaled by exp(itilde_t - M) and the normaliser
n^T q as an extra ones column of v, in the unit exp(M) of one constant per (row, head):

    M = max(0, m_in, max_t itilde_t)    (m_in: the carried state's unit; stop-gradient)
    h_t = num_t / max(|den_t|, exp(-M))

Every exponent is <= 0, so nothing overflows for any itilde; the output equals the stabilised
recurrence (tests/memzoo/test_mlstm.py, float64). The limit is underflow, not overflow: a term's
weight exp(itilde_s + sum log f - M) below float32's ~1e-38 is lost. Terms that matter to h_t
have true weights >~ 1e-7 max(|n^T q|, 1), i.e. unit weights >~ 1e-7 exp(-M): exact to float32
rounding while M <~ 80 (itilde up to ~80), degrading (subnormal weights, then zeros, of terms
that are then <= 1e-35 of what M's token wrote) beyond. A per-chunk running max carried in the
op's state (xLSTM's chunkwise kernels) would lift that limit at the cost of a new op variant in
reference / xla / pallas; not needed for itilde in the range a trained mLSTM visits (its input
gate bias starts at ~N(0, 0.1)). The carried state is stored in units of the running m_T (the
cache's m, as xLSTM's), with m_T raised to M - 60 when forgetting has taken it further below M,
so the stored C and n stay finite; any unit is exact, only its range matters.

The block (xLSTM's mLSTM layer, "pre up-projection"): x -> up-projection to 2 * inner (inner =
proj_factor * d_model, factor 2) = [x_m, z]; x_c = SiLU(causal conv_4(x_m)); q, k from x_c and
v from x_m by block-diagonal projections (blocks of 4 channels); itilde, ftilde linear in
[q, k, v] per head (forget bias linspace(3, 6) over heads, input bias ~N(0, 0.1), weights 0);
h -> per-head layer norm (scale only) + learnable skip * x_c, times silu(z), down-projection.
No eps is added to the denominator (xLSTM's code adds 1e-6 in stabilised units, which makes its
output depend slightly on the stabiliser).

Decoding (`MLSTMCache`): [C | n] [b, heads, head_dim, head_dim + 1] and m [b, heads] float32,
the conv window, the tokens seen; `step` is the same path at T = 1 (the conv by
`causal_conv1d_update`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

import pallas_kernels
from memzoo import layers
from memzoo.attention import check_segment_ids
from memzoo.linear_attention.common import check_option, check_positive_int, normal_init
from memzoo.registry import register_mixer

# How far below M the stored unit m may fall: exp(M - m) <= exp(60) keeps C and n finite.
_UNIT_RANGE = 60.0


@struct.dataclass
class MLSTMCache:
    """state [b, heads, k, k + 1] float32: C | n in units of exp(m); m [b, heads] float32; conv
    [b, conv_size - 1, inner] float32; index int32 scalar: tokens seen."""
    state: jax.Array
    m: jax.Array
    conv: jax.Array
    index: jax.Array


def _starts(segment_ids, shape):
    if segment_ids is None:
        return jnp.zeros(shape, bool)
    return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def mlstm_memory(q, k, v, i_pre, log_f, *, state=None, m=None, segment_ids=None,
                 chunk_size=None, implementation="auto"):
    """The mLSTM cell on chunked_linear_attention (module docstring).

    q, k [b, t, h, K] (the 1/sqrt(K) is applied here); v [b, t, h, V]; i_pre (itilde), log_f
    [b, t, h] float; state [b, h, K, V + 1] (C | n) in units of exp(m), m [b, h], or both None
    (a fresh state, m = 0 as xLSTM's); segment_ids [b, t]: each document restarts from C = n = 0,
    m = 0. Returns (h [b, t, h, V] float32, final state [b, h, K, V + 1], final m [b, h]).
    """
    b, T, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    i_pre, log_f = i_pre.astype(f32), log_f.astype(f32)
    m_in = jnp.zeros((b, H), f32) if m is None else m.astype(f32)
    M = jax.lax.stop_gradient(jnp.maximum(jnp.maximum(jnp.max(i_pre, axis=1), 0.0), m_in))
    # The 1/sqrt(K) goes on the keys (xLSTM's), not the queries: a carried state then enters
    # the read unscaled, as in the recurrence.
    weight = jnp.exp(i_pre - M[:, None]) * K ** -0.5                    # <= 1 / sqrt(K)
    k_in = k * weight[..., None].astype(k.dtype)
    v_in = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    h0 = None if state is None else state.astype(f32) * jnp.exp(m_in - M)[..., None, None]
    o, s = pallas_kernels.chunked_linear_attention(
        q, k_in, v_in, log_gate=log_f, initial_state=h0, scale=1.0,
        segment_ids=segment_ids, chunk_size=chunk_size, implementation=implementation)
    o = o.astype(f32)
    den = jnp.maximum(jnp.abs(o[..., V:]), jnp.exp(-M)[:, None, :, None])
    h = o[..., :V] / den

    # The running stabiliser at the end: m_T = max(m_0 + sum log f, max_s itilde_s +
    # sum_{r>s} log f_r) over the row's last document (m_0: m_in for the row's first, else 0).
    starts = _starts(segment_ids, (b, T))
    starts_from = jnp.cumsum(starts[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]
    last_doc = starts_from - starts.astype(jnp.int32) == 0              # no start after s
    after = jnp.cumsum(log_f[:, ::-1], axis=1)[:, ::-1] - log_f         # sum_{r>s} log f_r
    written = jnp.where(last_doc[..., None], i_pre + after, -jnp.inf)
    first_run = ~jnp.any(starts, axis=1)
    m0 = jnp.where(first_run[:, None], m_in, 0.0)
    total = jnp.sum(jnp.where(last_doc[..., None], log_f, 0.0), axis=1)
    m_out = jnp.maximum(jnp.max(written, axis=1), m0 + total)
    m_out = jax.lax.stop_gradient(jnp.maximum(m_out, M - _UNIT_RANGE))
    s = s * jnp.exp(M - m_out)[..., None, None]
    return h, s, m_out


@register_mixer("mlstm")
class MLSTM(nnx.Module):
    """xLSTM's mLSTM block: [b, t, d] -> [b, t, d].

    Options: num_heads (4), proj_factor (2.0: inner = round(proj_factor * d_model), a multiple of
    num_heads and of qkv_block), conv_size (4), qkv_block (4: the block-diagonal q/k/v
    projections' block; 0: dense per head), norm_eps (1e-6), chunk_size, implementation.

    >>> mixer = MLSTM(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> mixer(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, proj_factor: float = 2.0,
                 conv_size: int = 4, qkv_block: int = 4, norm_eps: float = 1e-6,
                 chunk_size: int | None = None, implementation: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        owner = "MLSTM"
        check_positive_int(owner, "d_model", d_model)
        check_positive_int(owner, "num_heads", num_heads)
        check_positive_int(owner, "conv_size", conv_size, minimum=2)
        check_positive_int(owner, "qkv_block", qkv_block, minimum=0)
        check_option(owner, "implementation", implementation, pallas_kernels.IMPLEMENTATIONS)
        if isinstance(proj_factor, bool) or not isinstance(proj_factor, (int, float)) \
                or proj_factor <= 0:
            raise ValueError(f"{owner}: `proj_factor` must be a number > 0, got {proj_factor!r}")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"{owner}: `norm_eps` must be a number > 0, got {norm_eps!r}")
        if chunk_size is not None:
            check_positive_int(owner, "chunk_size", chunk_size)
        inner = round(proj_factor * d_model)
        if inner % num_heads:
            raise ValueError(f"{owner}: the inner width round(proj_factor * d_model) = {inner} "
                             f"must be a multiple of `num_heads`={num_heads}")
        block = qkv_block or inner // num_heads
        if inner % block:
            raise ValueError(f"{owner}: the inner width {inner} must be a multiple of "
                             f"`qkv_block`={qkv_block}")
        self.d_model, self.num_heads, self.inner = d_model, num_heads, inner
        self.head_dim = inner // num_heads
        self.conv_size, self.block, self.norm_eps = conv_size, block, float(norm_eps)
        self.chunk_size, self.implementation, self.dtype = chunk_size, implementation, dtype
        H, E, nb = num_heads, inner, inner // block
        self.w_up = normal_init(rngs, (d_model, 2 * E), d_model, ("embed", "mlp"))
        bound = 1.0 / math.sqrt(conv_size)
        self.conv_weight = layers.param(jax.random.uniform(
            rngs.params(), (conv_size, E), jnp.float32, -bound, bound), (None, "mlp"))
        self.conv_bias = layers.param(jnp.zeros((E,), jnp.float32), ("mlp",))
        self.wq, self.wk, self.wv = (normal_init(rngs, (nb, block, block), block,
                                                 ("mlp", None, None)) for _ in range(3))
        # The gates read [q, k, v] (3E) and give one pre-activation per head.
        self.w_igate = layers.param(jnp.zeros((3 * E, H), jnp.float32), ("mlp", "heads"))
        self.w_fgate = layers.param(jnp.zeros((3 * E, H), jnp.float32), ("mlp", "heads"))
        self.igate_bias = layers.param(0.1 * jax.random.normal(rngs.params(), (H,), jnp.float32),
                                       ("heads",), group="ssm_dynamics")
        self.fgate_bias = layers.param(jnp.linspace(3.0, 6.0, H, dtype=jnp.float32),
                                       ("heads",), group="ssm_dynamics")
        self.norm_scale = layers.param(jnp.ones((H, self.head_dim), jnp.float32),
                                       ("heads", "kv"))
        self.skip = layers.param(jnp.ones((E,), jnp.float32), ("mlp",))
        self.w_down = normal_init(rngs, (E, d_model), E, ("mlp", "embed"))

    def _blockwise(self, x, w):
        b, T, _ = x.shape
        xb = x.reshape(b, T, -1, self.block)
        y = jnp.einsum("btni,nij->btnj", xb, w[...].astype(x.dtype))
        return y.reshape(b, T, self.num_heads, self.head_dim)

    def _forward(self, x, cache, segment_ids, decode=False):
        b, T, _ = x.shape
        x = x.astype(self.dtype)
        up = x @ self.w_up[...].astype(self.dtype)
        x_m, z = up[..., :self.inner], up[..., self.inner:]
        w, bias = self.conv_weight[...], self.conv_bias[...]
        if decode:
            x_c, conv = pallas_kernels.causal_conv1d_update(
                x_m[:, 0], cache.conv, w, bias=bias, activation="silu")
            x_c = x_c[:, None]
        else:
            x_c, conv = pallas_kernels.causal_conv1d(
                x_m, w, bias=bias, activation="silu",
                initial_state=None if cache is None else cache.conv, segment_ids=segment_ids)
        x_c = x_c.astype(self.dtype)
        q, k = self._blockwise(x_c, self.wq), self._blockwise(x_c, self.wk)
        v = self._blockwise(x_m, self.wv)
        qkv = jnp.concatenate([q, k, v], axis=-1).reshape(b, T, 3 * self.inner)
        qkv = qkv.astype(jnp.float32)
        i_pre = qkv @ self.w_igate[...] + self.igate_bias[...][None, None]
        log_f = jax.nn.log_sigmoid(qkv @ self.w_fgate[...] + self.fgate_bias[...][None, None])
        h, state, m = mlstm_memory(
            q, k, v, i_pre, log_f, state=None if cache is None else cache.state,
            m=None if cache is None else cache.m, segment_ids=segment_ids,
            chunk_size=self.chunk_size, implementation=self.implementation)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.norm_eps) * self.norm_scale[...][None, None]
        h = h.reshape(b, T, self.inner).astype(self.dtype)
        h = (h + self.skip[...].astype(self.dtype)[None, None] * x_c) * jax.nn.silu(z)
        y = h @ self.w_down[...].astype(self.dtype)
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        return y, MLSTMCache(state, m, conv.astype(jnp.float32), index + T)

    # ---- the SequenceMixer protocol ----------------------------------------------------------
    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> MLSTMCache:
        """C = n = 0, m = 0 (xLSTM's initial stabiliser), an empty conv window. `max_len` is
        accepted and ignored."""
        del max_len
        H, K = self.num_heads, self.head_dim
        return MLSTMCache(jnp.zeros((batch_size, H, K, K + 1), jnp.float32),
                          jnp.zeros((batch_size, H), jnp.float32),
                          jnp.zeros((batch_size, self.conv_size - 1, self.inner), jnp.float32),
                          jnp.zeros((), jnp.int32))

    def step(self, x_t, cache: MLSTMCache):
        layers.check_input("MLSTM.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        y, cache = self._forward(x_t[:, None], cache, None, decode=True)
        return y[:, 0], cache

    def __call__(self, x, cache: MLSTMCache | None = None, *, segment_ids=None):
        """Parallel (chunked) form, or with `cache` the prefill that continues from it:
        (y, cache). `segment_ids` [b, t] int: the cell and the conv window restart where the id
        changes; parallel form only."""
        layers.check_input("MLSTM", "x", x, ndim=3, width=self.d_model)
        if segment_ids is not None:
            check_segment_ids("MLSTM", segment_ids, x.shape[:2])
        if cache is None:
            return self._forward(x, None, segment_ids)[0]
        if segment_ids is not None:
            raise ValueError("MLSTM: `segment_ids` applies to the parallel form only; a cache "
                             "holds one document per batch row")
        self._check_cache(cache, x.shape[0])
        return self._forward(x, cache, None)

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, self.num_heads, self.head_dim, self.head_dim + 1)
        if not isinstance(cache, MLSTMCache) or tuple(cache.state.shape) != want:
            got = tuple(cache.state.shape) if isinstance(cache, MLSTMCache) \
                else type(cache).__name__
            raise ValueError(f"MLSTM: `cache` must be an MLSTMCache with state {want} (from "
                             f"init_cache({batch})), got {got}")
