"""The sLSTM (Beck et al., 2024, "xLSTM: Extended Long Short-Term Memory", section 2.2), the
"slstm" mixer: a scalar-memory LSTM with exponential gating and memory mixing.

The cell, per unit, with pre-activations from the input and from h_{t-1} through block-diagonal
recurrent weights R (one [head_dim, head_dim] block per head and gate: memory mixes within a
head, not across heads):

    itilde, ftilde, ztilde, otilde = W x_t + R h_{t-1} + b     (b_i = 0, see below)
    c_t = f_t c_{t-1} + i_t z_t,   n_t = f_t n_{t-1} + i_t,   h_t = o_t c_t / n_t
    z_t = tanh(ztilde),  i_t = exp(itilde),  o_t = sigmoid(otilde),
    f_t = sigmoid(ftilde)  (forget_gate="sigmoid")  or  exp(ftilde)  (forget_gate="exp")

run stabilised (the paper's eqs. 15-17): m_t = max(log f_t + m_{t-1}, itilde_t),
i'_t = exp(itilde_t - m_t), f'_t = exp(log f_t + m_{t-1} - m_t), c and n kept in units of
exp(m_t). h_t = o_t c_t / n_t does not depend on the unit, so m carries no gradient
(stop_gradient: exact, and no max() subgradients). An empty state (n = 0: a fresh cache or a
document's first token) takes m_t = itilde_t, f'_t = 0 (xLSTM's code does the same); then
n_t >= 1 for every later token (each step either writes i' = 1 or keeps f' = 1), so c / n
never divides by zero and nothing overflows for any itilde.

The recurrence is nonlinear (h_{t-1} feeds the gates), so there is no parallel or chunked form:
`slstm_scan` runs `slstm_step`, the one home of the cell, over time in a lax.scan, float32
whatever the compute dtype; decoding is the same scan at T = 1.

The block (the paper's Figure 10, sLSTM block with post up-projection, for a pre-norm residual
stream): x -> causal conv_4 + swish -> i, f gate inputs; x -> z, o gate inputs; each gate's
input projection block-diagonal with num_heads blocks; the cell; a group norm per head (layer
norm over head_dim, scale only); then a gated MLP d -> round(mlp_factor d) -> d with GeLU
(mlp_factor 4/3; 0: none, the cell's normed output is the block's output).

Where this simplifies or departs from the paper / xLSTM's code:
- The MLP sits inside the mixer in the same residual branch, as in Figure 10; xLSTM's code runs
  it as a second residual branch with its own LayerNorm (model.mixer="slstm" with mlp_ratio > 0
  and mlp_factor=0 gives that layout with the model's own MLP).
- Initialisation: gate projections normal with variance 1 / head_dim (xLSTM: small_init), R
  zero (as xLSTM's default), z/o biases zero, forget biases linspace(3, 6) over the units
  (xLSTM: a power law per head); no dropout; the MLP's width is not rounded to a multiple of 64.
- No input-gate bias b_i: h_t is invariant to adding a constant to every itilde of a document
  (i_t scales c and n alike, and the stabiliser absorbs it), so b_i is a parameter with an
  exactly zero gradient (xLSTM's code carries one; it never trains).

Decoding (`SLSTMCache`): c, n, m, h [b, heads, head_dim] float32 and the conv window; packed
documents (segment_ids) restart the conv window and the cell (c = n = h = 0) where the id
changes; with a cache, token 0 continues the cache's document.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

import pallas_kernels
from memzoo import layers
from memzoo.attention import check_segment_ids
from memzoo.linear_attention.common import check_option, check_positive_int
from memzoo.registry import register_mixer

FORGET_GATES = ("sigmoid", "exp")
GATES = 4   # i, f, z, o: the order of the pre-activations and of R's leading axis


@struct.dataclass
class SLSTMCache:
    """c, n (in units of exp(m)), m, h: [b, heads, head_dim] float32; conv [b, conv_size - 1,
    d_model] float32: the last inputs of the conv feeding the i and f gates."""
    c: jax.Array
    n: jax.Array
    m: jax.Array
    h: jax.Array
    conv: jax.Array


def slstm_step(carry, pre, recurrent, *, forget_gate: str = "sigmoid", reset=None):
    """One token of the stabilised sLSTM cell (module docstring).

    carry: (c, n, m, h) [b, H, P]; pre [b, 4, H, P]: W x_t + b for (i, f, z, o); recurrent
    [4, H, P, P] (R, h_{t-1} @ R[g, head]); reset [b] bool or None: the token begins a document
    (c = n = h = 0 first). Returns the new carry; its h is the cell's output.
    """
    c, n, m, h = carry
    if reset is not None:
        keep = jnp.logical_not(reset)[:, None, None].astype(c.dtype)
        c, n, h = c * keep, n * keep, h * keep
    raw = pre + jnp.einsum("bhp,ghpq->bghq", h, recurrent.astype(h.dtype))
    i_raw, f_raw, z_raw, o_raw = (raw[:, g] for g in range(GATES))
    log_f = jax.nn.log_sigmoid(f_raw) if forget_gate == "sigmoid" else f_raw
    empty = n == 0
    m_new = jax.lax.stop_gradient(jnp.where(empty, i_raw, jnp.maximum(log_f + m, i_raw)))
    f_s = jnp.where(empty, 0.0, jnp.exp(log_f + m - m_new))
    i_s = jnp.exp(i_raw - m_new)
    c = f_s * c + i_s * jnp.tanh(z_raw)
    n = f_s * n + i_s
    h = jax.nn.sigmoid(o_raw) * c / n
    return c, n, m_new, h


def slstm_scan(pre, recurrent, carry=None, *, forget_gate: str = "sigmoid", starts=None):
    """The cell over time: pre [b, t, 4, H, P] -> (h [b, t, H, P], final carry (c, n, m, h)).

    Arithmetic in float32 at least (float64 stays float64). carry None: the empty state.
    starts [b, t] bool or None: where a document begins.
    """
    b, T, _, H, P = pre.shape
    dtype = jnp.promote_types(pre.dtype, jnp.float32)
    pre = pre.astype(dtype)
    if carry is None:
        carry = tuple(jnp.zeros((b, H, P), dtype) for _ in range(4))
    carry = tuple(x.astype(dtype) for x in carry)
    if starts is None:
        starts = jnp.zeros((b, T), bool)

    def body(carry, xs):
        pre_t, reset_t = xs
        carry = slstm_step(carry, pre_t, recurrent, forget_gate=forget_gate, reset=reset_t)
        return carry, carry[3]

    carry, h = jax.lax.scan(body, carry, (jnp.swapaxes(pre, 0, 1), jnp.swapaxes(starts, 0, 1)))
    return jnp.swapaxes(h, 0, 1), carry


@register_mixer("slstm")
class SLSTM(nnx.Module):
    """xLSTM's sLSTM block: [b, t, d] -> [b, t, d] (module docstring).

    Options: num_heads (4; divides d_model), conv_size (4), forget_gate ("sigmoid" | "exp"),
    mlp_factor (4/3; 0: no MLP), norm_eps (1e-6).

    >>> mixer = SLSTM(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> mixer(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, conv_size: int = 4,
                 forget_gate: str = "sigmoid", mlp_factor: float = 4 / 3,
                 norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        owner = "SLSTM"
        check_positive_int(owner, "d_model", d_model)
        check_positive_int(owner, "num_heads", num_heads)
        check_positive_int(owner, "conv_size", conv_size, minimum=2)
        check_option(owner, "forget_gate", forget_gate, FORGET_GATES)
        if d_model % num_heads:
            raise ValueError(f"{owner}: `num_heads`={num_heads} must divide d_model={d_model}")
        if isinstance(mlp_factor, bool) or not isinstance(mlp_factor, (int, float)) \
                or mlp_factor < 0:
            raise ValueError(f"{owner}: `mlp_factor` must be a number >= 0 (0: no MLP), got "
                             f"{mlp_factor!r}")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"{owner}: `norm_eps` must be a number > 0, got {norm_eps!r}")
        H, P = num_heads, d_model // num_heads
        self.d_model, self.num_heads, self.head_dim = d_model, H, P
        self.conv_size, self.forget_gate = conv_size, forget_gate
        self.norm_eps, self.dtype = float(norm_eps), dtype
        bound = 1.0 / math.sqrt(conv_size)
        self.conv_weight = layers.param(jax.random.uniform(
            rngs.params(), (conv_size, d_model), jnp.float32, -bound, bound), (None, "embed"))
        self.conv_bias = layers.param(jnp.zeros((d_model,), jnp.float32), ("embed",))
        # W for (i, f, z, o), block-diagonal: [gate, head, P_in, P_out].
        self.w_gates = layers.param(
            jax.random.normal(rngs.params(), (GATES, H, P, P), jnp.float32) * P ** -0.5,
            (None, "heads", None, None))
        # No input-gate bias: h = o c / n is invariant to a constant added to every itilde of a
        # document (exp(itilde) scales both c and n), so b_i would get a zero gradient.
        self.fgate_bias = layers.param(
            jnp.linspace(3.0, 6.0, d_model, dtype=jnp.float32).reshape(H, P), ("heads", None),
            group="ssm_dynamics")
        self.zo_bias = layers.param(jnp.zeros((2, H, P), jnp.float32), (None, "heads", None))
        self.recurrent = layers.param(jnp.zeros((GATES, H, P, P), jnp.float32),
                                      (None, "heads", None, None))
        self.norm_scale = layers.param(jnp.ones((H, P), jnp.float32), ("heads", "kv"))
        # GeLU: the exact (erf) one, as xLSTM's (PyTorch's default).
        self.mlp = layers.MLP(d_model, max(1, round(mlp_factor * d_model)),
                              activation="gelu_exact", gated=True, use_bias=False, dtype=dtype,
                              rngs=rngs) if mlp_factor else None

    def _gate_inputs(self, x, cache, segment_ids, decode):
        """W x + b for (i, f, z, o): [b, t, 4, H, P] float32, and the conv window after x."""
        b, T, _ = x.shape
        w, bias = self.conv_weight[...], self.conv_bias[...]
        if decode:
            x_c, conv = pallas_kernels.causal_conv1d_update(x[:, 0], cache.conv, w, bias=bias,
                                                            activation="silu")
            x_c = x_c[:, None]
        else:
            x_c, conv = pallas_kernels.causal_conv1d(
                x, w, bias=bias, activation="silu", segment_ids=segment_ids,
                initial_state=None if cache is None else cache.conv)
        H, P = self.num_heads, self.head_dim
        w = self.w_gates[...].astype(self.dtype)
        heads = lambda u: u.astype(self.dtype).reshape(b, T, H, P)
        pre = jnp.concatenate([jnp.einsum("bthp,ghpq->btghq", heads(x_c), w[:2]),
                               jnp.einsum("bthp,ghpq->btghq", heads(x), w[2:])], axis=2)
        bias = jnp.concatenate([jnp.zeros((1, H, P), jnp.float32), self.fgate_bias[...][None],
                                self.zo_bias[...]], axis=0)
        return pre.astype(jnp.float32) + bias[None, None], conv

    def _forward(self, x, cache, segment_ids, decode=False):
        b, T, _ = x.shape
        x = x.astype(self.dtype)
        pre, conv = self._gate_inputs(x, cache, segment_ids, decode)
        starts = None
        if segment_ids is not None:
            starts = jnp.concatenate([jnp.zeros((b, 1), bool),
                                      segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        carry = None if cache is None else (cache.c, cache.n, cache.m, cache.h)
        h, (c, n, m, h_last) = slstm_scan(pre, self.recurrent[...], carry,
                                          forget_gate=self.forget_gate, starts=starts)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        y = (h - mean) * jax.lax.rsqrt(var + self.norm_eps) * self.norm_scale[...][None, None]
        y = y.reshape(b, T, self.d_model).astype(self.dtype)
        if self.mlp is not None:
            y = self.mlp(y)
        f32 = jnp.float32
        return y, SLSTMCache(c.astype(f32), n.astype(f32), m.astype(f32), h_last.astype(f32),
                             conv.astype(f32))

    # ---- the SequenceMixer protocol ----------------------------------------------------------
    def init_cache(self, batch_size: int) -> SLSTMCache:
        """The empty state (n = 0: the next token starts a document) and an empty conv window."""
        zeros = jnp.zeros((batch_size, self.num_heads, self.head_dim), jnp.float32)
        return SLSTMCache(zeros, zeros, zeros, zeros,
                          jnp.zeros((batch_size, self.conv_size - 1, self.d_model), jnp.float32))

    def step(self, x_t, cache: SLSTMCache):
        """One token x_t [b, d_model] -> (y_t, cache): the same scan at T = 1."""
        layers.check_input("SLSTM.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        y, cache = self._forward(x_t[:, None], cache, None, decode=True)
        return y[:, 0], cache

    def __call__(self, x, cache: SLSTMCache | None = None, *, segment_ids=None):
        """x [b, t, d_model]; with `cache` continue from it and return (y, cache).
        segment_ids [b, t] int: packed documents; the conv window and the cell restart where
        the id changes (with a cache, token 0 continues the cache's document)."""
        layers.check_input("SLSTM", "x", x, ndim=3, width=self.d_model)
        if segment_ids is not None:
            check_segment_ids("SLSTM", segment_ids, x.shape[:2])
        if cache is not None:
            self._check_cache(cache, x.shape[0])
        y, new_cache = self._forward(x, cache, segment_ids)
        return y if cache is None else (y, new_cache)

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, self.num_heads, self.head_dim)
        if not isinstance(cache, SLSTMCache) or tuple(cache.c.shape) != want:
            got = tuple(cache.c.shape) if isinstance(cache, SLSTMCache) \
                else type(cache).__name__
            raise ValueError(f"SLSTM: `cache` must be an SLSTMCache with states {want} (from "
                             f"init_cache({batch})), got {got}")
