"""Shared layers: shapes, float32 parameters with logical axes, norms' statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo import layers


def test_param_carries_logical_axes():
    p = layers.param(jnp.zeros((2, 3)), ("embed", "mlp"))
    assert p.get_metadata()["out_sharding"] == ("embed", "mlp")
    with pytest.raises(ValueError, match="axis names"):
        layers.param(jnp.zeros((2, 3)), ("embed",))


@pytest.mark.parametrize("gated", [False, True])
def test_mlp(gated):
    mlp = layers.MLP(8, 16, activation="silu", gated=gated, dtype=jnp.bfloat16,
                     rngs=nnx.Rngs(0))
    y = mlp(jnp.ones((2, 3, 8)))
    assert y.shape == (2, 3, 8) and y.dtype == jnp.bfloat16
    for _, v in nnx.to_flat_state(nnx.state(mlp, nnx.Param)):
        assert v[...].dtype == jnp.float32
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
