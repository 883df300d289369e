"""RWKV-7's value residual through CausalLM's side channel (memzoo.models): layer 1's values
reach the later layers, parallel == prefill + decode, scanned == unrolled, packed documents,
the lerp's equation against float64, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.linear_attention.kda import RWKV7
from memzoo.models import CausalLM
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import lm_prefill_then_decode

V, D, T, BATCH = 13, 16, 10, 2
RWKV7_OPTIONS = dict(num_heads=2, decay_rank=4, a_rank=4, gate_rank=4, value_rank=4)
# The op's token-by-token specification: these tests are about the plumbing between layers
# (dplr_delta_rule's chunked paths have their own), and it compiles fastest.
IMPLEMENTATION = "reference"


def lm(mixer="rwkv7", num_layers=3, seed=0, value_residual=True, **kw):
    options = {"rwkv7": dict(RWKV7_OPTIONS, value_residual=value_residual,
                             implementation=IMPLEMENTATION),
               "attention": {"num_heads": 2}}
    return CausalLM(vocab_size=V, d_model=D, num_layers=num_layers, mixer=mixer,
                    mixer_options=options, mlp_ratio=1, rngs=nnx.Rngs(seed), **kw)


def tokens(seed=1, length=T):
    return jax.random.randint(jax.random.key(seed), (BATCH, length), 0, V)


@nnx.jit
def forward(model, tok, segment_ids=None):
    return model(tok, segment_ids=segment_ids)


def test_first_layers_values_reach_layer_two_only_through_the_residual():
    """With layer 1's output projection zeroed its mixer adds nothing to the residual stream, so
    its value weights reach the logits through the side channel alone (without the residual:
    not at all, and there is no side channel)."""
    off = lm(num_layers=2, value_residual=False)
    assert off.stack.side_channel(BATCH, T) is None and not hasattr(off.stack.layers[1].mixer,
                                                                     "v_down")
    model, tok = lm(num_layers=2), tokens()
    model.stack.layers[0].mixer.wo[...] = jnp.zeros_like(model.stack.layers[0].mixer.wo[...])
    probe = jax.random.normal(jax.random.key(3), (BATCH, T, V))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(tok) * probe)))(model)
    grad = grads["stack"]["layers"][0]["mixer"]["wv"][...]
    assert float(jnp.max(jnp.abs(grad))) > 1e-4


# "rwkv7,attention" over 3 layers: one scanned repeat, then an rwkv7 layer after the scan that
# reads the v1 carried out of it.
CASES = [("rwkv7", 2, False), ("rwkv7,attention", 3, True)]


@pytest.mark.parametrize("mixer,num_layers,scan", CASES,
                         ids=[f"{m}-{n}-{scan=}" for m, n, scan in CASES])
def test_prefill_then_decode_equals_forward(mixer, num_layers, scan):
    model, tok = lm(mixer, num_layers, scan_layers=scan), tokens()
    assert_close(lm_prefill_then_decode(model, tok, 6), forward(model, tok), 1e-5,
                 "prefill then decode vs forward")


def test_scanned_equals_unrolled_with_the_same_params():
    scanned = lm(num_layers=2, scan_layers=True)   # v1 carried across the scan's steps
    unrolled = lm(num_layers=2, seed=7)
    for r in range(2):
        nnx.update(unrolled.stack.layers[r], jax.tree.map(
            lambda a: a[r], nnx.state(scanned.stack.scanned.blocks[0])))
    nnx.update(unrolled.final_norm, nnx.state(scanned.final_norm))
    unrolled.embed[...] = scanned.embed[...]
    tok = tokens()
    assert_close(forward(unrolled, tok), forward(scanned, tok), 1e-6, "unrolled vs scanned")


def test_packed_documents_do_not_mix():
    """v1 is per token, so a packed row's second document equals that document alone."""
    model = lm(num_layers=2)
    tok = tokens(length=12)
    seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 7], BATCH, 0), jnp.int32)
    packed = forward(model, tok, seg)
    alone = forward(model, tok[:, 5:])
    assert_close(packed[:, 5:], alone, 1e-5, "second document packed vs alone")


def test_the_lerp_matches_float64():
    """v <- v + (v1 - v) sigmoid(v_0 + x_v A_v B_v) from a written side channel; a layer with no
    v1 yet writes its own v and keeps it."""
    m = RWKV7(D, rngs=nnx.Rngs(0), **RWKV7_OPTIONS)
    m.v_bias[...] = jax.random.normal(jax.random.key(4), m.v_bias[...].shape)
    x_v, v, first = (jax.random.normal(jax.random.key(i), shape) for i, shape in
                     enumerate([(BATCH, T, D), (BATCH, T, 2, 8), (BATCH, T, 2, 8)]))
    got, side = m._value_residual(x_v, v, {"v_first": first, "v_first_set": jnp.ones((), bool)})
    f64 = lambda a: np.asarray(a, np.float64)
    gate = 1 / (1 + np.exp(-(np.einsum("btr,rhv->bthv", f64(x_v) @ f64(m.v_down[...]),
                                       f64(m.v_up[...])) + f64(m.v_bias[...]))))
    assert_close(got, f64(v) + (f64(first) - f64(v)) * gate, 1e-5, "lerp vs float64")
    np.testing.assert_array_equal(np.asarray(side["v_first"]), np.asarray(first))
    own, side = m._value_residual(x_v, v, m.side_channel(BATCH, T))
    np.testing.assert_array_equal(np.asarray(own), np.asarray(v))
    np.testing.assert_array_equal(np.asarray(side["v_first"]), np.asarray(v))
    assert bool(side["v_first_set"])


def test_bad_options_and_side_channels_are_refused():
    with pytest.raises(ValueError, match="value_residual"):
        RWKV7(D, rngs=nnx.Rngs(0), value_residual=1)
    with pytest.raises(ValueError, match="value_rank"):
        RWKV7(D, rngs=nnx.Rngs(0), value_rank=0)
    m = RWKV7(D, rngs=nnx.Rngs(0), **RWKV7_OPTIONS)
    x = jnp.ones((BATCH, T, D))
    with pytest.raises(ValueError, match="`side`"):
        m(x, side=m.side_channel(BATCH, T + 1))
    with pytest.raises(ValueError, match="`side`"):
        m.step(x[:, 0], m.init_cache(BATCH), side={"v_first": jnp.ones((BATCH, 1, 2, 8))})
