"""Mamba-2: the SSD block against its published equations written out in float64 numpy (heads,
grouped B/C, gated RMSNorm), independence from the chunk size, and the initialisations. The
contract shared with Mamba (decoding, segments, causality, dtypes, errors) is in test_mamba.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.ssm import Mamba2
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward

D, T, BATCH = 16, 20, 2


def inputs(seed=1, length=T):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D), jnp.float32)


def _np(v):
    return np.asarray(v[...], np.float64)


def softplus(x):
    return np.logaddexp(0.0, x)


def silu(x):
    return x / (1.0 + np.exp(-x))


def naive_mamba2(m: Mamba2, u):
    """The paper's Mamba-2 block, one token at a time, from the module's own parameters."""
    u = np.asarray(u, np.float64)
    b, t_len, _ = u.shape
    E, N, H, P, G, W = (m.d_inner, m.state_size, m.num_heads, m.head_dim, m.num_groups,
                        m.conv_width)
    proj = u @ _np(m.in_proj.kernel)
    z, xbc, dt_raw = proj[..., :E], proj[..., E:2 * E + 2 * G * N], proj[..., 2 * E + 2 * G * N:]
    w, cb = _np(m.conv_weight), _np(m.conv_bias)
    A = -np.exp(_np(m.A_log))                                              # [H]
    group = np.arange(H) // (H // G)                                       # head -> its group
    S = np.zeros((b, H, N, P))
    ys = []
    for t in range(t_len):
        c = silu(sum(w[i] * xbc[:, t - W + 1 + i] for i in range(W) if t - W + 1 + i >= 0) + cb)
        x = c[:, :E].reshape(b, H, P)
        Bt = c[:, E:E + G * N].reshape(b, G, N)[:, group]                # [b, H, N]
        Ct = c[:, E + G * N:].reshape(b, G, N)[:, group]
        dt = np.clip(softplus(dt_raw[:, t] + _np(m.dt_bias)), *m.dt_limit)  # [b, H]
        S = (np.exp(dt * A)[..., None, None] * S
             + Bt[..., :, None] * (dt[..., None] * x)[..., None, :])
        y = np.einsum("bhnp,bhn->bhp", S, Ct) + _np(m.D_skip)[:, None] * x
        g = y.reshape(b, E) * silu(z[:, t])
        g = g.reshape(b, G, E // G)
        g = g / np.sqrt(np.mean(g ** 2, axis=-1, keepdims=True) + m.norm.epsilon)
        ys.append((g.reshape(b, E) * _np(m.norm.scale)) @ _np(m.out_proj.kernel))
    return np.stack(ys, axis=1)


CASES = [
    ("one_group", dict(state_size=4, head_dim=8, chunk_size=8)),
    ("groups_2", dict(state_size=6, head_dim=4, num_groups=2, chunk_size=4, expand=1)),
    ("group_per_head_mimetic", dict(state_size=4, head_dim=8, num_groups=4, chunk_size=8,
                                    init="mimetic", dt_limit=(1e-3, 0.08))),
]


@pytest.mark.parametrize("name,options", CASES, ids=[c[0] for c in CASES])
def test_equals_the_published_recurrence_in_float64(name, options):
    m = Mamba2(D, rngs=nnx.Rngs(0), **options)
    # Non-trivial D and norm scale so the reference checks where they enter.
    m.D_skip[...] = jax.random.normal(jax.random.key(3), m.D_skip[...].shape)
    m.norm.scale[...] = 1 + 0.1 * jax.random.normal(jax.random.key(4), m.norm.scale[...].shape)
    x = inputs()
    assert_close(forward(m, x), naive_mamba2(m, x), 1e-5, f"Mamba2 {name} vs float64")


def test_groups_share_B_and_C_across_their_heads():
    """With G groups, moving one group's B columns changes only that group's heads."""
    m = Mamba2(D, state_size=4, head_dim=8, num_groups=2, rngs=nnx.Rngs(0))
    assert m.num_heads == 4
    x = inputs()
    z, xbc, dt = m._split_in(x)
    _, B, C, _ = m._heads(jax.nn.silu(xbc), dt)
    np.testing.assert_array_equal(B[:, :, 0], B[:, :, 1])
    np.testing.assert_array_equal(C[:, :, 2], C[:, :, 3])
    assert float(jnp.max(jnp.abs(B[:, :, 1] - B[:, :, 2]))) > 0


def test_chunk_size_does_not_change_the_result():
    x = inputs(length=23)
    outs = [forward(Mamba2(D, state_size=4, head_dim=8, chunk_size=c, rngs=nnx.Rngs(0)), x)
            for c in (3, 8, 64)]
    assert_close(outs[0], outs[2], 1e-5, "chunk 3 vs 64")
    assert_close(outs[1], outs[2], 1e-5, "chunk 8 vs 64")


def test_published_initialisation_and_default_heads():
    m = Mamba2(32, state_size=8, rngs=nnx.Rngs(0))
    assert (m.d_inner, m.head_dim, m.num_heads) == (64, 64, 1)
    m = Mamba2(16, state_size=8, head_dim=4, rngs=nnx.Rngs(0))
    assert m.num_heads == 8
    A = np.exp(_np(m.A_log))
    assert A.min() >= 1.0 - 1e-6 and A.max() <= 16.0 + 1e-5 and np.ptp(A) > 1.0
    np.testing.assert_array_equal(_np(m.D_skip), 1.0)
    dt = softplus(_np(m.dt_bias))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    np.testing.assert_array_equal(_np(m.norm.scale), 1.0)


def test_mimetic_initialisation():
    m = Mamba2(D, state_size=4, head_dim=8, num_groups=2, init="mimetic", rngs=nnx.Rngs(0))
    E, GN = m.d_inner, m.num_groups * m.state_size
    k = _np(m.in_proj.kernel)
    np.testing.assert_array_equal(k[:, 2 * E + GN:2 * E + 2 * GN], k[:, 2 * E:2 * E + GN])
    np.testing.assert_array_equal(_np(m.conv_weight)[:-1], 0.0)
    np.testing.assert_array_equal(_np(m.conv_weight)[-1], 1.0)
    np.testing.assert_allclose(np.exp(_np(m.A_log)), 0.01, rtol=1e-6)
    # After the (identity) conv, C equals B: every head reads with the key it writes with.
    z, xbc, dt = m._split_in(inputs())
    _, B, C, _ = m._heads(jax.nn.silu(xbc), dt)
    np.testing.assert_array_equal(B, C)
