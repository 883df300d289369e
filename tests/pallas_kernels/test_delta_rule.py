"""The kernel contract for `delta_rule` (WORKSPACE.md, "What every op's tests show")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing as kt
from pallas_kernels import delta_rule

pytestmark = pytest.mark.kernel


def test_reference_matches_naive_numpy_loop():
    key = jax.random.PRNGKey(0)
    ks = jax.random.split(key, 6)
    b_, t_, h_, kd, vd = 2, 9, 3, 4, 5
    q = np.asarray(jax.random.normal(ks[0], (b_, t_, h_, kd)), np.float64)
    k = np.asarray(jax.random.normal(ks[1], (b_, t_, h_, kd)), np.float64)
    v = np.asarray(jax.random.normal(ks[2], (b_, t_, h_, vd)), np.float64)
    beta = np.asarray(jax.random.uniform(ks[3], (b_, t_, h_)), np.float64)
    g = -np.asarray(jax.random.uniform(ks[4], (b_, t_, h_)), np.float64)
    s0 = np.asarray(jax.random.normal(ks[5], (b_, h_, kd, vd)), np.float64)
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2]] * b_, np.int32)
    o, s = kt.float64_run(lambda *a: delta_rule(*a[:4], log_gate=a[4], initial_state=a[5],
                                                segment_ids=seg, implementation="reference"),
                          q, k, v, beta, g, s0)
    want = np.zeros((b_, t_, h_, vd))
    state = s0.copy()
    for t in range(t_):
        for b in range(b_):
            for h in range(h_):
                if t > 0 and seg[b, t] != seg[b, t - 1]:
                    state[b, h] = 0
                st = np.exp(g[b, t, h]) * state[b, h]
                st = st + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h] - st.T @ k[b, t, h])
                state[b, h] = st
                want[b, t, h] = kd ** -0.5 * st.T @ q[b, t, h]
    kt.assert_close(o, want, 1e-12, "o")
    kt.assert_close(s, state, 1e-12, "final_state")
