"""S5 (Smith et al., 2023): one MIMO diagonal SSM over all channels.

    x_t = Abar x_{t-1} + Bbar u_t,   y_t = 2 Re(C x_t) + D u_t,   x in C^(P/2), u, y in R^H

Lambda is HiPPO-N's spectrum (the eigenvalues of LegS's normal part), optionally J independent
blocks of size P/J; B and C are drawn real and projected into the eigenbasis (B~ = V^H B,
C~ = C V). Eigenvalues come in conjugate pairs, so only P/2 are stored and read back as 2 Re.
Each state has its own log step. Re Lambda = -f(w), w stored as `log_neg_lambda_real`, with f
chosen by `reparam` ("exp", the default: w = log(-Re Lambda); "softplus"; "best": StableSSM,
Wang & Li 2023, memzoo/ssm/reparam.py): stable for every w. The parallel form is pallas_kernels.linear_scan (complex);
bidirectional adds a reverse scan with its own C (including lag 0, as in the paper), and, not
being causal, has no decoding mode.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from memzoo import layers
from memzoo.registry import register_mixer
from memzoo.ssm import discretization, hippo
from memzoo.ssm.block import SSMBlock
from memzoo.ssm.init import DT_RANGE, log_uniform
from memzoo.ssm.reparam import check_reparam, inverse_stable_rate, stable_rate
from memzoo.ssm.s4d import SSMCache, complex_param
from pallas_kernels import linear_scan


def hippo_n_init(state_size: int, blocks: int = 1):
    """(Lambda [P/2], V [P, P/2]) complex128: J blocks of HiPPO-N, block-diagonal V."""
    if blocks < 1 or state_size % (2 * blocks):
        raise ValueError(f"S5: state_size={state_size} must split into blocks={blocks} "
                         "blocks of even size")
    lam, V = hippo.legs_normal_eig(state_size // blocks)
    return np.tile(lam, blocks), scipy.linalg.block_diag(*([V] * blocks))


class S5(nnx.Module):
    """The S5 SSM layer: [b, t, d] -> [b, t, d].

    >>> ssm = S5(4, state_size=8, rngs=nnx.Rngs(0))
    >>> ssm(jnp.ones((2, 16, 4))).shape
    (2, 16, 4)
    """

    def __init__(self, d_model: int, *, state_size: int = 64, blocks: int = 1,
                 method: str = "zoh", bidirectional: bool = False,
                 dt_min: float = DT_RANGE[0], dt_max: float = DT_RANGE[1],
                 reparam: str = "exp", scan_implementation: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        discretization.check_method(method, ("zoh", "bilinear"))
        check_reparam("S5", reparam)
        self.d_model, self.state_size, self.method = d_model, state_size, method
        self.reparam = reparam
        self.bidirectional, self.scan_implementation, self.dtype = (bidirectional,
                                                                    scan_implementation, dtype)
        lam, V = hippo_n_init(state_size, blocks)
        V = jnp.asarray(V, jnp.complex64)
        self.log_neg_lambda_real = layers.param(jnp.asarray(inverse_stable_rate(-lam.real,
                                                                                reparam),
                                                            jnp.float32),
                                                ("state",), group="ssm_dynamics")
        self.lambda_imag = layers.param(jnp.asarray(lam.imag, jnp.float32), ("state",),
                                         group="ssm_dynamics")
        B = nnx.initializers.lecun_normal()(rngs.params(), (state_size, d_model))
        self.B = complex_param(V.conj().T @ B.astype(jnp.complex64), ("state", "embed", None))
        directions = 2 if bidirectional else 1
        C = jax.random.normal(rngs.params(), (directions, d_model, state_size)) / math.sqrt(
            state_size)
        self.C = complex_param(jnp.einsum("khp,pn->khn", C.astype(jnp.complex64), V),
                               (None, "embed", "state", None))
        self.D = layers.param(jax.random.normal(rngs.params(), (d_model,)), ("embed",))
        self.log_step = layers.param(log_uniform(rngs.params(), (state_size // 2,), dt_min,
                                                 dt_max), ("state",), group="ssm_dynamics")

    def _discrete(self):
        """(Abar [P/2], Bbar [P/2, d]) complex64."""
        lam = jax.lax.complex(-stable_rate(self.log_neg_lambda_real[...], self.reparam),
                              self.lambda_imag[...])
        abar, scale = discretization.discretize_diag(lam, jnp.exp(self.log_step[...]),
                                                     self.method)
        v = self.B[...]
        return abar, scale[:, None] * jax.lax.complex(v[..., 0], v[..., 1])

    def _C(self, direction: int):
        v = self.C[...][direction]
        return jax.lax.complex(v[..., 0], v[..., 1])

    def _check_causal(self, what: str):
        if self.bidirectional:
            raise ValueError(f"S5.{what}: a bidirectional S5 is not causal and has no "
                             "recurrent decoding state; build it with bidirectional=False")

    def init_cache(self, batch_size: int) -> SSMCache:
        self._check_causal("init_cache")
        return SSMCache(jnp.zeros((batch_size, self.state_size // 2), jnp.complex64))

    def step(self, x_t, cache: SSMCache):
        self._check_causal("step")
        layers.check_input("S5.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        abar, bbar = self._discrete()
        u = x_t.astype(jnp.float32)
        h = abar[None] * cache.state + u.astype(jnp.complex64) @ bbar.T
        y = 2.0 * (h @ self._C(0).T).real + self.D[...][None] * u
        return y.astype(self.dtype), SSMCache(h)

    def __call__(self, x, cache: SSMCache | None = None, *, segment_ids=None):
        """segment_ids [b, t]: packed documents; the state restarts where the id changes."""
        layers.check_input("S5", "x", x, ndim=3, width=self.d_model)
        if cache is not None:
            self._check_causal("__call__(cache=...)")
        u = x.astype(jnp.float32)
        b, T, _ = u.shape
        abar, bbar = self._discrete()
        a = jnp.broadcast_to(abar[None, None], (b, T, abar.shape[0]))
        bu = jnp.einsum("bth,ph->btp", u.astype(jnp.complex64), bbar)
        h, h_last = linear_scan(a, bu, initial_state=None if cache is None else cache.state,
                                segment_ids=segment_ids, implementation=self.scan_implementation)
        y = 2.0 * jnp.einsum("btp,hp->bth", h, self._C(0)).real
        if self.bidirectional:
            hb, _ = linear_scan(a, bu, reverse=True, segment_ids=segment_ids,
                                implementation=self.scan_implementation)
            y = y + 2.0 * jnp.einsum("btp,hp->bth", hb, self._C(1)).real
        y = (y + self.D[...][None, None] * u).astype(self.dtype)
        return y if cache is None else (y, SSMCache(h_last))


@register_mixer("s5")
class S5Block(SSMBlock):
    """S5 inside the block (norm, GELU, GLU output, dropout, residual): the "s5" mixer.
    Block options as `S4DBlock`; everything else goes to `S5`."""

    def __init__(self, d_model: int, *, activation: str = "gelu", output: str = "glu",
                 dropout: float = 0.0, norm: str = "pre", norm_type: str = "layernorm",
                 residual: bool = True, dtype=jnp.float32, rngs: nnx.Rngs, **s5_options):
        core = S5(d_model, dtype=dtype, rngs=rngs, **s5_options)
        super().__init__(d_model, core, activation=activation, output=output, dropout=dropout,
                         norm=norm, norm_type=norm_type, residual=residual, dtype=dtype,
                         rngs=rngs)
