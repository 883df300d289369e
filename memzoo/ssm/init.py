"""Initial SSM time scales: the one home of the step-size (dt) and Mamba-2 decay initialisation.

Every selective or diagonal SSM in memzoo starts its step sizes the same way, dt log-uniform in
[dt_min, dt_max] (S4D, S5 store log dt; Mamba, Mamba-2 and Gated DeltaNet store the bias b with
softplus(b) = dt), and Mamba-2's scalar decay per head, log alpha_t = -exp(A_log) dt_t, draws
A uniform in [1, 16]. Used by memzoo/ssm/s4d.py, s5.py, mamba.py, mamba2.py and
memzoo/linear_attention/deltanet.py (Gated DeltaNet, Mixture-of-Memories).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DT_RANGE = (1e-3, 1e-1)      # dt_min, dt_max (S4, Mamba, Mamba-2, Gated DeltaNet)
DT_INIT_FLOOR = 1e-4          # Mamba's floor on the drawn dt
A_RANGE = (1.0, 16.0)         # Mamba-2's a_init_range: A = -U[1, 16] per head


def log_uniform(key, shape, lo: float, hi: float) -> jax.Array:
    """log x for x log-uniform in [lo, hi], float32 (S4D and S5 store log dt directly)."""
    return jax.random.uniform(key, shape, jnp.float32, math.log(lo), math.log(hi))


def inverse_softplus(y):
    """b with softplus(b) = y > 0: y + log(1 - exp(-y)), written with expm1, which keeps it
    exact for the small dt drawn here (log1p(-exp(-y)) would cancel)."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(key, shape, dt_min: float = DT_RANGE[0], dt_max: float = DT_RANGE[1],
                 floor: float = DT_INIT_FLOOR) -> jax.Array:
    """b with softplus(b) = dt, dt log-uniform in [dt_min, dt_max] floored at `floor`."""
    dt = jnp.maximum(jnp.exp(log_uniform(key, shape, dt_min, dt_max)), floor)
    return inverse_softplus(dt)


def mamba2_decay_init(key, shape, *, a_range: tuple[float, float] = A_RANGE,
                      dt_min: float = DT_RANGE[0], dt_max: float = DT_RANGE[1],
                      dt_init_floor: float = DT_INIT_FLOOR) -> tuple[jax.Array, jax.Array]:
    """(A_log, dt_bias), each `shape` float32, for log alpha = -exp(A_log) softplus(. + dt_bias):
    A uniform in `a_range`, dt as `dt_bias_init`. Mamba-2 and Gated DeltaNet."""
    k_dt, k_a = jax.random.split(key)
    a = jax.random.uniform(k_a, shape, jnp.float32, *a_range)
    return jnp.log(a), dt_bias_init(k_dt, shape, dt_min, dt_max, dt_init_floor)


def mamba2_log_decay(logits, A_log):
    """-exp(A_log) softplus(logits) in float32: the log of a decay in (0, 1] (the logits
    include the dt bias)."""
    return -jnp.broadcast_to(jnp.exp(A_log), logits.shape) * jax.nn.softplus(
        logits.astype(jnp.float32))


RGLRU_A_RANGE = (0.9, 0.999)  # Griffin's range for the RG-LRU's decay at a fully open gate
RGLRU_A_INITS = ("paper", "recurrentgemma")


def rglru_lambda_init(key, shape, *, c: float = 8.0,
                      a_range: tuple[float, float] = RGLRU_A_RANGE,
                      kind: str = "paper") -> jax.Array:
    """Lambda for the RG-LRU's log a_t = -c softplus(Lambda) r_t, float32.

    "paper" (De et al. 2024, section 2.4): a^c = exp(-c softplus(Lambda)), the decay per step at
    r_t = 1, uniform in `a_range`. "recurrentgemma" (its code, rnn_real_param_init): the base
    exp(-softplus(Lambda)) in `a_range` with its square uniform (uniform on the ring), so the
    decay at r_t = 1 is that base to the power c, much shorter memories (0.43 .. 0.992 for
    c = 8) than the paper's text.
    """
    lo, hi = a_range
    u = jax.random.uniform(key, shape, jnp.float32)
    if kind == "paper":
        minus_log_base = -jnp.log(lo + (hi - lo) * u) / c
    elif kind == "recurrentgemma":
        minus_log_base = -0.5 * jnp.log(lo ** 2 + (hi ** 2 - lo ** 2) * u)
    else:
        raise ValueError(f"rglru_lambda_init: kind must be one of {RGLRU_A_INITS}, got {kind!r}")
    return inverse_softplus(minus_log_base)
