"""Shared layers: float32 parameters with logical axes, the MLP and GLU against their formulas,
norms' statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo import layers
from pallas_kernels._testing import assert_close


def test_param_carries_logical_axes():
    p = layers.param(jnp.zeros((2, 3)), ("embed", "mlp"))
    assert p.get_metadata()["out_sharding"] == ("embed", "mlp")
    with pytest.raises(ValueError, match="axis names"):
        layers.param(jnp.zeros((2, 3)), ("embed",))


def _silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("gated", [False, True])
def test_mlp_is_the_two_layer_formula(gated):
    """float32 against the formula in float64 numpy; bfloat16 compute (float32 parameters)
    against float32 to bfloat16 rounding."""
    mlp = layers.MLP(8, 16, activation="silu", gated=gated, rngs=nnx.Rngs(0))
    # Every parameter random (biases start at zero, which would hide a missing bias).
    params = nnx.state(mlp, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params))))
    nnx.update(mlp, jax.tree.map(lambda p: 0.5 * jax.random.normal(next(keys), p.shape), params))
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))

    xd = np.asarray(x, np.float64)
    def affine(linear, h):
        return h @ np.asarray(linear.kernel[...], np.float64) + np.asarray(linear.bias[...],
                                                                          np.float64)
    if gated:  # SwiGLU: silu(gate) * value, gate first
        h = affine(mlp.up.proj, xd)
        h = _silu(h[..., :16]) * h[..., 16:]
    else:
        h = _silu(affine(mlp.up, xd))
    want = affine(mlp.down, h)
    y = nnx.jit(lambda m, x: m(x))(mlp, x)
    assert y.shape == (2, 3, 8) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)

    mlp16 = layers.MLP(8, 16, activation="silu", gated=gated, dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(0))
    nnx.update(mlp16, nnx.state(mlp, nnx.Param))
    for _, v in nnx.to_flat_state(nnx.state(mlp16, nnx.Param)):
        assert v[...].dtype == jnp.float32
    y16 = nnx.jit(lambda m, x: m(x))(mlp16, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(np.asarray(y16, np.float32), want, 2e-2, "bf16 vs f32")
    assert mlp.down.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")


def test_glu_is_gate_times_value():
    glu = layers.GLU(4, 3, activation="sigmoid", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 4))
    W, b = glu.proj.kernel[...], glu.proj.bias[...]
    h = x @ W + b[None]
    np.testing.assert_allclose(glu(x), jax.nn.sigmoid(h[:, :3]) * h[:, 3:], rtol=1e-6)


def test_norms():
    x = jax.random.normal(jax.random.key(0), (4, 16)) * 3 + 1
    y = layers.RMSNorm(16)(x)
    np.testing.assert_allclose(jnp.mean(y ** 2, axis=-1), 1.0, rtol=1e-4)
    y = layers.LayerNorm(16)(x)
    np.testing.assert_allclose(jnp.mean(y, axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, axis=-1), 1.0, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown 'batchnorm'"):
        layers.norm("batchnorm", 16, rngs=nnx.Rngs(0))


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown 'mish'"):
        layers.get_activation("mish")
