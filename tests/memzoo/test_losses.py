"""memzoo.losses: the chunked cross-entropy equals the plain one (value and gradients, float64),
z-loss is PaLM's, and a long vocabulary's chunked loss keeps [batch, time, vocab] out of memory."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memzoo import losses
from memzoo.models import CausalLM

B, T, D, V = 2, 13, 8, 37


def _problem(seed=0, dtype=jnp.float64):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = jax.random.normal(k[0], (B, T, D), dtype)
    w = jax.random.normal(k[1], (D, V), dtype)
    y = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(dtype)
    return h, w, y, mask


def _plain(h, w, y, mask, z_loss=0.0):
    """The definition: optax's cross-entropy plus z_loss * logsumexp^2, masked and summed."""
    logits = h @ w
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    ce = ce + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
    return jnp.sum(ce * mask), jnp.sum((logits.argmax(-1) == y) * mask)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 13, 64])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_equals_plain_value_and_gradients(chunk, z_loss):
    h, w, y, mask = _problem()

    def chunked(h, w):
        return losses.cross_entropy_sums(h, lambda x: x @ w, y, mask, chunk_size=chunk,
                                         z_loss=z_loss)

    got, want = chunked(h, w), _plain(h, w, y, mask, z_loss)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    assert float(got[1]) == float(want[1])
    g = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(h, w)
    g_ref = jax.grad(lambda h, w: _plain(h, w, y, mask, z_loss)[0], argnums=(0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # The masked positions get no gradient, including the padding of a partial last chunk.
    assert np.all(np.asarray(g[0])[np.asarray(mask) == 0] == 0)


def test_z_loss_pulls_the_normaliser_to_one():
    h, w, y, mask = _problem(1)
    base = losses.cross_entropy_sums(h, lambda x: x @ w, y, mask)[0]
    with_z = losses.cross_entropy_sums(h, lambda x: x @ w, y, mask, z_loss=0.5)[0]
    lse = jax.nn.logsumexp(h @ w, axis=-1)
    np.testing.assert_allclose(with_z - base, 0.5 * jnp.sum(lse ** 2 * mask), rtol=1e-12)


def test_causal_lm_features_then_project_is_the_model():
    lm = CausalLM(vocab_size=V, d_model=D, num_layers=1, mixer="gla",
                  mixer_options={"num_heads": 2}, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T), 0, V)
    np.testing.assert_array_equal(lm.project(lm.features(tokens)), lm(tokens))


def test_long_vocabulary_memory_stays_bounded():
    """A 32k vocabulary: the plain loss's gradient plans at least the float32 logits in
    temporaries and grows with the length; the chunked one (128 steps a chunk) holds a few
    chunks' worth, the same at T = 1024 and 4096."""
    b, d, v, chunk = 2, 64, 32768, 128

    def temps(t, chunk_size):
        args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
                jax.ShapeDtypeStruct((d, v), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.int32))
        f = jax.grad(lambda h, w, y: losses.cross_entropy_sums(
            h, lambda x: x @ w, y, chunk_size=chunk_size)[0], argnums=(0, 1))
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits = b * 1024 * v * 4
    assert temps(1024, 0) >= logits
    short, long = temps(1024, chunk), temps(4096, chunk)
    per_chunk = b * chunk * v * 4
    assert short <= 4 * per_chunk, (short, per_chunk)
    # 4x the length adds only the hidden states and their gradient, not logits.
    assert long - short <= 4 * b * 3072 * d * 4 * 2, (short, long)


def test_errors_name_the_argument():
    h, w, y, mask = _problem()
    project = lambda x: x @ w
    with pytest.raises(ValueError, match="hidden must be"):
        losses.cross_entropy_sums(h[0], project, y, mask)
    with pytest.raises(ValueError, match="targets must be"):
        losses.cross_entropy_sums(h, project, y[:, :3], mask)
    with pytest.raises(ValueError, match="mask must have"):
        losses.cross_entropy_sums(h, project, y, mask[:, :3])
    with pytest.raises(ValueError, match="chunk_size must be"):
        losses.cross_entropy_sums(h, project, y, mask, chunk_size=-1)
    with pytest.raises(ValueError, match="z_loss must be"):
        losses.cross_entropy_sums(h, project, y, mask, z_loss=-1.0)
