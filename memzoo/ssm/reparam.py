"""Stable reparameterisations of a diagonal SSM's decay rates: the one home of Re(lambda) = -f(w).

StableSSM (Wang & Li, 2023, "StableSSM: Alleviating the Curse of Memory in State-space Models
through Stable Reparameterization", ICML 2024): a diagonal SSM whose continuous-time eigenvalues
are trained directly drifts to the stability boundary Re(lambda) -> 0 when it learns long
memories, and can then only approximate exponentially decaying memory stably (the "curse of
memory"). Writing the real part as Re(lambda) = -f(w) with f > 0 for every w keeps each
eigenvalue in the open left half-plane whatever the optimiser does, and the choice of f sets how
the gradient scales. The paper bounds the gradient with respect to w by a constant times

    G_f(w) = |f'(w)| / f(w)^2

and calls a reparameterisation "best" when that bound grows like |w|, so the gradient-over-
weight ratio |dL/dw| / |w| is the same at every memory length (no rate dominates the update):
G_f(w) = 2 a |w| solves to f(w) = 1 / (a w^2 + b). The three offered, as `reparam`:

    "exp"       f(w) = exp(w)            S4D / S5 / Mamba's A = -exp(A_log) (the default)
                                         G_f = exp(-w): explodes as the memory grows (w -> -inf)
    "softplus"  f(w) = log(1 + exp(w))   G_f -> exp(-w) likewise as w -> -inf, ~1/w for w > 0
    "best"      f(w) = 1 / (a w^2 + b)   G_f = 2 a |w|; f <= 1/b (BEST_A = 1, BEST_B = 1e-3:
                                         rates up to 1000, beyond any initial Mamba A)

Only the real part is reparameterised; imaginary parts (S4D, S5) stay as they are. Modules
keep their parameter's name (S4D `log_neg_a_real`, S5 `log_neg_lambda_real`, Mamba `A_log`): it
holds w, which is log(-Re lambda) under "exp" only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memzoo.ssm.init import inverse_softplus

REPARAMS = ("exp", "softplus", "best")
BEST_A, BEST_B = 1.0, 1e-3


def check_reparam(owner: str, reparam) -> None:
    if reparam not in REPARAMS:
        raise ValueError(f"{owner}: `reparam` must be one of {REPARAMS}, got {reparam!r}")


def stable_rate(w, reparam: str = "exp"):
    """f(w) > 0 for every real w: the decay rate, Re(lambda) = -f(w)."""
    if reparam == "exp":
        return jnp.exp(w)
    if reparam == "softplus":
        return jax.nn.softplus(w)
    if reparam == "best":
        return 1.0 / (BEST_A * w * w + BEST_B)
    raise ValueError(f"stable_rate: `reparam` must be one of {REPARAMS}, got {reparam!r}")


def inverse_stable_rate(rate, reparam: str = "exp"):
    """w with f(w) = rate > 0 (numpy in, numpy out, so float64 inits stay exact until stored).
    "best" reaches rates up to 1/BEST_B; larger ones are clipped there (w = 0); of the two
    roots +-w the positive one is taken."""
    xp = np if isinstance(rate, np.ndarray) else jnp
    if reparam == "exp":
        return xp.log(rate)
    if reparam == "softplus":
        return inverse_softplus(rate) if xp is jnp else rate + np.log(-np.expm1(-rate))
    if reparam == "best":
        return xp.sqrt(xp.maximum((1.0 / rate - BEST_B) / BEST_A, 0.0))
    raise ValueError(f"inverse_stable_rate: `reparam` must be one of {REPARAMS}, "
                     f"got {reparam!r}")
