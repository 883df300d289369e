"""Griffin's recurrent block with the RG-LRU (De et al., 2024, "Griffin: Mixing Gated Linear
Recurrences with Local Attention for Efficient Language Models"), mixer "rglru".

    g       = GeLU(W_a x + b_a)                              [b, t, L],  L = lru_width
    u       = causal_conv1d(W_b x + b_b)                     depthwise, width 4, with a bias
    r_t     = sigmoid(W_r u_t + b_r)                         recurrence gate  } block-diagonal:
    i_t     = sigmoid(W_i u_t + b_i)                         input gate       } one block per head
    log a_t = -c softplus(Lambda) r_t                        c = 8
    h_t     = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)        at a document's first token:
                                                             h_t = i_t u_t
    out     = W_out (h * g) + b_out

The first token of a document takes i_t u_t whole rather than scaled by sqrt(1 - a_t^2): that
factor keeps the state's scale steady when h_{t-1} already carries a unit-scale history, and an
empty state has none (recurrentgemma's RGLRU, whose weights this block reads, does the same).

The convolution is `pallas_kernels.causal_conv1d` (decoding: `causal_conv1d_update`) and the
recurrence `pallas_kernels.linear_scan`, fed the decays a_t (zero at document starts) and the
inputs sqrt(1 - a_t^2) i_t u_t, both float32 whatever the compute dtype, so bfloat16 compute
never rounds a decay near 1. `step` is the same path at T=1. The cache carries, per row, the
conv window, the state and whether the row has seen a token (a fresh row's next token starts a
document); segment_ids restart both the conv window and the state where the id changes.

sqrt(1 - a^2) has an unbounded derivative as a -> 1 (a gate r_t near 0); its gradient is taken
at max(1 - a^2, 1 / (4 * 1000^2)), so it never exceeds 1000, as in recurrentgemma.

Initialisation: Lambda such that a^c (the decay at r_t = 1) is uniform in [0.9, 0.999]
(`a_init="paper"`), or recurrentgemma's ring init (`a_init="recurrentgemma"`, memzoo.ssm.init);
the gates' weights normal with variance 1 / fan-in of a block, biases 0; the convolution's
weights normal with variance 0.01 / width, bias 0. Lambda and the gate biases set the memory's
time scales: they are in the "ssm_dynamics" parameter group.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from memzoo import layers
from memzoo.registry import register_mixer
from memzoo.ssm.init import RGLRU_A_INITS, RGLRU_A_RANGE, rglru_lambda_init
from memzoo.ssm.mamba import check_positive_int, lead
from pallas_kernels import causal_conv1d, causal_conv1d_update, linear_scan

# The bound on d sqrt(x) / dx that keeps a closed recurrence gate from blowing up a gradient.
MAX_SQRT_GRADIENT = 1000.0


@jax.custom_vjp
def sqrt_bounded_gradient(x):
    """sqrt(x), whose derivative is evaluated at max(x, 1 / (4 MAX_SQRT_GRADIENT^2))."""
    return jnp.sqrt(x)


def _sqrt_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
    floor = jnp.asarray(1.0 / (4.0 * MAX_SQRT_GRADIENT ** 2), x.dtype)
    return (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, floor)),)


sqrt_bounded_gradient.defvjp(_sqrt_fwd, _sqrt_bwd)


@struct.dataclass
class RGLRUCache:
    """Decoding state: the last W-1 conv inputs [b, W-1, L] float32, the RG-LRU state [b, L]
    float32, and `started` [b] bool: whether the row has seen a token (if not, its next token
    begins a document)."""
    conv_state: jax.Array
    state: jax.Array
    started: jax.Array


class BlockDiagonalLinear(nnx.Module):
    """y = x W + b with W block-diagonal: `num_blocks` independent [n/H, n/H] maps, one per
    head. kernel [H, n/H, n/H], bias [H, n/H] (recurrentgemma's layout). The product is in
    `dtype`, the bias added in float32 and y float32: the gates' biases are time scales, which
    16-bit rounding would move."""

    def __init__(self, width: int, num_blocks: int, *, dtype=jnp.float32,
                 bias_group: str = "default", rngs: nnx.Rngs):
        size = width // num_blocks
        self.num_blocks, self.dtype = num_blocks, dtype
        self.kernel = layers.param(
            jax.random.normal(rngs.params(), (num_blocks, size, size), jnp.float32)
            * size ** -0.5, ("heads", None, None))
        self.bias = layers.param(jnp.zeros((num_blocks, size), jnp.float32), ("heads", None),
                                 group=bias_group)

    def __call__(self, x):
        xs = x.astype(self.dtype).reshape(x.shape[:-1] + (self.num_blocks, -1))
        y = jnp.einsum("...hi,hij->...hj", xs, self.kernel[...].astype(self.dtype))
        y = y.astype(jnp.promote_types(self.dtype, jnp.float32)) + lead(self.bias[...], y.ndim)
        return y.reshape(x.shape)


@register_mixer("rglru")
class RGLRU(nnx.Module):
    """Griffin's recurrent block: [b, t, d_model] -> [b, t, d_model] (module docstring).

    Options: lru_width L (None: d_model), num_heads (blocks of the gates, dividing L; 1),
    conv_width (4), c (8.0), a_init ("paper" | "recurrentgemma"), a_range ((0.9, 0.999)),
    implementation (the ops' "auto" | "xla" | "pallas" | "reference").

    >>> m = RGLRU(16, num_heads=2, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((2, 8, 16))).shape
    (2, 8, 16)
    """

    def __init__(self, d_model: int, *, lru_width: int | None = None, num_heads: int = 1,
                 conv_width: int = 4, c: float = 8.0, a_init: str = "paper",
                 a_range: tuple[float, float] = RGLRU_A_RANGE, implementation: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        owner = "RGLRU"
        L = d_model if lru_width is None else lru_width
        check_positive_int(owner, d_model=d_model, lru_width=L, num_heads=num_heads,
                           conv_width=conv_width)
        if L % num_heads:
            raise ValueError(f"{owner}: num_heads={num_heads} must divide lru_width={L}")
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0:
            raise ValueError(f"{owner}: c must be a number > 0, got {c!r}")
        if a_init not in RGLRU_A_INITS:
            raise ValueError(f"{owner}: a_init must be one of {RGLRU_A_INITS}, got {a_init!r}")
        try:
            lo, hi = (float(v) for v in a_range)
        except (TypeError, ValueError):
            raise ValueError(f"{owner}: a_range must be a pair (low, high), got {a_range!r}") \
                from None
        if not 0 < lo <= hi < 1:
            raise ValueError(f"{owner}: a_range must satisfy 0 < low <= high < 1, got {a_range!r}")
        self.d_model, self.lru_width, self.num_heads = d_model, L, num_heads
        self.conv_width, self.c = conv_width, float(c)
        self.implementation, self.dtype = implementation, dtype
        lin = dict(dtype=dtype, rngs=rngs)
        self.gate_proj = layers.Linear(d_model, L, axes=("embed", "mlp"), **lin)
        self.in_proj = layers.Linear(d_model, L, axes=("embed", "mlp"), **lin)
        self.conv_weight = layers.param(
            jax.random.normal(rngs.params(), (conv_width, L), jnp.float32)
            * (0.01 / conv_width) ** 0.5, (None, "mlp"))
        self.conv_bias = layers.param(jnp.zeros((L,), jnp.float32), ("mlp",))
        self.input_gate = BlockDiagonalLinear(L, num_heads, bias_group="ssm_dynamics", **lin)
        self.a_gate = BlockDiagonalLinear(L, num_heads, bias_group="ssm_dynamics", **lin)
        self.a_param = layers.param(
            rglru_lambda_init(rngs.params(), (L,), c=self.c, a_range=(lo, hi), kind=a_init),
            ("mlp",), group="ssm_dynamics")
        self.out_proj = layers.Linear(L, d_model, axes=("mlp", "embed"), **lin)

    def init_cache(self, batch_size: int) -> RGLRUCache:
        L = self.lru_width
        return RGLRUCache(jnp.zeros((batch_size, self.conv_width - 1, L), jnp.float32),
                          jnp.zeros((batch_size, L), jnp.float32),
                          jnp.zeros((batch_size,), bool))

    def log_decay(self, u):
        """log a_t [b, t, L] float32 from the conv output u."""
        r = jax.nn.sigmoid(self.a_gate(u))
        rate = jax.nn.softplus(self.a_param[...].astype(r.dtype))
        return -self.c * lead(rate, r.ndim) * r

    def _forward(self, x, cache, segment_ids, decode: bool = False):
        batch, length = x.shape[:2]
        gate = jax.nn.gelu(self.gate_proj(x))
        u = self.in_proj(x)
        if decode:
            u, window = causal_conv1d_update(u[:, 0], cache.conv_state, self.conv_weight[...],
                                             bias=self.conv_bias[...])
            u = u[:, None]
        else:
            u, window = causal_conv1d(u, self.conv_weight[...], bias=self.conv_bias[...],
                                      segment_ids=segment_ids,
                                      initial_state=None if cache is None else cache.conv_state,
                                      implementation=self.implementation)
        u = u.astype(self.dtype)
        log_a = self.log_decay(u)
        i = jax.nn.sigmoid(self.input_gate(u))
        # Where a document begins the state is empty: no decay, no sqrt(1 - a^2) scaling.
        first = (jnp.ones((batch, 1), bool) if cache is None
                 else jnp.logical_not(cache.started)[:, None])
        starts = first if length == 1 else jnp.concatenate(
            [first, jnp.broadcast_to(jnp.zeros((), bool), (batch, length - 1))
             if segment_ids is None else segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        starts = starts[..., None]
        a = jnp.where(starts, 0.0, jnp.exp(log_a))
        scale = jnp.where(starts, 1.0, sqrt_bounded_gradient(-jnp.expm1(2.0 * log_a)))
        b = u.astype(log_a.dtype) * i * scale
        h, last = linear_scan(a, b, initial_state=None if cache is None else cache.state,
                              implementation=self.implementation)
        out = self.out_proj(h.astype(self.dtype) * gate)
        if cache is None:
            return out, None
        return out, RGLRUCache(window.astype(jnp.float32), last.astype(jnp.float32),
                               jnp.ones_like(cache.started) if length else cache.started)

    def __call__(self, x, cache: RGLRUCache | None = None, *, segment_ids=None):
        """x [b, t, d_model]; with `cache` continue from it and return (y, cache).
        segment_ids [b, t] int: packed documents; the conv window and the state restart where
        the id changes (with a cache, token 0 continues the cache's document)."""
        layers.check_input("RGLRU", "x", x, ndim=3, width=self.d_model)
        out, new_cache = self._forward(x, cache, segment_ids)
        return out if cache is None else (out, new_cache)

    def step(self, x_t, cache: RGLRUCache):
        """One token x_t [b, d_model] -> (y_t [b, d_model], cache): the parallel path at T=1,
        the convolution through causal_conv1d_update."""
        layers.check_input("RGLRU.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        y, cache = self._forward(x_t[:, None], cache, None, decode=True)
        return y[:, 0], cache
