"""Griffin's RG-LRU block ("rglru"): the block written out token by token in float64 numpy
(packed documents, a prefill continuing a cache), the float64 mixer to 64-bit rounding, the
paper's and recurrentgemma's Lambda initialisations, float32 decays under bfloat16 compute, the
bounded sqrt gradient, option errors. The generic contract (decoding, packing, gradients,
bfloat16) is tests/memzoo/test_contract.py's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo.ssm.rglru as rglru_module
from memzoo.ssm.rglru import RGLRU, sqrt_bounded_gradient
from pallas_kernels._testing import assert_close

D, L, H, W = 12, 16, 4, 4


def _np(v):
    return np.asarray(v[...], np.float64)


def _perturb(mixer, seed=0):
    """Gate biases and the conv bias start at 0: move every parameter so each path counts."""
    graphdef, params = nnx.split(mixer, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    moved = [jnp.asarray(np.asarray(p) + 0.3 * rng.standard_normal(p.shape), p.dtype)
             for p in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, moved))


def naive_rglru(m, x, segment_ids=None, cache=None):
    """The block, one token at a time, float64 (module docstring of memzoo/ssm/rglru.py).
    cache: (conv window [b, W-1, L], state [b, L], started [b]) or None."""
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    softplus = lambda v: np.log1p(np.exp(v))
    wa, ba = _np(m.gate_proj.kernel), _np(m.gate_proj.bias)
    wb, bb = _np(m.in_proj.kernel), _np(m.in_proj.bias)
    wc, bc = _np(m.conv_weight), _np(m.conv_bias)
    wr, br = _np(m.a_gate.kernel), _np(m.a_gate.bias)
    wi, bi = _np(m.input_gate.kernel), _np(m.input_gate.bias)
    lam = _np(m.a_param)
    wo, bo = _np(m.out_proj.kernel), _np(m.out_proj.bias)
    n = L // H

    def block_diag(v, w, b):
        return np.concatenate([v[k * n:(k + 1) * n] @ w[k] + b[k] for k in range(H)])

    y = np.zeros((B, T, D))
    for row in range(B):
        if cache is None:
            window, h, started = [np.zeros(L)] * (W - 1), np.zeros(L), False
        else:
            window = list(np.asarray(cache[0][row], np.float64))
            h, started = np.asarray(cache[1][row], np.float64), bool(cache[2][row])
        for t in range(T):
            new_doc = (not started) or (segment_ids is not None and t > 0
                                        and segment_ids[row, t] != segment_ids[row, t - 1])
            if new_doc and started:   # the previous document's inputs leave the conv window
                window = [np.zeros(L)] * (W - 1)
            v = x[row, t] @ wb + bb
            u = bc + sum(wc[k] * w_ for k, w_ in enumerate(window)) + wc[W - 1] * v
            window = window[1:] + [v]
            r = sigmoid(block_diag(u, wr, br))
            i = sigmoid(block_diag(u, wi, bi))
            a = np.exp(-8.0 * softplus(lam) * r)
            if new_doc:
                h = i * u
            else:
                h = a * h + np.sqrt(1 - a ** 2) * (i * u)
            started = True
            g = gelu(x[row, t] @ wa + ba)
            y[row, t] = (h * g) @ wo + bo
    return y


def make(seed=0, **kw):
    return _perturb(RGLRU(D, lru_width=L, num_heads=H, conv_width=W, rngs=nnx.Rngs(seed), **kw))


def inputs(seed=1, B=2, T=13):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


SEGMENTS = np.array([[0] * 4 + [1] * 6 + [2] * 3, [5] * 9 + [7] * 4], np.int32)


def test_rglru_equals_the_block_token_by_token_in_float64():
    m, x = make(), inputs()
    seg = jnp.asarray(SEGMENTS)
    assert_close(m(x), naive_rglru(m, x), 1e-5, "parallel vs float64 per-token")
    assert_close(m(x, segment_ids=seg), naive_rglru(m, x, SEGMENTS), 1e-5,
                 "packed vs float64 per-token")
    # A prefill continuing a cache: token 0 continues the cache's document, later id changes
    # restart.
    _, cache = m(x[:, :5], cache=m.init_cache(2))
    y, _ = m(x[:, 5:], cache=cache, segment_ids=seg[:, 5:])
    ref = naive_rglru(m, x[:, 5:], SEGMENTS[:, 5:],
                      cache=(cache.conv_state, cache.state, cache.started))
    assert_close(y, ref, 1e-5, "prefill from a cache vs float64 per-token")


def test_float64_mixer_equals_the_definition_to_64_bit_rounding():
    m, x = make(), inputs()
    expected = naive_rglru(m, x, SEGMENTS)
    with jax.enable_x64(True):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        m64 = nnx.merge(graphdef, params, rest)
        for mod in (m64, m64.gate_proj, m64.in_proj, m64.out_proj, m64.a_gate, m64.input_gate):
            mod.dtype = jnp.float64
        y = m64(jnp.asarray(x, jnp.float64), segment_ids=jnp.asarray(SEGMENTS))
        assert y.dtype == jnp.float64
        assert_close(np.asarray(y), expected, 1e-12, "float64 mixer vs per-token")


def test_decode_state_is_the_recurrence_state():
    m, x = make(), inputs(T=6)
    _, cache = m(x, cache=m.init_cache(2))
    assert cache.state.dtype == jnp.float32 and cache.conv_state.shape == (2, W - 1, L)
    assert bool(jnp.all(cache.started))
    # The next token of a started row scales its input by sqrt(1 - a^2); a fresh row does not.
    x_t = inputs(5, T=1)[:, 0]
    y_cont, _ = m.step(x_t, cache)
    y_fresh, _ = m.step(x_t, cache.replace(started=jnp.zeros_like(cache.started),
                                           state=jnp.zeros_like(cache.state),
                                           conv_state=jnp.zeros_like(cache.conv_state)))
    assert_close(y_fresh, m(x_t[:, None])[:, 0], 1e-6, "fresh step == one-token forward")
    assert float(jnp.max(jnp.abs(y_cont - y_fresh))) > 1e-3


def test_paper_init_draws_a_to_the_c_uniformly_in_the_range():
    m = RGLRU(8, lru_width=8192, rngs=nnx.Rngs(3))
    a_c = np.exp(-8.0 * np.asarray(jax.nn.softplus(m.a_param[...]), np.float64))
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6
    # Uniform: the quartiles of U[0.9, 0.999] (8192 draws: standard error ~0.0005).
    np.testing.assert_allclose(np.quantile(a_c, [0.25, 0.5, 0.75]),
                               [0.92475, 0.9495, 0.97425], atol=3e-3)


def test_recurrentgemma_init_draws_the_base_on_the_ring():
    m = RGLRU(8, lru_width=8192, a_init="recurrentgemma", rngs=nnx.Rngs(3))
    base = np.exp(-np.asarray(jax.nn.softplus(m.a_param[...]), np.float64))
    assert base.min() >= 0.9 - 1e-6 and base.max() <= 0.999 + 1e-6
    lo, hi = 0.81, 0.999 ** 2   # base^2 uniform between the squared radii
    np.testing.assert_allclose(np.quantile(base ** 2, [0.25, 0.5, 0.75]),
                               lo + (hi - lo) * np.array([0.25, 0.5, 0.75]), atol=3e-3)


def test_decays_and_inputs_reach_the_scan_in_float32_under_bfloat16(monkeypatch):
    seen = []
    real = rglru_module.linear_scan

    def spy(a, b, **kw):
        seen.append((a.dtype, b.dtype))
        return real(a, b, **kw)

    monkeypatch.setattr(rglru_module, "linear_scan", spy)
    m = RGLRU(D, lru_width=L, num_heads=H, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = m(inputs().astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert seen == [(jnp.float32, jnp.float32)]


def test_sqrt_gradient_is_bounded_near_zero():
    g = jax.vmap(jax.grad(sqrt_bounded_gradient))(jnp.array([0.0, 1e-12, 0.25, 1.0]))
    np.testing.assert_allclose(np.asarray(g), [1000.0, 1000.0, 1.0, 0.5], rtol=1e-6)
    assert float(sqrt_bounded_gradient(jnp.float32(0.25))) == 0.5


@pytest.mark.parametrize("kw,match", [
    (dict(num_heads=3), "num_heads"), (dict(a_init="uniform"), "a_init"),
    (dict(a_range=(0.9, 1.0)), "a_range"), (dict(c=0), "c must"),
    (dict(conv_width=0), "conv_width")])
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        RGLRU(D, lru_width=L, **{"num_heads": H, **kw}, rngs=nnx.Rngs(0))
