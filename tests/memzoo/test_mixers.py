"""The contract every registered mixer keeps (memzoo.registry.SequenceMixer), run over each
configuration of the SSM family: parallel == step-by-step == prefill-then-decode, causality,
gradients, float32 parameters under bfloat16 compute, bad input, registry, Linen bridge."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward, prefill, prefill_then_decode, step

D, T, BATCH = 8, 24, 2

# (name, mixer, options): every causal configuration whose decoding must match its parallel form.
CAUSAL_CASES = [
    ("hippo_rnn_legs", "hippo_rnn", dict(state_size=8)),
    ("hippo_rnn_legt_tanh", "hippo_rnn", dict(state_size=8, measure="legt", gated=False)),
    ("hippo_rnn_fout_zoh", "hippo_rnn", dict(state_size=7, measure="fout", method="zoh")),
    ("s4d_conv_zoh", "s4d", dict(state_size=8)),
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
GRAD_CASES = [CAUSAL_CASES[i] for i in (0, 3, 5, 6)] + BIDIRECTIONAL_CASES
DTYPE_CASES = [CAUSAL_CASES[i] for i in (1, 4, 7)] + BIDIRECTIONAL_CASES[1:2]


def build(name, options, seed=0, **extra):
    return memzoo.MIXERS[name](D, rngs=nnx.Rngs(seed), **options, **extra)


def inputs(seed=1, length=T):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D), jnp.float32)


def ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=ids(CAUSAL_CASES))
def test_parallel_equals_step_equals_prefill_then_decode(case):
    _, name, options = case
    mixer, x = build(name, options), inputs()
    y = forward(mixer, x)
    assert y.shape == x.shape and y.dtype == jnp.float32

    cache = mixer.init_cache(BATCH)
    steps = []
    for t in range(T):
        y_t, cache = step(mixer, x[:, t], cache)
        steps.append(y_t)
    assert_close(jnp.stack(steps, axis=1), y, 1e-5, "step-by-step vs parallel")

    t1 = T // 2  # both prefills below then share one compiled shape
    assert_close(prefill_then_decode(mixer, x, t1, mixer.init_cache(BATCH)), y, 1e-5,
                 "prefill then decode vs parallel")

    # Two prefills in a row carry the state the same way.
    y_a, cache_a = prefill(mixer, x[:, :t1], mixer.init_cache(BATCH))
    y_b, _ = prefill(mixer, x[:, t1:], cache_a)
    assert_close(jnp.concatenate([y_a, y_b], axis=1), y, 1e-5, "prefill, prefill vs parallel")


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=ids(CAUSAL_CASES))
def test_causal(case):
    _, name, options = case
    mixer, x = build(name, options), inputs()
    t0 = 11
    # Not a constant shift: a pre-LayerNorm would erase it.
    x2 = x.at[:, t0].add(3.0 * jax.random.normal(jax.random.key(5), (BATCH, D)))
    y, y2 = forward(mixer, x), forward(mixer, x2)
    response = float(jnp.max(jnp.abs(y[:, t0] - y2[:, t0])))
    assert response > 1e-2
    leak = np.abs(np.asarray(y[:, :t0]) - np.asarray(y2[:, :t0]))
    if options.get("mode", "conv") == "conv" and name == "s4d":
        # An FFT convolution mixes every time step in float32 round-off: causal up to that.
        assert leak.max() <= 1e-6 * float(jnp.max(jnp.abs(y))), leak.max()
    else:
        assert leak.max() == 0.0, leak.max()


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
    mixer, x = build(name, options), inputs(length=12)
    target = inputs(seed=7, length=12)

    def loss(m):
        return jnp.mean(jnp.square(m(x) - target))

    grads = nnx.jit(nnx.grad(loss))(mixer)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), f"non-finite gradient at {jax.tree_util.keystr(path)}"
        assert np.any(g != 0), f"zero gradient at {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("case", DTYPE_CASES, ids=ids(DTYPE_CASES))
def test_bfloat16_compute_keeps_float32_params(case):
    _, name, options = case
    mixer = build(name, options, dtype=jnp.bfloat16)
    for path, p in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(mixer,
                                                                                  nnx.Param))):
        assert p.dtype == jnp.float32, f"{jax.tree_util.keystr(path)} is {p.dtype}"
    x = inputs().astype(jnp.bfloat16)
    y = forward(mixer, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    if not getattr(mixer, "bidirectional", False):
        cache = mixer.init_cache(BATCH)
        leaves = jax.tree.leaves(cache)
        assert all(leaf.dtype in (jnp.float32, jnp.complex64, jnp.int32) for leaf in leaves)
        y_t, cache = step(mixer, x[:, 0], cache)
        assert all(leaf.dtype in (jnp.float32, jnp.complex64, jnp.int32)
                   for leaf in jax.tree.leaves(cache))


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


def test_registry_builds_every_name():
    assert {"hippo_rnn", "s4d", "s5"} <= set(memzoo.MIXERS)
    x = inputs(length=6)
    for name in memzoo.MIXERS:
        # state_size only where the constructor names it (attention has no state size).
        takes = memzoo.accepts_keyword(getattr(memzoo.MIXERS[name], "__init__"), "state_size")
        mixer = memzoo.build_mixer(name, D, rngs=nnx.Rngs(0), **({"state_size": 8} if takes
                                                                  else {}))
        assert forward(mixer, x).shape == x.shape, name


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
