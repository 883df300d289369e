"""StableSSM's reparameterisations (memzoo/ssm/reparam.py; Wang & Li, 2023) and their use in
S4D, S5 and Mamba: Re(lambda) = -f(w) < 0 for every w, f^-1 inverts f, the paper's gradient
criterion |f'(w)| / f(w)^2 = 2 a |w| holds for "best" (and fails to stay linear for exp and
softplus), and each module under `reparam` is the default module with w -> log f(w)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.ssm.mamba import Mamba
from memzoo.ssm.reparam import BEST_A, BEST_B, REPARAMS, inverse_stable_rate, stable_rate
from memzoo.ssm.s4d import S4D
from memzoo.ssm.s5 import S5
from pallas_kernels._testing import assert_close

W = np.linspace(-30.0, 30.0, 601)


@pytest.mark.parametrize("reparam", REPARAMS)
def test_rate_is_positive_and_inverts(reparam):
    with jax.enable_x64(True):
        f = np.asarray(stable_rate(jnp.asarray(W), reparam))
        assert np.all(f > 0) and np.all(np.isfinite(f))
        rates = np.array([1e-3, 0.01, 0.5, 1.0, 16.0, 100.0])
        for r in (rates, jnp.asarray(rates)):  # numpy and jax inputs
            w = inverse_stable_rate(r, reparam)
            np.testing.assert_allclose(np.asarray(stable_rate(jnp.asarray(w), reparam)), rates,
                                       rtol=1e-10)
    if reparam == "best":
        assert float(stable_rate(jnp.zeros(()), "best")) == pytest.approx(1 / BEST_B)
        np.testing.assert_array_equal(inverse_stable_rate(np.array([2 / BEST_B]), "best"), 0.0)


def test_gradient_scale_criterion():
    """G_f(w) = |f'(w)| / f(w)^2: exactly 2 a |w| for "best" (the gradient-over-weight ratio is
    the same at every rate); exp and softplus grow like exp(-w) as the memory lengthens
    (w -> -inf), far above any linear bound."""
    with jax.enable_x64(True):
        w = jnp.asarray(W)
        for reparam in REPARAMS:
            f = stable_rate(w, reparam)
            df = jax.vmap(jax.grad(lambda v: stable_rate(v, reparam)))(w)
            G = np.asarray(jnp.abs(df) / f ** 2)
            if reparam == "best":
                np.testing.assert_allclose(G, 2 * BEST_A * np.abs(W), rtol=1e-12, atol=1e-300)
            else:
                long_memory = W < -10
                np.testing.assert_allclose(G[long_memory], np.exp(-W[long_memory]), rtol=1e-4)
                assert np.all(G[long_memory] > 1e3 * np.abs(W[long_memory]))


def _modules(reparam, seed=0):
    rngs = lambda: nnx.Rngs(seed)
    return {"s4d": S4D(4, state_size=8, mode="recurrent", reparam=reparam, rngs=rngs()),
            "s4d_conv_lin": S4D(4, state_size=8, init="lin", reparam=reparam, rngs=rngs()),
            "s5": S5(4, state_size=8, reparam=reparam, rngs=rngs()),
            "mamba": Mamba(8, state_size=4, reparam=reparam, rngs=rngs())}


def _w(m):
    return {S4D: "log_neg_a_real", S5: "log_neg_lambda_real", Mamba: "A_log"}[type(m)]


def _real_part(m):
    if isinstance(m, S4D):
        return m._A().real
    if isinstance(m, S5):
        w = m.log_neg_lambda_real[...]
        return -stable_rate(w, m.reparam)
    return m.A()


@pytest.mark.parametrize("reparam", ["softplus", "best"])
def test_modules_use_the_reparameterisation(reparam):
    """Same initial eigenvalues as the default; stable for any w (here w ~ 10 N(0, 1)); and the
    output equals the default module's with w replaced by log f(w)."""
    x = jax.random.normal(jax.random.key(1), (2, 12, 8))
    refs = _modules("exp")
    for name, m in _modules(reparam).items():
        ref = refs[name]
        xi = x[..., :m.d_model]
        assert_close(_real_part(m), _real_part(ref), 1e-6, f"{name}: initial Re(lambda)")
        assert_close(m(xi), ref(xi), 1e-5, f"{name}: output at init")
        p = getattr(m, _w(m))
        p[...] = 10.0 * jax.random.normal(jax.random.key(2), p[...].shape)
        assert bool(jnp.all(_real_part(m) < 0)), name
        getattr(ref, _w(ref))[...] = jnp.log(stable_rate(p[...], reparam))
        assert_close(m(xi), ref(xi), 1e-5, f"{name}: reparam vs exp of log f(w)")


@pytest.mark.parametrize("cls", [S4D, S5, Mamba])
def test_bad_reparam_names_the_option(cls):
    with pytest.raises(ValueError, match="`reparam`"):
        cls(8, state_size=4, reparam="tanh", rngs=nnx.Rngs(0))
