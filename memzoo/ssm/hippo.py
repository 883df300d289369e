"""HiPPO (Gu et al., 2020): online projection of a signal's history onto orthogonal bases.

Convention: d/dt c(t) = A c(t) + B f(t), with A "stable" (negative diagonal); the paper's
appendix writes -A. Each measure's coefficients are those of an orthonormal basis g_n, and
`evaluation_matrix` turns coefficients back into the signal:

  legs  scaled Legendre, uniform measure on [0, t], time-varying: d/dt c = (1/t)(A c + B f).
        A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k); B_n = sqrt(2n+1).
        f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 s / t - 1),  s in [0, t].
  legt  translated Legendre (LMU), uniform measure on the window [t - theta, t]:
        A_nk = -(1/theta) sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else (-1)^(n-k));
        B_n = (1/theta) sqrt(2n+1);
        f(t - theta r) ~ sum_n c_n sqrt(2n+1) P_n(1 - 2 r),  r in [0, 1] (r = 0 is now).
  lagt  Laguerre, exponentially decaying measure exp(-(t - s)) on (-inf, t]:
        A = I/2 - tril(ones), B = ones (generalised Laguerre with alpha = 0, tilted by exp(s/2));
        Only its structure is tested (stable, lower triangular); unlike legs, legt and fout,
        its reconstruction through `evaluation_matrix` is not yet checked against a signal.
  fout  translated Fourier on [t - 1, t], basis 1, sqrt2 cos(2 pi j x), sqrt2 sin(2 pi j x):
        A = Omega - B B^T / 2 (Omega skew: d/dt of cos_j picks +2 pi j sin_j), B = 2 g(0),
        the factor 2 because the periodic extension's series converges to (f(t) + f(t-1)) / 2.

Discretisation lives in memzoo.ssm.discretization: time-invariant measures are discretised once
in float64 (step dt = 1 per token, `theta` in tokens), LegS with dt = 1/t at step t (1-indexed)
through `gbt_step`, so the memory is the linear recurrence c_t = Abar_t c_{t-1} + Bbar_t f_t.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from flax import nnx, struct

from memzoo import layers
from memzoo.attention import check_segment_ids, segment_starts
from memzoo.registry import register_mixer
from memzoo.ssm import discretization

MEASURES = ("legs", "legt", "lagt", "fout")


def hippo_matrices(measure: str, state_size: int, *, theta: float = 1.0):
    """(A [n, n], B [n]) in float64 for d/dt c = A c + B f (LegS: times 1/t)."""
    n = state_size
    if n < 1:
        raise ValueError(f"hippo_matrices: state_size must be >= 1, got {n}")
    idx = np.arange(n, dtype=np.float64)
    r = np.sqrt(2 * idx + 1)
    row, col = np.meshgrid(idx, idx, indexing="ij")
    if measure == "legs":
        A = np.where(row > col, -np.outer(r, r), 0.0) - np.diag(idx + 1)
        B = r.copy()
    elif measure == "legt":
        # With r = (t - s) / theta measured back from now, the basis sqrt(2n+1) P_n(1 - 2r)
        # equals 1 at r = 0 for every n, which is what makes B all-positive below.
        sign = np.where(row >= col, 1.0, (-1.0) ** (row - col))
        A = -np.outer(r, r) * sign / theta
        B = r / theta
    elif measure == "lagt":
        A = np.eye(n) / 2 - np.tril(np.ones((n, n)))
        B = np.ones(n)
    elif measure == "fout":
        g0 = np.zeros(n)
        g0[0] = 1.0
        g0[1::2] = math.sqrt(2.0)  # cos entries sit at odd indices, sin right after them
        omega = np.zeros((n, n))
        for cos_i in range(1, n - 1, 2):
            freq = 2 * math.pi * ((cos_i + 1) // 2)
            omega[cos_i, cos_i + 1] = freq
            omega[cos_i + 1, cos_i] = -freq
        B = 2.0 * g0
        A = omega - np.outer(B, B) / 2
    else:
        raise ValueError(f"hippo_matrices: measure must be one of {MEASURES}, got {measure!r}")
    return A, B


def legs_normal_eig(state_size: int):
    """HiPPO-N: eigendecomposition of LegS's normal part, the init of S4D-LegS and S5.

    A_legs + p p^T with p_n = sqrt(n + 1/2) is -I/2 + S, S skew-symmetric, so it is unitarily
    diagonalisable with eigenvalues -1/2 + i w. They come in conjugate pairs; the half with
    w > 0 (largest first) is returned, with its eigenvectors V [n, n/2] (orthonormal columns).
    The other half is the complex conjugate, which is why memzoo stores n/2 and takes 2 Re.
    """
    if state_size % 2:
        raise ValueError(f"legs_normal_eig: state_size must be even, got {state_size}")
    A, _ = hippo_matrices("legs", state_size)
    p = np.sqrt(np.arange(state_size) + 0.5)
    skew = A + np.outer(p, p) + 0.5 * np.eye(state_size)
    # i S is Hermitian: eigh is accurate and gives orthonormal eigenvectors.
    w, V = np.linalg.eigh(1j * skew)
    lam_imag = -w  # S v = -i w v
    order = np.argsort(-lam_imag)[: state_size // 2]
    return -0.5 + 1j * lam_imag[order], V[:, order]


def evaluation_matrix(measure: str, state_size: int, x) -> np.ndarray:
    """[len(x), n] basis values: signal ~ evaluation_matrix @ c.

    x is where to evaluate, in the measure's window coordinate: legs s/t in [0, 1];
    legt r = (t - s)/theta in [0, 1] (0 is now); fout x in [0, 1) over [t - 1, t];
    lagt lag (t - s) >= 0.
    """
    x = np.asarray(x, np.float64)
    n = np.arange(state_size)
    if measure == "legs":
        return np.sqrt(2 * n + 1)[None, :] * scipy.special.eval_legendre(n[None, :],
                                                                          2 * x[:, None] - 1)
    if measure == "legt":
        return np.sqrt(2 * n + 1)[None, :] * scipy.special.eval_legendre(n[None, :],
                                                                          1 - 2 * x[:, None])
    if measure == "lagt":
        return (scipy.special.eval_laguerre(n[None, :], x[:, None])
                * np.exp(-x[:, None] / 2))
    if measure == "fout":
        cols = [np.ones_like(x)]
        for i in range(1, state_size):
            j = (i + 1) // 2
            trig = np.cos if i % 2 else np.sin
            cols.append(math.sqrt(2.0) * trig(2 * math.pi * j * x))
        return np.stack(cols, axis=-1)
    raise ValueError(f"evaluation_matrix: measure must be one of {MEASURES}, got {measure!r}")


@dataclasses.dataclass(frozen=True)
class HippoOperator:
    """A discretised HiPPO memory: what `memory_step` needs, as float64 numpy."""
    measure: str
    A: np.ndarray
    B: np.ndarray
    Abar: np.ndarray | None  # None for LegS (time-varying; solved per step)
    Bbar: np.ndarray | None
    method: str

    @classmethod
    def build(cls, measure: str, state_size: int, *, method: str = "bilinear",
              theta: float = 64.0, dt: float = 1.0) -> "HippoOperator":
        discretization.check_method(method)
        A, B = hippo_matrices(measure, state_size, theta=theta)
        if measure == "legs":
            if method == "zoh":
                raise ValueError("HiPPO-LegS: method='zoh' is not supported for the time-varying "
                                 "1/t dynamics; use 'bilinear', 'backward_euler' or "
                                 "'forward_euler'")
            return cls(measure, A, B, None, None, method)
        Abar, Bbar = discretization.discretize(A, B[:, None], dt, method)
        return cls(measure, A, B, Abar, Bbar[:, 0], method)


def memory_step(measure: str, method: str, A, B, Abar, Bbar, c, f, t):
    """c_t = Abar_t c_{t-1} + Bbar_t f_t; c [b, n], f [b], t the 1-indexed step (scalar)."""
    if measure == "legs":
        return discretization.gbt_step(A, B, c, f, 1.0 / t.astype(c.dtype), method)
    return c @ Abar.T + f[:, None] * Bbar[None, :]


def run_memory(op: HippoOperator, f, *, dtype=jnp.float32):
    """The memory's coefficients after every step of f [b, t]: [b, t, n]."""
    consts = [jnp.asarray(v, dtype) if v is not None else None
              for v in (op.A, op.B, op.Abar, op.Bbar)]

    def body(carry, f_t):
        c, t = carry
        t = t + 1
        c = memory_step(op.measure, op.method, *consts, c, f_t, t)
        return (c, t), c

    c0 = jnp.zeros((f.shape[0], op.A.shape[0]), dtype)
    _, cs = jax.lax.scan(body, (c0, jnp.zeros((), jnp.int32)), jnp.swapaxes(f.astype(dtype), 0, 1))
    return jnp.swapaxes(cs, 0, 1)


@struct.dataclass
class HippoRNNCache:
    h: jax.Array  # [b, hidden] RNN hidden state
    c: jax.Array  # [b, n] HiPPO memory coefficients
    t: jax.Array  # [b] int32: tokens of each row's current document seen (LegS's 1/t clock)
    segment: jax.Array  # [b] int32: that document's id (a different id starts a new one)


@register_mixer("hippo_rnn")
class HippoRNN(nnx.Module):
    """The HiPPO-RNN memory cell as a sequence layer, [b, t, d] -> [b, t, d].

    Each step: the RNN reads [x_t, c_{t-1}] and h_{t-1}; a scalar f_t = w . h_t is written into
    the HiPPO memory c_t = Abar_t c_{t-1} + Bbar_t f_t; the output is a projection of h_t.
    `gated=True` uses a GRU-style update gate (h = (1 - z) h + z tanh(...)); False a tanh RNN.
    The cell is nonlinear, so its parallel form is a scan of `step`.

    >>> m = HippoRNN(8, state_size=16, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((2, 5, 8))).shape
    (2, 5, 8)
    """

    def __init__(self, d_model: int, *, state_size: int = 32, hidden_size: int | None = None,
                 measure: str = "legs", method: str = "bilinear", theta: float = 64.0,
                 gated: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.d_model, self.state_size = d_model, state_size
        self.hidden_size = hidden = hidden_size or d_model
        self.measure, self.method, self.gated, self.dtype = measure, method, gated, dtype
        op = HippoOperator.build(measure, state_size, method=method, theta=theta)
        self.A, self.B = layers.Buffer(jnp.asarray(op.A, jnp.float32)), layers.Buffer(
            jnp.asarray(op.B, jnp.float32))
        tv = op.Abar is None  # time-varying: no fixed Abar; store zeros to keep one structure
        self.Abar = layers.Buffer(jnp.zeros((state_size, state_size)) if tv
                                  else jnp.asarray(op.Abar, jnp.float32))
        self.Bbar = layers.Buffer(jnp.zeros((state_size,)) if tv
                                  else jnp.asarray(op.Bbar, jnp.float32))
        gates = 2 if gated else 1
        # The recurrent cell runs in float32: its state is carried across the whole sequence.
        self.input_proj = layers.Linear(d_model + state_size, gates * hidden,
                                        axes=("embed", "mlp"), rngs=rngs)
        self.hidden_proj = layers.Linear(hidden, gates * hidden, axes=("mlp", "mlp"),
                                         use_bias=False,
                                         kernel_init=nnx.initializers.orthogonal(), rngs=rngs)
        self.memory_in = layers.Linear(hidden, 1, axes=("mlp", None), rngs=rngs)
        self.out_proj = layers.Linear(hidden, d_model, axes=("mlp", "embed"), dtype=dtype,
                                      rngs=rngs)

    def init_cache(self, batch_size: int) -> HippoRNNCache:
        return HippoRNNCache(h=jnp.zeros((batch_size, self.hidden_size), jnp.float32),
                             c=jnp.zeros((batch_size, self.state_size), jnp.float32),
                             t=jnp.zeros((batch_size,), jnp.int32),
                             segment=jnp.zeros((batch_size,), jnp.int32))

    def _cell(self, x_t, cache: HippoRNNCache, start=None, segment=None):
        """One step; where `start` [b] (a new document) the state first returns to init_cache's."""
        if start is not None:
            fresh = self.init_cache(x_t.shape[0])
            cache = jax.tree.map(
                lambda n, o: jnp.where(start.reshape(-1, *[1] * (o.ndim - 1)), n, o),
                fresh, cache)
            cache = cache.replace(segment=segment)
        pre = (self.input_proj(jnp.concatenate([x_t.astype(jnp.float32), cache.c], axis=-1))
               + self.hidden_proj(cache.h))
        if self.gated:
            z, cand = jnp.split(pre, 2, axis=-1)
            z = jax.nn.sigmoid(z)
            h = (1.0 - z) * cache.h + z * jnp.tanh(cand)
        else:
            h = jnp.tanh(pre)
        f = self.memory_in(h)[:, 0]
        t = cache.t + 1
        c = memory_step(self.measure, self.method, self.A[...], self.B[...], self.Abar[...],
                        self.Bbar[...], cache.c, f, t)
        return h, HippoRNNCache(h=h, c=c, t=t, segment=cache.segment)

    def step(self, x_t, cache: HippoRNNCache, *, segment_ids=None):
        """One token; `segment_ids` [b] int: its document, a new one (the state restarts) where
        it differs from the cache's."""
        layers.check_input("HippoRNN.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        start = None
        if segment_ids is not None:
            check_segment_ids("HippoRNN.step", segment_ids, x_t.shape[:1])
            start = segment_ids != cache.segment
        h, cache = self._cell(x_t, cache, start, segment_ids)
        return self.out_proj(h), cache

    def __call__(self, x, cache: HippoRNNCache | None = None, *, segment_ids=None):
        """The scan of `step`, from `cache` if given (then (y, cache)). `segment_ids` [b, t] int:
        packed documents; the state restarts where the id changes (with a cache: also where
        token 0's id differs from the cache's)."""
        layers.check_input("HippoRNN", "x", x, ndim=3, width=self.d_model)
        given = cache is not None
        if cache is None:
            cache = self.init_cache(x.shape[0])
        xs = (jnp.swapaxes(x, 0, 1),)
        if segment_ids is not None:
            check_segment_ids("HippoRNN", segment_ids, x.shape[:2])
            starts = segment_starts(segment_ids, cache.segment if given else None)
            xs += (jnp.swapaxes(starts, 0, 1), jnp.swapaxes(segment_ids.astype(jnp.int32), 0, 1))

        def body(carry, xs_t):
            h, carry = self._cell(*xs_t[:1], carry, *xs_t[1:])
            return carry, h

        cache, hs = jax.lax.scan(body, cache, xs)
        y = self.out_proj(jnp.swapaxes(hs, 0, 1))
        return (y, cache) if given else y
