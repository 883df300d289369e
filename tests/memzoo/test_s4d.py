"""S4D: the Vandermonde kernel against its closed form, convolution mode == recurrent mode,
the inits."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.ssm import S4D, s4d
from pallas_kernels._testing import assert_close, float64_run
from tests.memzoo.helpers import forward, prefill


def _closed_form_kernel(A, B, C, dt, length, method):
    """K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l), with the paper's formulas and explicit powers."""
    dtA = dt[:, None] * A
    if method == "zoh":
        abar = np.exp(dtA)
        bbar = (np.exp(dtA) - 1) / A * B
    else:
        abar = (1 + dtA / 2) / (1 - dtA / 2)
        bbar = dt[:, None] / (1 - dtA / 2) * B
    powers = np.stack([abar ** l for l in range(length)], axis=-1)
    return 2 * np.einsum("dn,dnl->dl", C * bbar, powers).real


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", ["legs", "inv", "lin"])
def test_vandermonde_kernel_matches_closed_form_in_float64(method, init):
    rng = np.random.default_rng(0)
    d, n, length = 3, 8, 50
    lam, b = s4d.s4d_init(init, n)
    A = np.broadcast_to(lam, (d, n // 2)).copy()
    B = np.broadcast_to(b, (d, n // 2)).copy()
    C = rng.normal(size=(d, n // 2)) + 1j * rng.normal(size=(d, n // 2))
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), size=d))
    got = float64_run(lambda *a: s4d.s4d_kernel(*a, length, method), A, B, C, dt)
    assert got.dtype == np.float64
    assert_close(got, _closed_form_kernel(A, B, C, dt, length, method), 1e-12, "kernel")


def test_kernel_is_the_recurrent_impulse_response():
    layer = S4D(4, state_size=8, mode="recurrent", rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 32, 4)).at[0, 0].set(1.0)
    impulse = forward(layer, x) - layer.D[...][None, None] * x
    assert_close(impulse[0].T, layer.kernel(32), 1e-5, "impulse response vs kernel")


@pytest.mark.parametrize("method,bidirectional", [("zoh", False), ("bilinear", True)])
def test_conv_equals_recurrent_at_length_4096(method, bidirectional):
    options = dict(state_size=16, method=method, bidirectional=bidirectional)
    conv = S4D(2, mode="conv", rngs=nnx.Rngs(0), **options)
    rec = S4D(2, mode="recurrent", rngs=nnx.Rngs(0), **options)
    x = jax.random.normal(jax.random.key(1), (1, 4096, 2))
    assert_close(forward(conv, x), forward(rec, x), 1e-4, "conv vs recurrent")


def test_conv_prefill_carries_the_same_state_as_the_scan():
    conv = S4D(4, state_size=8, mode="conv", rngs=nnx.Rngs(0))
    rec = S4D(4, state_size=8, mode="recurrent", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 40, 4))
    y_c, c_c = prefill(conv, x[:, :25], conv.init_cache(2))
    y_r, c_r = prefill(rec, x[:, :25], rec.init_cache(2))
    assert_close(c_c.state, c_r.state, 1e-5, "state after prefill")
    y_c2, c_c2 = prefill(conv, x[:, 25:], c_c)
    y_r2, c_r2 = prefill(rec, x[:, 25:], c_r)
    assert_close(y_c2, y_r2, 1e-5, "continuation")
    assert_close(c_c2.state, c_r2.state, 1e-5, "state after continuation")


def test_inits():
    n = 8
    lam, _ = s4d.s4d_init("lin", n)
    np.testing.assert_allclose(lam, -0.5 + 1j * math.pi * np.arange(4))
    lam, _ = s4d.s4d_init("inv", n)
    np.testing.assert_allclose(lam, -0.5 + 1j * n / math.pi * (n / (2 * np.arange(4) + 1) - 1))
    lam, b = s4d.s4d_init("legs", n)
    np.testing.assert_allclose(lam.real, -0.5)
    assert b.shape == (4,) and np.iscomplexobj(b)
    layer = S4D(3, state_size=n, init="random", rngs=nnx.Rngs(0))
    assert np.all(np.asarray(layer._A().real) < 0)
    with pytest.raises(ValueError, match="init must be one of"):
        S4D(3, state_size=n, init="hippo", rngs=nnx.Rngs(0))


def test_log_dt_is_log_uniform_in_the_paper_range():
    layer = S4D(512, state_size=2, rngs=nnx.Rngs(0))
    dt = np.exp(np.asarray(layer.log_dt[...]))
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 1e-1 * (1 + 1e-6)
    # Log-uniform: the log's median sits in the middle of the log range.
    assert abs(np.median(np.log(dt)) - math.log(1e-2)) < 0.3


def test_bad_options():
    with pytest.raises(ValueError, match="state_size must be even"):
        S4D(3, state_size=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mode must be one of"):
        S4D(3, state_size=4, mode="fft", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="discretization method"):
        S4D(3, state_size=4, method="forward_euler", rngs=nnx.Rngs(0))


def test_recurrent_mode_through_the_pallas_kernel():
    """The model path on the GPU kernel (interpreted on CPU): complex forward and reverse scans,
    and their custom VJP, give what the XLA path gives."""
    from pallas_kernels import pallas_interpret

    options = dict(state_size=8, mode="recurrent", bidirectional=True)
    x = jax.random.normal(jax.random.key(1), (1, 8, 4))

    def loss(m):
        return jnp.sum(m(x) ** 2)

    ref = S4D(4, rngs=nnx.Rngs(0), scan_implementation="xla", **options)
    with pallas_interpret("generic", target="cuda"):
        layer = S4D(4, rngs=nnx.Rngs(0), scan_implementation="pallas", **options)
        y = layer(x)
        grads = nnx.grad(loss)(layer)
    assert_close(y, ref(x), 1e-6, "pallas vs xla output")
    ref_grads = nnx.grad(loss)(ref)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert_close(g, r, 1e-5, "pallas vs xla gradient")
