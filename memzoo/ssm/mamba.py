"""Mamba (Gu and Dao, 2023): the selective SSM block ("S6"), mixer "mamba".

    x, z    = in_proj(u)                                   [b, t, E],  E = expand * d_model
    x       = silu(causal_conv1d(x))                       depthwise, width W (4)
    dt_r, B, C = x_proj(x)                                 [R], [N], [N]  (R = dt_rank)
    dt      = softplus(dt_proj(dt_r) + dt_bias)            [E], optionally clipped to dt_limit
    h_t     = exp(dt_t A) h_{t-1} + dt_t B_t x_t           A = -exp(A_log) [E, N]
    y_t     = (C_t . h_t + D x_t) * silu(z_t)
    out     = out_proj(y)

The convolution is `pallas_kernels.causal_conv1d` (decoding: `causal_conv1d_update`), the
recurrence `pallas_kernels.selective_scan` (softplus, D skip and z gate fused in); decoding
(`step`) is the same path on one token, `causal_conv1d_update` then `selective_scan` at T=1 from
the cached state, so the recurrence has one home. `segment_ids` reach both, so packed
documents neither see each other's inputs through the convolution nor each other's state
through the scan.

Initialisation (`init="default"`, as published): dt drawn log-uniformly in [dt_min, dt_max],
floored at dt_init_floor, stored in dt_bias through the inverse softplus
(memzoo.ssm.init.dt_bias_init); dt_proj's kernel
uniform in +-dt_rank^-0.5; A = -(1, 2, ..., N) in every channel (S4D-real); D = 1; the
convolution as PyTorch's Conv1d default (uniform +-1/sqrt(W)).

`init="mimetic"` (Trockman et al., 2024, "Mimetic initialization helps state space models learn
to recall") starts the layer close to linear attention, y_t ~ sum_{s<=t} (C_t . B_s) dt_s x_s:
* A = -MIMETIC_A = -0.01 in every channel and state: exp(dt A) >= exp(-1e-3) per step at the
  largest initial dt, so the "attention mask" prod exp(dt A) stays near 1 over hundreds of tokens
  instead of decaying within a few (A_n = -(n+1) forgets in ~10 / (n+1) steps at dt = 0.1);
* the C columns of x_proj are a copy of the B columns (W_C = W_B), so C_t . B_s =
  x_t^T W_B W_B^T x_s is a positive semi-definite kernel: queries and keys start correlated, as
  attention's W_Q W_K^T ~ I in mimetic attention init, and C_t . B_t >= 0 (a token reads itself);
* the convolution starts as the identity (weight 1 on the current token, 0 on the W-1 before it,
  bias 0), so x (and with it B_t, C_t) is the token's own projection rather than a random blend
  of its neighbours.
Everything else (dt, D, the projections) is as in the default init.

`reparam` (StableSSM, Wang & Li 2023; memzoo/ssm/reparam.py): A = -f(A_log) with f = exp (the
default, as published), softplus or the "best" 1 / (a w^2 + b), whose gradient scale
|f'| / f^2 grows only linearly in |w|; the initial A is the same under every choice.

Optimizer tags (memzoo.layers.param): `A_log` and `dt_bias` are in the "ssm_dynamics" group
(no weight decay, own learning-rate multiplier) and `D_skip` (the paper's D) is not decayed, as
mamba-ssm marks them `_no_weight_decay`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from memzoo import layers
from memzoo.registry import register_mixer
from memzoo.ssm.init import DT_INIT_FLOOR, DT_RANGE, dt_bias_init
from memzoo.ssm.reparam import check_reparam, inverse_stable_rate, stable_rate
from pallas_kernels import causal_conv1d, causal_conv1d_update, selective_scan

INITS = ("default", "mimetic")
MIMETIC_A = 1e-2


@struct.dataclass
class MambaCache:
    """Decoding state: the last W-1 conv inputs [b, W-1, channels] and the SSM state (Mamba
    [b, E, N]; Mamba2 [b, heads, N, head_dim]), both float32."""
    conv_state: jax.Array
    ssm_state: jax.Array


# ---------------------------------------------------------------------------------------------
# Option checks and initialisers shared with Mamba2 (memzoo/ssm/mamba2.py).

def check_positive_int(owner: str, **values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")


def check_dt_options(owner: str, dt_min, dt_max, dt_init_floor, dt_limit) -> tuple[float, float]:
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float))
            and 0 < dt_min <= dt_max):
        raise ValueError(f"{owner}: dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got "
                         f"dt_min={dt_min!r}, dt_max={dt_max!r}")
    if not isinstance(dt_init_floor, (int, float)) or dt_init_floor < 0:
        raise ValueError(f"{owner}: dt_init_floor must be a number >= 0, got {dt_init_floor!r}")
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: dt_limit must be a pair (low, high), got {dt_limit!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"{owner}: dt_limit must satisfy 0 <= low < high, got {dt_limit!r}")
    return lo, hi


def check_init(owner: str, init: str) -> None:
    if init not in INITS:
        raise ValueError(f"{owner}: init must be one of {INITS}, got {init!r}")


def conv_init(key, width: int, channels: int, init: str) -> tuple[jax.Array, jax.Array]:
    """(weight [W, C], bias [C]): PyTorch Conv1d's default for a depthwise conv (fan_in = W),
    or the identity (current token weight 1) for the mimetic init."""
    if init == "mimetic":
        return (jnp.zeros((width, channels), jnp.float32).at[-1].set(1.0),
                jnp.zeros((channels,), jnp.float32))
    bound = 1.0 / math.sqrt(width)
    kw, kb = jax.random.split(key)
    return (jax.random.uniform(kw, (width, channels), jnp.float32, -bound, bound),
            jax.random.uniform(kb, (channels,), jnp.float32, -bound, bound))


def symmetric_uniform(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


def lead(p, ndim: int):
    """`p` with leading unit axes up to rank `ndim` (the tests forbid implicit rank promotion)."""
    return p.reshape((1,) * (ndim - p.ndim) + p.shape)


def clip_dt(dt, dt_limit: tuple[float, float]):
    lo, hi = dt_limit
    if lo > 0 or math.isfinite(hi):
        dt = jnp.clip(dt, lo, hi)
    return dt


def has_dt_limit(dt_limit: tuple[float, float]) -> bool:
    return dt_limit[0] > 0 or math.isfinite(dt_limit[1])


# ---------------------------------------------------------------------------------------------

class ConvSSMMixer(nnx.Module):
    """What Mamba and Mamba-2 share around their scans: the public __call__ / step (decoding is
    the parallel path at T=1) and the short causal convolution in front, whose decode form is
    causal_conv1d_update. A subclass sets conv_weight, conv_bias, d_model and implementation and
    defines _forward(x, cache, segment_ids, decode) -> (y, cache or None)."""

    def _conv_bias(self):
        return None if self.conv_bias is None else self.conv_bias[...]

    def _conv(self, x, cache, segment_ids, decode: bool):
        """SiLU(causal conv) of x [b, t, c] -> (y [b, t, c], the conv window after x)."""
        if decode:
            y, window = causal_conv1d_update(x[:, 0], cache.conv_state, self.conv_weight[...],
                                             bias=self._conv_bias(), activation="silu")
            return y[:, None], window
        return causal_conv1d(x, self.conv_weight[...], bias=self._conv_bias(), activation="silu",
                             segment_ids=segment_ids,
                             initial_state=None if cache is None else cache.conv_state,
                             implementation=self.implementation)

    def __call__(self, x, cache: MambaCache | None = None, *, segment_ids=None):
        """x [b, t, d_model]; with `cache` continue from it and return (y, cache).
        segment_ids [b, t] int: packed documents, nothing crosses a change of id."""
        layers.check_input(type(self).__name__, "x", x, ndim=3, width=self.d_model)
        out, new_cache = self._forward(x, cache, segment_ids)
        return out if cache is None else (out, new_cache)

    def step(self, x_t, cache: MambaCache):
        """One token x_t [b, d_model] -> (y_t [b, d_model], cache): the parallel path at T=1,
        the convolution through causal_conv1d_update."""
        layers.check_input(f"{type(self).__name__}.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        y, cache = self._forward(x_t[:, None], cache, None, decode=True)
        return y[:, 0], cache


@register_mixer("mamba")
class Mamba(ConvSSMMixer):
    """The Mamba mixer: [b, t, d_model] -> [b, t, d_model] (module docstring).

    Options: state_size N (16), expand (2), conv_width W (4), dt_rank ("auto": ceil(d/16)),
    dt_min, dt_max, dt_init_floor, dt_scale (dt_proj init scale), dt_limit (clip of dt after the
    softplus; (0, inf) = none), init ("default" | "mimetic"), conv_bias (True), use_bias (in/out
    projections, False), implementation (the ops' "auto" | "xla" | "pallas" | "reference"),
    reparam ("exp" | "softplus" | "best": A = -f(A_log), memzoo/ssm/reparam.py).

    >>> m = Mamba(16, state_size=4, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((2, 8, 16))).shape
    (2, 8, 16)
    """

    def __init__(self, d_model: int, *, state_size: int = 16, expand: int = 2,
                 conv_width: int = 4, dt_rank: int | str = "auto",
                 dt_min: float = DT_RANGE[0], dt_max: float = DT_RANGE[1],
                 dt_init_floor: float = DT_INIT_FLOOR, dt_scale: float = 1.0,
                 dt_limit: tuple[float, float] = (0.0, math.inf), init: str = "default",
                 conv_bias: bool = True, use_bias: bool = False, implementation: str = "auto",
                 reparam: str = "exp", dtype=jnp.float32, rngs: nnx.Rngs):
        owner = "Mamba"
        check_reparam(owner, reparam)
        self.reparam = reparam
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        check_positive_int(owner, d_model=d_model, state_size=state_size, expand=expand,
                           conv_width=conv_width, dt_rank=dt_rank)
        self.dt_limit = check_dt_options(owner, dt_min, dt_max, dt_init_floor, dt_limit)
        check_init(owner, init)
        if not isinstance(dt_scale, (int, float)) or dt_scale <= 0:
            raise ValueError(f"{owner}: dt_scale must be a number > 0, got {dt_scale!r}")
        E = expand * d_model
        self.d_model, self.d_inner, self.state_size = d_model, E, state_size
        self.conv_width, self.dt_rank, self.init = conv_width, dt_rank, init
        self.implementation, self.dtype = implementation, dtype
        lin = dict(dtype=dtype, rngs=rngs)
        self.in_proj = layers.Linear(d_model, 2 * E, axes=("embed", "mlp"), use_bias=use_bias,
                                     **lin)
        w, b = conv_init(rngs.params(), conv_width, E, init)
        self.conv_weight = layers.param(w, (None, "mlp"))
        self.conv_bias = layers.param(b, ("mlp",)) if conv_bias else None
        self.x_proj = layers.Linear(E, dt_rank + 2 * state_size, axes=("mlp", None),
                                    use_bias=False, **lin)
        if init == "mimetic":
            k = self.x_proj.kernel[...]
            n0 = dt_rank
            self.x_proj.kernel[...] = k.at[:, n0 + state_size:].set(k[:, n0:n0 + state_size])
        self.dt_proj = layers.Linear(dt_rank, E, axes=(None, "mlp"), use_bias=False,
                                     kernel_init=symmetric_uniform(dt_scale * dt_rank ** -0.5),
                                     **lin)
        self.dt_bias = layers.param(dt_bias_init(rngs.params(), (E,), dt_min, dt_max,
                                                 dt_init_floor), ("mlp",),
                                    group="ssm_dynamics")
        if init == "mimetic":
            a = jnp.full((E, state_size), MIMETIC_A, jnp.float32)
        else:
            a = jnp.broadcast_to(jnp.arange(1, state_size + 1, dtype=jnp.float32),
                                 (E, state_size))
        self.A_log = layers.param(inverse_stable_rate(a, reparam), ("mlp", "state"),
                                  group="ssm_dynamics")
        self.D_skip = layers.param(jnp.ones((E,), jnp.float32), ("mlp",), weight_decay=False)
        self.out_proj = layers.Linear(E, d_model, axes=("mlp", "embed"), use_bias=use_bias, **lin)

    # The pieces both forms share.
    def A(self):
        return -stable_rate(self.A_log[...], self.reparam)

    def _split_x_proj(self, x):
        """(dt [.., E] before the bias, B [.., N], C [.., N]) from the conv output."""
        dbc = self.x_proj(x)
        R, N = self.dt_rank, self.state_size
        return self.dt_proj(dbc[..., :R]), dbc[..., R:R + N], dbc[..., R + N:]

    def init_cache(self, batch_size: int) -> MambaCache:
        return MambaCache(jnp.zeros((batch_size, self.conv_width - 1, self.d_inner), jnp.float32),
                          jnp.zeros((batch_size, self.d_inner, self.state_size), jnp.float32))

    def _forward(self, x, cache, segment_ids, decode: bool = False):
        xz = self.in_proj(x)
        xs, z = xz[..., :self.d_inner], xz[..., self.d_inner:]
        xs, conv_state = self._conv(xs, cache, segment_ids, decode)
        xs = xs.astype(self.dtype)
        dt, B, C = self._split_x_proj(xs)
        if has_dt_limit(self.dt_limit):
            # The op's fused softplus cannot clip; the clipped step goes in as delta itself.
            dt = clip_dt(jax.nn.softplus(dt.astype(jnp.float32) + lead(self.dt_bias[...], 3)),
                         self.dt_limit)
            fused = dict(delta_softplus=False)
        else:
            fused = dict(delta_bias=self.dt_bias[...], delta_softplus=True)
        y, h = selective_scan(xs, dt, self.A(), B, C, D=self.D_skip[...], z=z,
                              initial_state=None if cache is None else cache.ssm_state,
                              segment_ids=segment_ids, implementation=self.implementation,
                              **fused)
        out = self.out_proj(y.astype(self.dtype))
        if cache is None:
            return out, None
        return out, MambaCache(conv_state.astype(jnp.float32), h)
