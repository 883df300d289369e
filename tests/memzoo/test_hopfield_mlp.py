"""Hopfield as an MLP-slot kind (mlp="hopfield"): multi-head retrieval from learned stored
patterns against a float64 per-head reference, the model's decoding (a per-token layer: no
cache of its own), errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.memory_layers import Hopfield
from memzoo.models import CausalLM
from pallas_kernels import _testing as kt
from tests.memzoo.helpers import lm_prefill_then_decode


def _naive(p, x, *, heads, beta, steps):
    xi = x @ p["wq"]
    dh = xi.shape[-1] // heads
    outs = []
    for h in range(heads):
        xh, xs = xi[..., h * dh:(h + 1) * dh], p["patterns"][:, h * dh:(h + 1) * dh]
        for _ in range(steps):
            xh = jax.nn.softmax(beta * xh @ xs.T, axis=-1) @ xs
        outs.append(xh)
    return jnp.concatenate(outs, -1) @ p["wo"]


@pytest.mark.parametrize("heads,steps", [(1, 1), (3, 2)])
def test_multi_head_stored_patterns_match_float64(heads, steps):
    hop = Hopfield(8, num_patterns=10, pattern_dim=12, num_heads=heads, update_steps=steps,
                   rngs=nnx.Rngs(0))
    assert hop.beta == pytest.approx((12 // heads) ** -0.5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
    p = {"wq": hop.query.kernel[...], "wo": hop.out.kernel[...], "patterns": hop.patterns[...]}
    ref = kt.float64_run(lambda p, x: _naive(p, x, heads=heads, beta=hop.beta, steps=steps),
                         p, x)
    kt.assert_close(hop(x), ref, 1e-5, "out")
    if heads > 1:    # heads are not one big head
        single = _naive(p, x, heads=1, beta=hop.beta, steps=steps)
        assert not np.allclose(hop(x), single, atol=1e-3)


def test_mlp_slot_decodes_as_the_parallel_form():
    lm = CausalLM(vocab_size=11, d_model=8, num_layers=2, mixer="attention",
                  mixer_options={"num_heads": 2}, mlp="hopfield",
                  mlp_options={"num_patterns": 6, "num_heads": 2}, rngs=nnx.Rngs(0))
    assert isinstance(lm.stack.layers[0].mlp, Hopfield) and lm.stack.layers[0].mlp.num_heads == 2
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 6)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(lm, tokens)
    kt.assert_close(lm_prefill_then_decode(lm, tokens, 2), full, 1e-5, "decode")


def test_errors():
    with pytest.raises(ValueError, match="`pattern_dim` \\(10\\) must be divisible by `num_heads`"):
        Hopfield(8, pattern_dim=10, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`num_heads` must be an integer >= 1"):
        Hopfield(8, num_heads=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`num_heads` > 1 is for the stored patterns"):
        Hopfield(8, num_heads=2, associate_input=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.mlp"):
        from configs.base import ModelConfig
        ModelConfig(mlp="hopfeld")
