"""S4D (Gu et al., 2022): a diagonal complex SSM per channel, x' = A x + B u, y = C x + D u.

Each of the d_model channels has its own N/2 complex modes; the other N/2 are their conjugates,
so the output is 2 Re(sum_n C_n x_n) and only the half is stored. Parameters are real float32:
complex values as [..., 2] (real, imag) pairs, Re A as log(-Re A) so A stays stable, and the
step as log dt. `reparam` ("exp" | "softplus" | "best"; StableSSM, Wang & Li 2023, see
memzoo/ssm/reparam.py) picks f in Re A = -f(w), w the stored `log_neg_a_real` ("exp": the
default, w = log(-Re A)); every choice keeps Re A < 0. Two parallel forms that must agree:

  conv       K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l)   (a Vandermonde product, computed in float32)
             y = K * u by FFT (causal), + D u
  recurrent  x_t = Abar x_{t-1} + Bbar u_t on pallas_kernels.linear_scan (complex), y = 2 Re(C x_t)

Bidirectional adds a second C read from a reverse scan of the same modes, strictly after t
(lags 1..T, as the anticausal half of a two-sided kernel); it is not causal, so it has no
step/decoding mode. `__call__(x, cache=...)` continues from a cache in either mode: in conv
mode the carried state enters through the same Vandermonde powers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from memzoo import layers
from memzoo.registry import register_mixer
from memzoo.ssm import discretization, hippo
from memzoo.ssm.block import SSMBlock
from memzoo.ssm.init import DT_RANGE, log_uniform
from memzoo.ssm.reparam import check_reparam, inverse_stable_rate, stable_rate
from pallas_kernels import linear_scan

INITS = ("legs", "inv", "lin", "random")
MODES = ("conv", "recurrent")


@struct.dataclass
class SSMCache:
    """The complex state of a diagonal SSM: [b, channels, n/2] (S4D) or [b, n/2] (S5)."""
    state: jax.Array


def s4d_init(init: str, state_size: int, *, key: jax.Array | None = None):
    """(A [n/2] complex, B [n/2] complex), shared by every channel (float64 numpy; "random"
    draws from `key` in JAX so that building under jit or eval_shape stays abstract).

    legs: HiPPO-N eigenvalues -1/2 + i w, B projected into that eigenbasis (V^H B_legs);
    inv:  -1/2 + i n/pi (n/(2k+1) - 1);  lin: -1/2 + i pi k;  random: -1/2 + i pi (n/2) U[0, 1).
    Non-legs inits take B = 1 (the paper finds the choice of B matters little).
    """
    half = state_size // 2
    k = np.arange(half)
    if init == "legs":
        lam, V = hippo.legs_normal_eig(state_size)
        _, b = hippo.hippo_matrices("legs", state_size)
        return lam, V.conj().T @ b
    if init == "inv":
        lam = -0.5 + 1j * state_size / math.pi * (state_size / (2 * k + 1) - 1)
    elif init == "lin":
        lam = -0.5 + 1j * math.pi * k
    elif init == "random":
        if key is None:
            raise ValueError("S4D: init='random' needs a key")
        imag = math.pi * half * jnp.sort(jax.random.uniform(key, (half,)))
        return jax.lax.complex(jnp.full((half,), -0.5), imag), jnp.ones((half,), jnp.complex64)
    else:
        raise ValueError(f"S4D: init must be one of {INITS}, got {init!r}")
    return lam, np.ones(half, np.complex128)


def complex_param(z, axes) -> nnx.Param:
    z = jnp.asarray(z)
    return layers.param(jnp.stack([z.real, z.imag], axis=-1).astype(jnp.float32), axes)


def as_complex(p) -> jax.Array:
    v = p[...]
    return jax.lax.complex(v[..., 0], v[..., 1])


def vandermonde(log_z, length: int):
    """z^l for l = 0..length-1 as exp(l log z): [..., n] -> [..., n, length]."""
    powers = jnp.arange(length, dtype=jnp.float32)
    return jnp.exp(log_z[..., None] * powers.reshape((1,) * log_z.ndim + (length,)))


def s4d_kernel(A, B, C, dt, length: int, method: str = "zoh"):
    """K [d, length] = 2 Re(sum_n C_n Bbar_n Abar_n^l); A, B, C [d, n/2] complex, dt [d]."""
    dt = dt[:, None]
    _, scale = discretization.discretize_diag(A, dt, method)
    V = vandermonde(discretization.log_abar(A, dt, method), length)
    return 2.0 * jnp.einsum("dn,dnl->dl", C * B * scale, V).real


def causal_conv(u, K):
    """y_t = sum_{j <= t} K_j u_{t-j}; u [b, t, d], K [d, t], by FFT of length 2t (no wrap)."""
    T = u.shape[1]
    n = 2 * T
    uf = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)
    kf = jnp.fft.rfft(K.T, n=n, axis=0)
    return jnp.fft.irfft(uf * kf[None], n=n, axis=1)[:, :T]


class S4D(nnx.Module):
    """The S4D SSM layer: [b, t, d] -> [b, t, d], one diagonal SSM per channel, plus D u.

    >>> ssm = S4D(4, state_size=8, rngs=nnx.Rngs(0))
    >>> y = ssm(jnp.ones((2, 16, 4)))
    >>> y.shape
    (2, 16, 4)
    """

    def __init__(self, d_model: int, *, state_size: int = 64, init: str = "legs",
                 method: str = "zoh", mode: str = "conv", bidirectional: bool = False,
                 dt_min: float = DT_RANGE[0], dt_max: float = DT_RANGE[1],
                 reparam: str = "exp", scan_implementation: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if state_size < 2 or state_size % 2:
            raise ValueError(f"S4D: state_size must be even and >= 2, got {state_size}")
        check_reparam("S4D", reparam)
        self.reparam = reparam
        if mode not in MODES:
            raise ValueError(f"S4D: mode must be one of {MODES}, got {mode!r}")
        discretization.check_method(method, ("zoh", "bilinear"))
        self.d_model, self.state_size, self.init = d_model, state_size, init
        self.method, self.mode, self.bidirectional = method, mode, bidirectional
        self.scan_implementation, self.dtype = scan_implementation, dtype
        half = state_size // 2
        lam, b = s4d_init(init, state_size, key=rngs.params() if init == "random" else None)
        lam = jnp.broadcast_to(jnp.asarray(lam, jnp.complex64)[None], (d_model, half))
        self.log_neg_a_real = layers.param(inverse_stable_rate(-lam.real, reparam),
                                           ("embed", "state"),
                                           group="ssm_dynamics")
        self.a_imag = layers.param(lam.imag, ("embed", "state"), group="ssm_dynamics")
        self.B = complex_param(jnp.broadcast_to(jnp.asarray(b, jnp.complex64)[None],
                                                (d_model, half)), ("embed", "state", None))
        # Complex normal with unit variance: each of Re, Im has variance 1/2.
        c_shape = (2 if bidirectional else 1, d_model, half, 2)
        self.C = layers.param(jax.random.normal(rngs.params(), c_shape) * math.sqrt(0.5),
                              (None, "embed", "state", None))
        self.D = layers.param(jax.random.normal(rngs.params(), (d_model,)), ("embed",))
        self.log_dt = layers.param(log_uniform(rngs.params(), (d_model,), dt_min, dt_max),
                                   ("embed",), group="ssm_dynamics")

    # The SSM in continuous form, complex [d, n/2].
    def _A(self):
        return jax.lax.complex(-stable_rate(self.log_neg_a_real[...], self.reparam),
                               self.a_imag[...])

    def _C(self, direction: int):
        v = self.C[...][direction]
        return jax.lax.complex(v[..., 0], v[..., 1])

    def kernel(self, length: int, direction: int = 0):
        """The convolution kernel [d, length] (direction 1: the backward kernel)."""
        return s4d_kernel(self._A(), as_complex(self.B), self._C(direction),
                          jnp.exp(self.log_dt[...]), length, self.method)

    def _discrete(self):
        """(Abar [d, n/2], Bbar [d, n/2]) complex64."""
        dt = jnp.exp(self.log_dt[...])[:, None]
        abar, scale = discretization.discretize_diag(self._A(), dt, self.method)
        return abar, scale * as_complex(self.B)

    def init_cache(self, batch_size: int) -> SSMCache:
        self._check_causal("init_cache")
        return SSMCache(jnp.zeros((batch_size, self.d_model, self.state_size // 2),
                                  jnp.complex64))

    def _check_causal(self, what: str):
        if self.bidirectional:
            raise ValueError(f"S4D.{what}: a bidirectional S4D is not causal and has no "
                             "recurrent decoding state; build it with bidirectional=False")

    def _read(self, h, direction: int = 0):
        """2 Re(sum_n C_n h_n): [..., d, n/2] complex -> [..., d] float32."""
        C = self._C(direction)
        return 2.0 * jnp.sum((h * C.reshape((1,) * (h.ndim - 2) + C.shape)).real, axis=-1)

    def step(self, x_t, cache: SSMCache):
        self._check_causal("step")
        layers.check_input("S4D.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        abar, bbar = self._discrete()
        u = x_t.astype(jnp.float32)
        h = abar[None] * cache.state + bbar[None] * u[..., None]
        y = self._read(h) + self.D[...][None] * u
        return y.astype(self.dtype), SSMCache(h)

    def __call__(self, x, cache: SSMCache | None = None, *, segment_ids=None):
        """segment_ids [b, t]: packed documents; the state restarts where the id changes. A
        convolution cannot restart mid-sequence, so with segment_ids conv mode runs the
        (equal) recurrent form instead."""
        layers.check_input("S4D", "x", x, ndim=3, width=self.d_model)
        if cache is not None:
            self._check_causal("__call__(cache=...)")
        u = x.astype(jnp.float32)
        if self.mode == "conv" and segment_ids is None:
            y, new_cache = self._conv(u, cache)
        else:
            y, new_cache = self._recurrent(u, cache, segment_ids)
        y = (y + self.D[...][None, None] * u).astype(self.dtype)
        return y if cache is None else (y, new_cache)

    def _conv(self, u, cache):
        T = u.shape[1]
        dt = jnp.exp(self.log_dt[...])[:, None]
        A = self._A()
        _, scale = discretization.discretize_diag(A, dt, self.method)
        bbar = scale * as_complex(self.B)
        # Powers 0..T: the kernel uses 0..T-1; a carried state enters with 1..T and leaves with T.
        V = vandermonde(discretization.log_abar(A, dt, self.method), T + 1)  # [d, n/2, T+1]
        K = 2.0 * jnp.einsum("dn,dnl->dl", self._C(0) * bbar, V[..., :T]).real
        y = causal_conv(u, K)
        if self.bidirectional:
            Kb = 2.0 * jnp.einsum("dn,dnl->dl", self._C(1) * bbar, V[..., :T]).real
            zb = causal_conv(u[:, ::-1], Kb)
            zb = jnp.concatenate([jnp.zeros_like(zb[:, :1]), zb[:, :-1]], axis=1)
            y = y + zb[:, ::-1]
        if cache is None:
            return y, None
        h0 = cache.state
        y = y + 2.0 * jnp.einsum("bdn,dn,dnl->bld", h0, self._C(0), V[..., 1:]).real
        # x_T = Abar^T x_0 + sum_s Abar^(T-1-s) Bbar u_s
        hT = (V[None, ..., T] * h0
              + jnp.einsum("dn,dnl,bld->bdn", bbar, V[..., T - 1::-1] if T > 0 else V[..., :0],
                           u.astype(jnp.complex64)))
        return y, SSMCache(hT.astype(jnp.complex64))

    def _recurrent(self, u, cache, segment_ids=None):
        b, T, d = u.shape
        half = self.state_size // 2
        abar, bbar = self._discrete()
        a = jnp.broadcast_to(abar.reshape(1, 1, d * half), (b, T, d * half))
        bu = (bbar[None, None] * u.astype(jnp.complex64)[..., None]).reshape(b, T, d * half)
        h0 = None if cache is None else cache.state.reshape(b, d * half)
        h, h_last = linear_scan(a, bu, initial_state=h0, segment_ids=segment_ids,
                                implementation=self.scan_implementation)
        y = self._read(h.reshape(b, T, d, half))
        if self.bidirectional:
            hb, _ = linear_scan(a, bu, reverse=True, segment_ids=segment_ids,
                                implementation=self.scan_implementation)
            # Strictly after t: read the reverse state of t + 1 (zero past the end, and zero
            # where t + 1 begins another document).
            hb = jnp.concatenate([hb[:, 1:], jnp.zeros_like(hb[:, :1])], axis=1)
            if segment_ids is not None:
                same = segment_ids[:, 1:] == segment_ids[:, :-1]
                same = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)
                hb = jnp.where(same[..., None], hb, jnp.zeros_like(hb))
            y = y + self._read(hb.reshape(b, T, d, half), direction=1)
        new_cache = None if cache is None else SSMCache(h_last.reshape(b, d, half))
        return y, new_cache


@register_mixer("s4d")
class S4DBlock(SSMBlock):
    """S4D inside the block (norm, GELU, GLU output, dropout, residual): the "s4d" mixer.

    Block options: activation, output ("glu" | "linear" | "none"), dropout, norm ("pre" |
    "post" | "none"), norm_type, residual, dtype. Everything else goes to `S4D`.

    >>> blk = S4DBlock(8, state_size=8, mode="recurrent", rngs=nnx.Rngs(0))
    >>> blk(jnp.ones((1, 4, 8))).shape
    (1, 4, 8)
    """

    def __init__(self, d_model: int, *, activation: str = "gelu", output: str = "glu",
                 dropout: float = 0.0, norm: str = "pre", norm_type: str = "layernorm",
                 residual: bool = True, dtype=jnp.float32, rngs: nnx.Rngs, **s4d_options):
        core = S4D(d_model, dtype=dtype, rngs=rngs, **s4d_options)
        super().__init__(d_model, core, activation=activation, output=output, dropout=dropout,
                         norm=norm, norm_type=norm_type, residual=residual, dtype=dtype,
                         rngs=rngs)
