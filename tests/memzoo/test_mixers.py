"""The SSM family (hippo_rnn, s4d, s5) beyond test_contract.py's one configuration per mixer: the
contract's checks over each configuration, bidirectional mixers, bad input, the registry, logical
sharding axes, the Linen bridge."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from tests.memzoo import test_contract as contract
from tests.memzoo.helpers import forward

D, T, BATCH = 8, 24, 2

# (name, mixer, options): the causal configurations besides test_contract's (hippo_rnn legs,
# s4d conv zoh: tests/memzoo/mixer_options.py).
CAUSAL_CASES = [
    ("hippo_rnn_legt_tanh", "hippo_rnn", dict(state_size=8, measure="legt", gated=False)),
    ("hippo_rnn_fout_zoh", "hippo_rnn", dict(state_size=7, measure="fout", method="zoh")),
    ("s4d_conv_bilinear_inv", "s4d", dict(state_size=8, method="bilinear", init="inv")),
    ("s4d_recurrent_lin_post", "s4d", dict(state_size=8, mode="recurrent", init="lin",
                                           norm="post", output="linear")),
    ("s5_zoh_rmsnorm", "s5", dict(state_size=8, norm_type="rmsnorm")),
    ("s5_bilinear_blocks", "s5", dict(state_size=8, blocks=2, method="bilinear")),
]
BIDIRECTIONAL_CASES = [
    ("s4d_conv_bidir", "s4d", dict(state_size=8, bidirectional=True)),
    ("s4d_recurrent_bidir", "s4d", dict(state_size=8, bidirectional=True, mode="recurrent")),
    ("s5_bidir", "s5", dict(state_size=8, bidirectional=True)),
]
# One configuration per code path, for the costlier whole-module checks.
GRAD_CASES = [CAUSAL_CASES[i] for i in (3, 4)] + BIDIRECTIONAL_CASES
DTYPE_CASES = [CAUSAL_CASES[i] for i in (0, 2, 5)] + BIDIRECTIONAL_CASES[1:2]


def build(name, options, seed=0, **extra):
    return memzoo.MIXERS[name](D, rngs=nnx.Rngs(seed), **options, **extra)


def inputs(seed=1, length=T):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D), jnp.float32)


def ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=ids(CAUSAL_CASES))
def test_contract_holds_in_every_configuration(case):
    """test_contract.py runs each mixer with one set of options; these are the SSM family's
    other code paths (measures, discretisations, conv vs recurrent mode, blocks)."""
    _, name, options = case
    contract.check_causal(name, options)
    contract.check_decoding(name, options)


@pytest.mark.parametrize("case", BIDIRECTIONAL_CASES, ids=ids(BIDIRECTIONAL_CASES))
def test_bidirectional_sees_the_future_and_refuses_decoding(case):
    _, name, options = case
    mixer, x = build(name, options), inputs()
    x2 = x.at[:, 15].add(3.0 * jax.random.normal(jax.random.key(5), (BATCH, D)))
    assert float(jnp.max(jnp.abs(forward(mixer, x)[:, :15] - forward(mixer, x2)[:, :15]))) > 1e-2
    with pytest.raises(ValueError, match="not causal"):
        mixer.init_cache(BATCH)
    with pytest.raises(ValueError, match="not causal"):
        mixer.core.step(x[:, 0], None)


@pytest.mark.parametrize("case", GRAD_CASES, ids=ids(GRAD_CASES))
def test_gradients_flow_to_every_parameter(case):
    _, name, options = case
    contract.check_gradients(name, options)


@pytest.mark.parametrize("case", DTYPE_CASES, ids=ids(DTYPE_CASES))
def test_bfloat16_compute_is_float32_in_value(case):
    _, name, options = case
    contract.check_bfloat16(name, options, decode_too=not options.get("bidirectional", False))


@pytest.mark.parametrize("name", ["hippo_rnn", "s4d", "s5"])
def test_bad_input_names_the_argument(name):
    mixer = build(name, dict(state_size=8))
    with pytest.raises(ValueError, match=r"`x`.*d_model=8"):
        mixer(jnp.ones((BATCH, 4, D + 1)))
    with pytest.raises(ValueError, match=r"`x`.*rank 3"):
        mixer(jnp.ones((4, D)))
    with pytest.raises(ValueError, match=r"`x_t`.*rank 2"):
        mixer.step(jnp.ones((BATCH, 1, D)), mixer.init_cache(BATCH))
    with pytest.raises(ValueError, match=r"`x_t`.*d_model=8"):
        mixer.step(jnp.ones((BATCH, D - 1)), mixer.init_cache(BATCH))


def test_registry_unknown_name_lists_known():
    with pytest.raises(KeyError, match=r"unknown mixer 'mamba9'.*hippo_rnn.*s4d.*s5"):
        memzoo.MIXERS["mamba9"]
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        memzoo.build_mixer("nope", D, rngs=nnx.Rngs(0))


def test_register_mixer_rejects_a_second_owner_of_a_name():
    with pytest.raises(ValueError, match="already registered"):
        memzoo.register_mixer("s4d")(lambda d_model, *, rngs: None)


@pytest.mark.parametrize("name", ["hippo_rnn", "s4d", "s5"])
def test_parameters_carry_logical_sharding_axes(name):
    mixer = build(name, dict(state_size=8))
    params = nnx.state(mixer, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim, path
    # What a training loop reads to shard the model with its logical-axis rule table.
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    assert len(jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, jax.P))) == len(
        jax.tree.leaves(params))


def test_linen_bridge_matches_nnx():
    name, options = "s4d", dict(state_size=8)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(D, name="proj")(x)
            return nnx.bridge.to_linen(memzoo.MIXERS[name], D, name="mixer", **options)(x)

    x = inputs(length=10)
    model = Model()
    variables = model.init(jax.random.key(3), x)
    y = jax.jit(model.apply)(variables, x)

    params = nn.meta.unbox(variables["params"])
    mixer = build(name, options, seed=99)  # different init: the values must come from Linen
    graphdef, state = nnx.split(mixer)
    nnx.replace_by_pure_dict(state, params["mixer"])
    mixer = nnx.merge(graphdef, state)
    h = x @ params["proj"]["kernel"] + params["proj"]["bias"][None, None]
    np.testing.assert_allclose(np.asarray(y), np.asarray(forward(mixer, h)), rtol=1e-5, atol=1e-5)
