"""HiPPO: the matrices' known structure, the one discretisation module, and the paper's
property that the memory reconstructs a smooth history better as the state grows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from memzoo.ssm import discretization, hippo
from pallas_kernels._testing import float64_run


def test_legs_is_lower_triangular_with_diagonal_minus_n_plus_one():
    A, B = hippo.hippo_matrices("legs", 8)
    np.testing.assert_array_equal(np.triu(A, 1), 0.0)
    np.testing.assert_array_equal(np.diag(A), -(np.arange(8) + 1.0))
    n, k = 5, 2
    assert A[n, k] == pytest.approx(-np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1))
    np.testing.assert_allclose(B, np.sqrt(2 * np.arange(8) + 1))


def test_legs_normal_part_is_minus_half_plus_skew():
    A, _ = hippo.hippo_matrices("legs", 10)
    p = np.sqrt(np.arange(10) + 0.5)
    S = A + np.outer(p, p) + 0.5 * np.eye(10)
    np.testing.assert_allclose(S, -S.T, atol=1e-12)


def test_legs_normal_eig_diagonalises_unitarily():
    lam, V = hippo.legs_normal_eig(12)
    A, _ = hippo.hippo_matrices("legs", 12)
    p = np.sqrt(np.arange(12) + 0.5)
    AN = A + np.outer(p, p)
    np.testing.assert_allclose(AN @ V, V * lam[None], atol=1e-10)
    np.testing.assert_allclose(V.conj().T @ V, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(lam.real, -0.5)
    assert np.all(lam.imag > 0) and np.all(np.diff(lam.imag) < 0)
    # The stored half and its conjugate are the whole spectrum.
    full = np.linalg.eigvals(AN)
    both = np.concatenate([lam, lam.conj()])
    np.testing.assert_allclose(both[np.argsort(both.imag)], full[np.argsort(full.imag)],
                               atol=1e-8)


def test_fout_is_skew_minus_rank_one():
    A, B = hippo.hippo_matrices("fout", 9)
    S = A + np.outer(B, B) / 2
    np.testing.assert_allclose(S, -S.T, atol=1e-12)
    np.testing.assert_allclose(B[:3], [2.0, 2 * np.sqrt(2), 0.0])


def test_lagt_and_legt_are_stable():
    for measure in ("lagt", "legt"):
        A, _ = hippo.hippo_matrices(measure, 16, theta=1.0)
        assert np.max(np.linalg.eigvals(A).real) < 0, measure
    A, _ = hippo.hippo_matrices("lagt", 6)
    np.testing.assert_array_equal(np.triu(A, 1), 0.0)
    np.testing.assert_array_equal(np.diag(A), -0.5)


def test_unknown_measure():
    with pytest.raises(ValueError, match="measure must be one of"):
        hippo.hippo_matrices("cheb", 4)


@pytest.mark.parametrize("method,local_order", [("forward_euler", 2), ("backward_euler", 2),
                                                ("bilinear", 3)])
def test_discretize_converges_at_its_order(method, local_order):
    """One step's error against exp(dt A) shrinks as dt^(order+1): halving dt divides it by
    2^(local order)."""
    A, B = hippo.hippo_matrices("legt", 6, theta=1.0)

    def error(dt):
        Ad, Bd = discretization.discretize(A, B[:, None], dt, method)
        exact_A, exact_B = discretization.discretize(A, B[:, None], dt, "zoh")
        return np.linalg.norm(Ad - exact_A) + np.linalg.norm(Bd - exact_B)

    ratio = error(1e-3) / error(5e-4)
    assert 2 ** local_order * 0.9 < ratio < 2 ** local_order * 1.1, ratio


def test_zoh_is_exact():
    A, B = hippo.hippo_matrices("legt", 6, theta=1.0)
    dt = 0.01
    Ad, Bd = discretization.discretize(A, B[:, None], dt, "zoh")
    np.testing.assert_allclose(Ad, scipy.linalg.expm(dt * A), atol=1e-12)
    exact_B = np.linalg.solve(A, (scipy.linalg.expm(dt * A) - np.eye(6)) @ B[:, None])
    np.testing.assert_allclose(Bd, exact_B, atol=1e-12)


@pytest.mark.parametrize("method", ["forward_euler", "backward_euler", "bilinear"])
def test_gbt_step_equals_dense_discretisation(method):
    A, B = hippo.hippo_matrices("legs", 6)
    dt = 0.3
    Ad, Bd = discretization.discretize(A, B[:, None], dt, method)
    c = np.random.default_rng(0).normal(size=(3, 6))
    f = np.array([0.5, -1.0, 2.0])
    got = float64_run(lambda *a: discretization.gbt_step(*a, dt, method), A, B, c, f)
    np.testing.assert_allclose(got, c @ Ad.T + f[:, None] * Bd[None, :, 0], atol=1e-12)


def test_diagonal_discretisation_matches_dense():
    lam = np.array([-0.5 + 2j, -0.1 + 0.3j])
    for method in ("zoh", "bilinear"):
        abar, scale = float64_run(discretization.discretize_diag, lam, 0.05, method)
        for i, l in enumerate(lam):
            # The 2x2 real form of one complex mode.
            A = np.array([[l.real, -l.imag], [l.imag, l.real]])
            Ad, Bd = discretization.discretize(A, np.array([[1.0], [0.0]]), 0.05, method)
            np.testing.assert_allclose(Ad[:, 0], [abar[i].real, abar[i].imag], atol=1e-12)
            np.testing.assert_allclose(Bd[:, 0], [scale[i].real, scale[i].imag], atol=1e-12)


def _signal(length):
    s = np.arange(1, length + 1) / length
    return s, np.sin(20 * s) + 0.5 * np.cos(31 * s) + s


def _reconstruction_error(measure, state_size, length=1024):
    s, f = _signal(length)
    op = hippo.HippoOperator.build(measure, state_size, method="bilinear", theta=length)
    c = float64_run(lambda f: hippo.run_memory(op, f, dtype=jnp.float64), f[None])[0, -1]
    x = (np.arange(length) + 0.5) / length
    if measure == "legs":  # x = s / t over the whole history
        ref = np.interp(x, s, f)
    else:  # legt: x = lag / theta over the window, which here is the whole history
        ref = np.interp(1 - x, s, f)
    rec = hippo.evaluation_matrix(measure, state_size, x) @ c
    return np.sqrt(np.mean((rec - ref) ** 2) / np.mean(ref ** 2))


@pytest.mark.parametrize("measure", ["legs", "legt"])
def test_reconstruction_error_falls_as_state_grows(measure):
    # The signal has enough high-frequency content that the projection, not the step size
    # (1024 steps), limits the error over this range of N.
    errors = [_reconstruction_error(measure, n) for n in (4, 8, 16, 32)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05, errors


def test_fout_reconstructs_a_window():
    errors = []
    s, f = _signal(1024)
    for n in (5, 9, 17):
        op = hippo.HippoOperator.build("fout", n, method="bilinear", dt=1.0 / 1024)
        c = float64_run(lambda f: hippo.run_memory(op, f, dtype=jnp.float64), f[None])[0, -1]
        x = (np.arange(1024) + 0.5) / 1024
        rec = hippo.evaluation_matrix("fout", n, x) @ c
        ref = np.interp(x, s, f)
        errors.append(np.sqrt(np.mean((rec - ref) ** 2) / np.mean(ref ** 2)))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


def test_legs_zoh_is_refused_clearly():
    with pytest.raises(ValueError, match="zoh"):
        hippo.HippoOperator.build("legs", 4, method="zoh")


def test_hippo_rnn_memory_is_the_hippo_recurrence():
    """The cell's c is exactly run_memory over the scalars it wrote."""
    from flax import nnx
    from memzoo.ssm import HippoRNN
    from tests.memzoo import helpers
    m = HippoRNN(4, state_size=6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 10, 4))
    cache = m.init_cache(1)
    fs = []
    for t in range(10):
        prev = cache
        _, cache = helpers.step(m, x[:, t], cache)
        fs.append(m.memory_in(cache.h)[:, 0])
    op = hippo.HippoOperator.build("legs", 6, method="bilinear")
    c = hippo.run_memory(op, jnp.stack(fs, axis=1))
    np.testing.assert_allclose(np.asarray(c[:, -1]), np.asarray(cache.c), rtol=1e-5, atol=1e-6)
    assert cache.t.tolist() == [10] and prev is not cache



# ---- packed documents (segment_ids) --------------------------------------------------------------
PACKED = [[4, 2, 7], [3, 1, 9]]


@pytest.mark.parametrize("measure", ["legs", "legt"])
def test_hippo_rnn_packed_documents_equal_each_alone(measure):
    """The RNN state, the memory and LegS's 1/t clock restart at every document: forward,
    prefill + decoding across the starts, and gradients."""
    from flax import nnx
    from memzoo.ssm import HippoRNN
    from tests.memzoo import helpers
    m = HippoRNN(4, state_size=6, measure=measure, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 13, 4))
    y = helpers.assert_packed_equals_alone(m, x, PACKED)
    assert helpers.relative_rmse(helpers.forward(m, x)[0, 6:], y[0, 6:]) > 1e-3
    dec = helpers.assert_packed_decoding_equals_alone(m, x, PACKED, t1=5)
    assert helpers.relative_rmse(dec, y) < 1e-5
    helpers.assert_packed_gradients_equal_alone(m, x, PACKED)
