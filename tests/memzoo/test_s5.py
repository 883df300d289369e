"""S5: HiPPO-N initialisation (optionally block-diagonal), the MIMO recurrence against a dense
float64 reference of the full (unhalved) complex system."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.ssm import S5, hippo, s5
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_hippo_n_init_blocks(blocks):
    lam, V = s5.hippo_n_init(16, blocks)
    assert lam.shape == (8,) and V.shape == (16, 8)
    np.testing.assert_allclose(V.conj().T @ V, np.eye(8), atol=1e-12)
    block_lam, _ = hippo.legs_normal_eig(16 // blocks)
    np.testing.assert_allclose(lam, np.tile(block_lam, blocks))
    # Block-diagonal: state i only mixes with states of its own block.
    size = 16 // blocks
    mask = np.kron(np.eye(blocks), np.ones((size, size // 2)))
    np.testing.assert_array_equal(V[mask == 0], 0)


def test_bad_blocks():
    with pytest.raises(ValueError, match="blocks"):
        s5.hippo_n_init(16, 3)


def test_matches_the_full_conjugate_symmetric_system():
    """2 Re over the stored half == the real output of the full P-state system."""
    layer = S5(3, state_size=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 20, 3))
    abar, bbar = (np.asarray(a, np.complex128) for a in layer._discrete())
    C = np.asarray(layer._C(0), np.complex128)
    Af = np.concatenate([abar, abar.conj()])
    Bf = np.concatenate([bbar, bbar.conj()])
    Cf = np.concatenate([C, C.conj()], axis=1)
    h = np.zeros(8, np.complex128)
    ys = []
    for t in range(20):
        u = np.asarray(x[0, t], np.float64)
        h = Af * h + Bf @ u
        ys.append((Cf @ h).real + np.asarray(layer.D[...]) * u)
    ref = np.stack(ys)
    assert np.max(np.abs((Cf @ h).imag)) < 1e-6  # the full system's output is real
    assert_close(forward(layer, x)[0], ref, 1e-5, "S5 vs full system")


def test_per_state_step_and_stable_spectrum():
    layer = S5(4, state_size=16, rngs=nnx.Rngs(0))
    assert layer.log_step.shape == (8,)
    abar, _ = layer._discrete()
    assert float(jnp.max(jnp.abs(abar))) < 1.0
