"""Mamba-2 (Dao and Gu, 2024): the SSD block, mixer "mamba2".

    z, xBC, dt = in_proj(u)            z, x [E = expand * d_model]; B, C [G, N]; dt [H]
    x, B, C    = silu(causal_conv1d(xBC))                  one depthwise conv over (x, B, C)
    dt         = softplus(dt + dt_bias)                    [H], optionally clipped to dt_limit
    per head h (P = head_dim channels; group g = h // (H / G) supplies B, C):
      S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T       S [N, P], A_h = -exp(A_log_h) scalar
      y_t = S_t^T C_t + D_h x_t
    out        = out_proj(rmsnorm(y * silu(z)))           gated RMSNorm per group of E / G
                                                           channels (norm_before_gate=False)

The recurrence is linear attention with a scalar decay per head, so it runs on
`pallas_kernels.chunked_linear_attention` (the SSD chunked algorithm): queries C, keys B
(broadcast from groups to heads), values dt * x, log gate dt * A, scale 1. Decoding (`step`) is
the same path on one token: `causal_conv1d_update`, then the op at T=1 from the cached state.
`segment_ids` reach the conv and the state, so packed documents do not leak into each other.

Initialisation as published (memzoo.ssm.init.mamba2_decay_init, shared with Gated DeltaNet): A
uniform in a_init_range = [1, 16] per head (stored as A_log), dt_bias the inverse softplus of a
log-uniform dt in [dt_min, dt_max]; D = 1; the convolution as PyTorch's Conv1d default.
`init="mimetic"` (Trockman et al., 2024; details in memzoo/ssm/mamba.py) sets A = -0.01 in
every head (a decay mask near 1), copies the B columns of in_proj into its C columns (C_t . B_s
a positive semi-definite kernel, queries = keys at init) and starts the convolution as the
identity, which keeps the conv's B and C outputs equal.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from memzoo.registry import register_mixer
from memzoo.ssm.init import A_RANGE, DT_INIT_FLOOR, DT_RANGE, mamba2_decay_init
from memzoo.ssm.mamba import (MIMETIC_A, ConvSSMMixer, MambaCache, check_dt_options, check_init,
                              check_positive_int, clip_dt, conv_init, lead)
from pallas_kernels import chunked_linear_attention

DEFAULT_HEAD_DIM = 64


class GatedRMSNorm(nnx.Module):
    """rmsnorm(y * silu(z)) * scale, the statistics over groups of `group_size` channels, in
    float32 (Mamba-2's RMSNormGated with norm_before_gate=False)."""

    def __init__(self, num_features: int, group_size: int, *, epsilon: float = 1e-5,
                 dtype=jnp.float32):
        self.group_size, self.epsilon, self.dtype = group_size, epsilon, dtype
        self.scale = layers.param(jnp.ones((num_features,), jnp.float32), ("norm",),
                                  weight_decay=False)

    def __call__(self, y, z):
        g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        shape = g.shape
        g = g.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = g * jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + self.epsilon)
        return (g.reshape(shape) * lead(self.scale[...], len(shape))).astype(self.dtype)


@register_mixer("mamba2")
class Mamba2(ConvSSMMixer):
    """The Mamba-2 mixer: [b, t, d_model] -> [b, t, d_model] (module docstring).

    Options: state_size N (64), expand (2), head_dim P (default 64, or the inner width when that
    is smaller), num_groups G for B and C (1; must divide the number of heads), conv_width (4),
    chunk_size (the SSD chunk; None: the op's default), a_init_range ((1, 16)), dt_min, dt_max,
    dt_init_floor, dt_limit ((0, inf): no clipping), norm_eps (1e-5), init ("default" |
    "mimetic"), conv_bias (True), use_bias (projections, False), implementation.

    >>> m = Mamba2(16, state_size=8, head_dim=8, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((2, 8, 16))).shape
    (2, 8, 16)
    """

    def __init__(self, d_model: int, *, state_size: int = 64, expand: int = 2,
                 head_dim: int | None = None, num_groups: int = 1, conv_width: int = 4,
                 chunk_size: int | None = None, a_init_range: tuple[float, float] = A_RANGE,
                 dt_min: float = DT_RANGE[0], dt_max: float = DT_RANGE[1],
                 dt_init_floor: float = DT_INIT_FLOOR,
                 dt_limit: tuple[float, float] = (0.0, math.inf), norm_eps: float = 1e-5,
                 init: str = "default", conv_bias: bool = True, use_bias: bool = False,
                 implementation: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        owner = "Mamba2"
        check_positive_int(owner, d_model=d_model, state_size=state_size, expand=expand,
                           num_groups=num_groups, conv_width=conv_width)
        E = expand * d_model
        if head_dim is None:
            head_dim = min(DEFAULT_HEAD_DIM, E)
        check_positive_int(owner, head_dim=head_dim)
        if E % head_dim:
            raise ValueError(f"{owner}: head_dim={head_dim} must divide the inner width "
                             f"expand * d_model = {E}")
        H = E // head_dim
        if H % num_groups:
            raise ValueError(f"{owner}: num_groups={num_groups} must divide the number of heads "
                             f"{H} (= expand * d_model / head_dim)")
        if chunk_size is not None:
            check_positive_int(owner, chunk_size=chunk_size)
        self.dt_limit = check_dt_options(owner, dt_min, dt_max, dt_init_floor, dt_limit)
        check_init(owner, init)
        try:
            a_lo, a_hi = (float(v) for v in a_init_range)
        except (TypeError, ValueError):
            raise ValueError(f"{owner}: a_init_range must be a pair (low, high), got "
                             f"{a_init_range!r}") from None
        if not 0 < a_lo <= a_hi:
            raise ValueError(f"{owner}: a_init_range must satisfy 0 < low <= high, got "
                             f"{a_init_range!r}")
        if not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"{owner}: norm_eps must be a number > 0, got {norm_eps!r}")
        G, N = num_groups, state_size
        self.d_model, self.d_inner, self.state_size = d_model, E, N
        self.num_heads, self.head_dim, self.num_groups = H, head_dim, G
        self.conv_width, self.chunk_size, self.init = conv_width, chunk_size, init
        self.implementation, self.dtype = implementation, dtype
        conv_dim = E + 2 * G * N
        self.in_proj = layers.Linear(d_model, E + conv_dim + H, axes=("embed", "mlp"),
                                     use_bias=use_bias, dtype=dtype, rngs=rngs)
        if init == "mimetic":
            k = self.in_proj.kernel[...]
            b0 = 2 * E  # [z | x | B | C | dt]
            self.in_proj.kernel[...] = k.at[:, b0 + G * N:b0 + 2 * G * N].set(
                k[:, b0:b0 + G * N])
        w, b = conv_init(rngs.params(), conv_width, conv_dim, init)
        self.conv_weight = layers.param(w, (None, "mlp"))
        self.conv_bias = layers.param(b, ("mlp",)) if conv_bias else None
        A_log, dt_bias = mamba2_decay_init(rngs.params(), (H,), a_range=(a_lo, a_hi),
                                           dt_min=dt_min, dt_max=dt_max,
                                           dt_init_floor=dt_init_floor)
        if init == "mimetic":
            A_log = jnp.full((H,), math.log(MIMETIC_A), jnp.float32)
        self.dt_bias = layers.param(dt_bias, ("heads",), group="ssm_dynamics")
        self.A_log = layers.param(A_log, ("heads",), group="ssm_dynamics")
        self.D_skip = layers.param(jnp.ones((H,), jnp.float32), ("heads",), weight_decay=False)
        self.norm = GatedRMSNorm(E, E // G, epsilon=norm_eps, dtype=dtype)
        self.out_proj = layers.Linear(E, d_model, axes=("mlp", "embed"), use_bias=use_bias,
                                      dtype=dtype, rngs=rngs)

    def A(self):
        return -jnp.exp(self.A_log[...])

    def _split_in(self, u):
        """(z [.., E], xBC [.., E + 2GN], dt [.., H]) from in_proj."""
        zxbcdt = self.in_proj(u)
        E = self.d_inner
        return zxbcdt[..., :E], zxbcdt[..., E:-self.num_heads], zxbcdt[..., -self.num_heads:]

    def _heads(self, xbc, dt):
        """x [.., H, P], B, C [.., H, N] (groups repeated over their heads), dt [.., H] float32."""
        E, G, N, H = self.d_inner, self.num_groups, self.state_size, self.num_heads
        batch_time = xbc.shape[:-1]
        x = xbc[..., :E].reshape(*batch_time, H, self.head_dim)
        B = xbc[..., E:E + G * N].reshape(*batch_time, G, N)
        C = xbc[..., E + G * N:].reshape(*batch_time, G, N)
        B, C = (jnp.repeat(a, H // G, axis=-2) for a in (B, C))
        dt = clip_dt(jax.nn.softplus(dt.astype(jnp.float32) + lead(self.dt_bias[...], dt.ndim)),
                     self.dt_limit)
        return x, B, C, dt

    def _out(self, y, x, z):
        """D skip, gated norm, out_proj: y, x [.., H, P], z [.., E]."""
        y = y.astype(jnp.float32) + lead(self.D_skip[...][:, None], y.ndim) * x.astype(jnp.float32)
        y = y.reshape(*y.shape[:-2], self.d_inner)
        return self.out_proj(self.norm(y, z))

    def init_cache(self, batch_size: int) -> MambaCache:
        conv_dim = self.d_inner + 2 * self.num_groups * self.state_size
        return MambaCache(
            jnp.zeros((batch_size, self.conv_width - 1, conv_dim), jnp.float32),
            jnp.zeros((batch_size, self.num_heads, self.state_size, self.head_dim), jnp.float32))

    def _forward(self, x, cache, segment_ids, decode: bool = False):
        z, xbc, dt = self._split_in(x)
        xbc, conv_state = self._conv(xbc, cache, segment_ids, decode)
        xs, B, C, dt = self._heads(xbc.astype(self.dtype), dt)
        y, state = chunked_linear_attention(
            C, B, xs * dt[..., None].astype(xs.dtype), log_gate=dt * lead(self.A(), 3),
            initial_state=None if cache is None else cache.ssm_state, scale=1.0,
            segment_ids=segment_ids, chunk_size=self.chunk_size,
            implementation=self.implementation)
        out = self._out(y, xs, z)
        if cache is None:
            return out, None
        return out, MambaCache(conv_state.astype(jnp.float32), state)
