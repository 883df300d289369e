"""Discretisation of x' = A x + B u with step dt: the one home of this math in memzoo.

Every rule here is a generalised bilinear transform (GBT) with parameter alpha, except ZOH:
    forward Euler   alpha = 0:    Abar = I + dt A,                    Bbar = dt B
    backward Euler  alpha = 1:    Abar = (I - dt A)^-1,               Bbar = (I - dt A)^-1 dt B
    bilinear        alpha = 1/2:  Abar = (I - dt A/2)^-1 (I + dt A/2), Bbar = (I - dt A/2)^-1 dt B
    zoh                           Abar = exp(dt A),                   Bbar = A^-1 (exp(dt A) - I) B

Three forms, one per kind of user:
  * `discretize(A, B, dt, method)`: dense, float64 numpy, at construction (HiPPO's LegT/LagT/FouT).
  * `gbt_step(A, B, c, f, dt, method)`: one step of a time-varying system in JAX, solving with a
    lower-triangular A instead of forming Abar (HiPPO-LegS, where dt = 1/t changes every step).
  * `discretize_diag(A, dt, method)`: diagonal complex A in JAX (S4D, S5), returns (Abar, scale)
    with Bbar = scale * B, and `log_abar` for Vandermonde powers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

METHODS = ("forward_euler", "backward_euler", "bilinear", "zoh")
_GBT_ALPHA = {"forward_euler": 0.0, "backward_euler": 1.0, "bilinear": 0.5}


def check_method(method: str, allowed=METHODS) -> str:
    if method not in allowed:
        raise ValueError(f"discretization method must be one of {allowed}, got {method!r}")
    return method


def discretize(A, B, dt: float, method: str = "bilinear"):
    """Dense discretisation in float64: (Abar [n, n], Bbar [n, m]) as numpy arrays."""
    check_method(method)
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    n, m = B.shape
    eye = np.eye(n)
    if method == "zoh":
        # exp of the augmented [[A, B], [0, 0]] gives both blocks at once and needs no A^-1,
        # so singular A (e.g. FouT's oscillator pairs) is fine.
        aug = np.zeros((n + m, n + m))
        aug[:n, :n], aug[:n, n:] = A, B
        e = scipy.linalg.expm(dt * aug)
        return e[:n, :n], e[:n, n:]
    alpha = _GBT_ALPHA[method]
    lhs = eye - alpha * dt * A
    abar = np.linalg.solve(lhs, eye + (1.0 - alpha) * dt * A)
    bbar = np.linalg.solve(lhs, dt * B)
    return abar, bbar


def gbt_step(A, B, c, f, dt, method: str = "bilinear"):
    """c_next = Abar c + Bbar f for a lower-triangular A and a per-step dt, without inverses.

    A [n, n], B [n], c [batch, n], f [batch], dt scalar or [batch] (one clock per row, e.g.
    packed documents restarting LegS's 1/t). (I - alpha dt A) is lower triangular, so the step
    costs two O(n^2) products and one triangular solve.
    """
    check_method(method, tuple(_GBT_ALPHA))
    alpha = _GBT_ALPHA[method]
    n = A.shape[0]
    per_row = jnp.ndim(dt) == 1
    d = dt[:, None] if per_row else dt
    rhs = c + (1.0 - alpha) * d * (c @ A.T) + d * (f[:, None] * B[None, :])
    if alpha == 0.0:
        return rhs
    if per_row:
        lhs = jnp.eye(n, dtype=A.dtype)[None] - alpha * dt[:, None, None] * A[None]
        return jax.scipy.linalg.solve_triangular(lhs, rhs[..., None], lower=True)[..., 0]
    lhs = jnp.eye(n, dtype=A.dtype) - alpha * dt * A
    return jax.scipy.linalg.solve_triangular(lhs, rhs.T, lower=True).T


def discretize_diag(A, dt, method: str = "zoh"):
    """Diagonal discretisation: (Abar, scale) with Bbar = scale * B, elementwise, complex A.

    A and dt broadcast against each other (A [..., n], dt [..., 1] or [..., n]).
    """
    check_method(method)
    dta = dt * A
    if method == "zoh":
        abar = jnp.exp(dta)
        # (exp(dt A) - 1) / A, written with expm1 so small dt A keeps its precision.
        return abar, jnp.expm1(dta) / A
    alpha = _GBT_ALPHA[method]
    denom = 1.0 - alpha * dta
    return (1.0 + (1.0 - alpha) * dta) / denom, dt / denom


def log_abar(A, dt, method: str = "zoh"):
    """log(Abar): Abar^l = exp(l * log_abar), the Vandermonde powers of S4D's kernel.

    Exact for ZOH (dt A); the principal complex log otherwise (any branch gives the same powers).
    """
    check_method(method)
    if method == "zoh":
        return dt * A
    return jnp.log(discretize_diag(A, dt, method)[0])
