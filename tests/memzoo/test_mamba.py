"""Mamba (and what both selective SSMs share, "mamba" and "mamba2"): the contract's checks over
their other configurations, the published recurrence written out in float64 numpy, the
initialisations (published and mimetic), clear option errors, CausalLM decoding, the Linen bridge
and the training loop's decay mask."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from memzoo.models import CausalLM
from memzoo.ssm import Mamba
from pallas_kernels._testing import assert_close
from tests.memzoo import test_contract as contract
from tests.memzoo.helpers import forward

D, T, BATCH = 16, 20, 2

# (id, mixer, options): configurations whose every form must agree.
CASES = [
    ("mamba", "mamba", dict(state_size=4)),
    ("mamba_mimetic_limit", "mamba", dict(state_size=4, init="mimetic", dt_limit=(1e-3, 0.05),
                                          conv_bias=False, dt_rank=3)),
    ("mamba2_groups", "mamba2", dict(state_size=4, head_dim=8, num_groups=2, chunk_size=8)),
    ("mamba2_mimetic", "mamba2", dict(state_size=4, head_dim=16, init="mimetic", chunk_size=8,
                                      dt_limit=(0.0, 0.05))),
]


def ids(cases):
    return [c[0] for c in cases]


def build(name, options, seed=0, **extra):
    return memzoo.MIXERS[name](D, rngs=nnx.Rngs(seed), **options, **extra)


def inputs(seed=1, length=T, batch=BATCH):
    return jax.random.normal(jax.random.key(seed), (batch, length, D), jnp.float32)


# The contract (tests/memzoo/test_contract.py) for the configurations besides its own.
@pytest.mark.parametrize("case", CASES[1:], ids=ids(CASES[1:]))
def test_contract_holds_in_every_configuration(case):
    _, name, options = case
    contract.check_decoding(name, options)
    contract.check_causal(name, options)


# --- Mamba against the published equations, written out in float64 ---------------------------

def _np(v):
    return np.asarray(v[...], np.float64)


def softplus(x):
    return np.logaddexp(0.0, x)


def silu(x):
    return x / (1.0 + np.exp(-x))


def naive_mamba(m: Mamba, u):
    """The paper's Mamba block, one token at a time, from the module's own parameters."""
    u = np.asarray(u, np.float64)
    b, t_len, _ = u.shape
    E, N, R, W = m.d_inner, m.state_size, m.dt_rank, m.conv_width
    xz = u @ _np(m.in_proj.kernel)
    x, z = xz[..., :E], xz[..., E:]
    w = _np(m.conv_weight)
    bias = _np(m.conv_bias) if m.conv_bias is not None else 0.0
    A = -np.exp(_np(m.A_log))                                            # [E, N]
    h = np.zeros((b, E, N))
    ys = []
    for t in range(t_len):
        xc = sum(w[i] * x[:, t - W + 1 + i] for i in range(W) if t - W + 1 + i >= 0) + bias
        xc = silu(xc)                                                    # [b, E]
        dbc = xc @ _np(m.x_proj.kernel)
        dt = softplus(dbc[:, :R] @ _np(m.dt_proj.kernel) + _np(m.dt_bias))
        dt = np.clip(dt, *m.dt_limit)
        Bt, Ct = dbc[:, R:R + N], dbc[:, R + N:]
        h = np.exp(dt[..., None] * A) * h + (dt * xc)[..., None] * Bt[:, None, :]
        y = np.einsum("ben,bn->be", h, Ct) + _np(m.D_skip) * xc
        ys.append((y * silu(z[:, t])) @ _np(m.out_proj.kernel))
    return np.stack(ys, axis=1)


@pytest.mark.parametrize("case", CASES[:2], ids=ids(CASES[:2]))
def test_mamba_equals_the_published_recurrence_in_float64(case):
    _, name, options = case
    mixer, x = build(name, options), inputs()
    assert_close(forward(mixer, x), naive_mamba(mixer, x), 1e-5, "Mamba vs float64 recurrence")


def test_published_initialisation():
    m = Mamba(32, state_size=8, dt_min=1e-3, dt_max=1e-1, rngs=nnx.Rngs(0))
    assert m.d_inner == 64 and m.dt_rank == 2
    np.testing.assert_allclose(-np.exp(_np(m.A_log)), -np.tile(np.arange(1, 9), (64, 1)),
                               rtol=1e-6)
    np.testing.assert_array_equal(_np(m.D_skip), 1.0)
    dt = softplus(_np(m.dt_bias))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    # log-uniform: the logs spread over most of [log 1e-3, log 1e-1]
    assert np.ptp(np.log(dt)) > 0.6 * math.log(100)
    bound = m.dt_rank ** -0.5
    k = _np(m.dt_proj.kernel)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.5 * bound


def test_dt_init_floor():
    m = Mamba(16, dt_min=1e-5, dt_max=1e-5, dt_init_floor=1e-4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(softplus(_np(m.dt_bias)), 1e-4, rtol=1e-4)


def test_mimetic_initialisation_mimics_linear_attention():
    m = Mamba(D, state_size=8, init="mimetic", rngs=nnx.Rngs(0))
    R, N = m.dt_rank, m.state_size
    k = _np(m.x_proj.kernel)
    np.testing.assert_array_equal(k[:, R + N:], k[:, R:R + N])           # W_C = W_B
    w = _np(m.conv_weight)
    np.testing.assert_array_equal(w[-1], 1.0)                            # identity conv
    np.testing.assert_array_equal(w[:-1], 0.0)
    np.testing.assert_array_equal(_np(m.conv_bias), 0.0)
    # The decay over 100 tokens at the largest initial step stays near 1 ...
    decay = np.exp(100 * 0.1 * -np.exp(_np(m.A_log)))
    assert decay.min() > 0.9
    # ... and C_t . B_s is a Gram kernel: C_t . B_t >= 0 for every token.
    x = jax.random.normal(jax.random.key(0), (1, 12, m.d_inner))
    dbc = np.asarray(m.x_proj(jax.nn.silu(x)), np.float64)[0]
    gram = dbc[:, R + N:] @ dbc[:, R:R + N].T
    np.testing.assert_allclose(gram, gram.T, atol=1e-5)
    assert np.linalg.eigvalsh(gram).min() > -1e-4
    # The default init decays fast at the same step (what mimetic init avoids).
    default = Mamba(D, state_size=8, rngs=nnx.Rngs(0))
    assert np.exp(100 * 0.1 * -np.exp(_np(default.A_log))).max() < 1e-4


@pytest.mark.parametrize("cls,option,value", [
    ("mamba", "expand", 0), ("mamba", "state_size", 0), ("mamba", "conv_width", 0),
    ("mamba", "dt_rank", -1), ("mamba", "init", "xavier"), ("mamba", "dt_min", 0.0),
    ("mamba", "dt_limit", (0.1, 0.01)), ("mamba", "dt_limit", 3), ("mamba", "dt_scale", 0.0),
    ("mamba", "dt_init_floor", -1.0),
    ("mamba2", "head_dim", 5), ("mamba2", "num_groups", 3), ("mamba2", "a_init_range", (0, 4)),
    ("mamba2", "chunk_size", 0), ("mamba2", "norm_eps", 0.0), ("mamba2", "init", "x"),
    ("mamba2", "expand", 1.5),
])
def test_bad_options_name_the_option(cls, option, value):
    options = dict(state_size=4)
    if cls == "mamba2":
        options["head_dim"] = 8
    options[option] = value
    with pytest.raises(ValueError, match=option):
        build(cls, options)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_bad_input_names_the_argument(name):
    mixer = build(name, dict(state_size=4))
    with pytest.raises(ValueError, match=rf"`x`.*d_model={D}"):
        mixer(jnp.ones((BATCH, 4, D + 1)))
    with pytest.raises(ValueError, match=r"`x_t`.*rank 2"):
        mixer.step(jnp.ones((BATCH, 1, D)), mixer.init_cache(BATCH))


def test_causal_lm_decodes_like_its_forward_pass():
    """Registered and routed through the model's mixer_options (state_size shared with S4D,
    head_dim only to Mamba-2): prefill + decode == the parallel forward pass."""
    lm = CausalLM(vocab_size=11, d_model=D, num_layers=3, mixer="mamba,mamba2,s4d", mlp_ratio=0,
                  mixer_options={"state_size": 4, "mamba2": {"head_dim": 8, "chunk_size": 4}},
                  rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (BATCH, 10), 0, 11)
    logits = nnx.jit(lambda m, t: m(t))(lm, tokens)
    cache = lm.init_cache(BATCH)
    first, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(lm, tokens[:, :6], cache)
    decode = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    rest = []
    for t in range(6, 10):
        lt, cache = decode(lm, tokens[:, t], cache)
        rest.append(lt)
    assert_close(jnp.concatenate([first, jnp.stack(rest, 1)], 1), logits, 1e-5, "decode vs fwd")


def test_linen_bridge_matches_nnx():
    options = dict(state_size=4)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nnx.bridge.to_linen(Mamba, D, name="mixer", **options)(x)

    x = inputs(length=8)
    model = Model()
    variables = model.init(jax.random.key(3), x)
    y = jax.jit(model.apply)(variables, x)
    mixer = Mamba(D, rngs=nnx.Rngs(99), **options)  # the values must come from Linen
    graphdef, state = nnx.split(mixer)
    nnx.replace_by_pure_dict(state, nn.meta.unbox(variables["params"])["mixer"])
    assert_close(y, forward(nnx.merge(graphdef, state), x), 1e-6, "Linen vs NNX")


def test_weight_decay_mask_spares_the_ssm_dynamics():
    """A_log and dt_bias are ssm_dynamics (no decay); D_skip and norm scales are not decayed;
    projection kernels are."""
    import configs
    from train import trainer as trainer_lib
    config = configs.resolve(preset="smoke", sets=[
        "model.mixer=mamba,mamba2", "model.num_layers=2",
        'model.mixer_options={"state_size": 4, "mamba2": {"head_dim": 8}}'])
    model = trainer_lib.build_model(config, 16, rngs=nnx.Rngs(0))
    labels = nnx.to_flat_state(trainer_lib.param_labels(nnx.state(model, nnx.Param),
                                                        config.optim))
    by_leaf = {}
    for path, label in labels:
        names = [str(p) for p in path]
        if "mixer" in names:
            by_leaf.setdefault(names[-1], set()).add(label)
    assert by_leaf["A_log"] == by_leaf["dt_bias"] == {"ssm_dynamics/no_decay"}
    assert by_leaf["D_skip"] == by_leaf["scale"] == {"default/no_decay"}
    assert by_leaf["kernel"] == {"default"}
