"""The contract every registered mixer keeps (memzoo.registry.SequenceMixer), run over every name
in memzoo.MIXERS, so a newly registered mixer is tested without anyone listing it here:

  causal                    changing the inputs from t0 on leaves the outputs before t0 unchanged
  decoding                  step-by-step == prefill-then-decode == prefill, prefill == parallel
  packed documents          with segment_ids, each document's outputs and gradients (input and
                            parameters) equal running it alone from the start
  bfloat16 compute          float32 parameters, bfloat16 outputs close to float32 in value
  gradients                 finite and non-zero for every parameter

Each mixer is built once per worker with the options of tests/memzoo/mixer_options.py, its
parameters moved off their initial values (see `_perturbed`), and each check is one jitted
function. Family files test what is particular to a family (papers' recurrences, options,
errors); this file is the one home of the generic checks. The XLA paths run here (the default
"auto" on CPU): kernels are tested in tests/pallas_kernels."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from memzoo import MIXERS
from memzoo.models import Block
from memzoo.registry import accepts_keyword
from pallas_kernels._testing import assert_close, rel_rmse
from tests.memzoo import helpers
from tests.memzoo.mixer_options import MIXER_OPTIONS

D, T, BATCH = 16, 20, 2
T0 = 7   # causality cut: not on a chunk or segment boundary of the option table
T1 = 6   # prefill length: mid-chunk, so decoding resumes from a partial chunk
# Two rows packed differently, documents of unequal lengths, cuts off chunk boundaries.
DOCS = [[(0, 5), (5, 13), (13, T)], [(0, 9), (9, T)]]
F32_TOL = 1e-5   # float32 rounding of two evaluation orders of the same math
# bfloat16 keeps 8 significant bits (unit round-off 2^-9 ~ 2e-3); a mixer's few layers of
# roundings stay well inside 2e-2 relative RMSE, while a wrong value (or a float32 path gone
# missing) is off by O(1).
BF16_TOL = 2e-2
NAMES = list(MIXERS)


def inputs(seed, shape=(BATCH, T, D)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def segment_ids():
    rows = [np.concatenate([np.full(e - s, i, np.int32) for i, (s, e) in enumerate(docs)])
            for docs in DOCS]
    return jnp.asarray(np.stack(rows))


def _perturbed(params):
    """Parameters moved by ~10% of their scale (0.1 absolute where they start at zero): some
    mixers start a path at exactly zero (attention's conv taps, output gates), which at their
    initial values would hide that path from every check here."""
    # numpy, not jax: eager jax ops compile once per leaf shape, seconds per mixer.
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1234)
    moved = []
    for p in leaves:
        p = np.asarray(p)
        scale = float(np.sqrt(np.mean(np.abs(p) ** 2))) if p.size else 0.0
        noise = rng.standard_normal(p.shape)
        if np.iscomplexobj(p):
            noise = (noise + 1j * rng.standard_normal(p.shape)) / np.sqrt(2)
        moved.append(jnp.asarray(p + 0.1 * (scale if scale > 0 else 1.0) * noise, p.dtype))
    return jax.tree.unflatten(treedef, moved)


def build(name, options=None, **extra):
    options = MIXER_OPTIONS.get(name, {}) if options is None else options
    return MIXERS[name](D, rngs=nnx.Rngs(0), **options, **extra)


@functools.cache
def _model(name, frozen_options):
    graphdef, params, rest = nnx.split(build(name, dict(frozen_options)), nnx.Param, ...)
    return graphdef, _perturbed(params), rest


def model(name, options=None):
    """(graphdef, params, rest) of the float32 mixer, parameters perturbed; built once per
    (name, options). options=None: the option table's."""
    options = MIXER_OPTIONS.get(name, {}) if options is None else options
    return _model(name, tuple(sorted(options.items())))


def init_cache(mixer, batch):
    if accepts_keyword(mixer.init_cache, "max_len"):  # state that grows with the sequence
        return mixer.init_cache(batch, max_len=T)
    return mixer.init_cache(batch)


def decode(mixer, xs, cache):
    """Step through xs [b, n, d] from `cache` in one lax.scan (as generate does)."""
    graphdef, state = nnx.split(mixer)

    def body(cache, x_t):
        y_t, cache = nnx.merge(graphdef, state).step(x_t, cache)
        return cache, y_t

    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(xs, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache


def decode_from_start(mixer, xs, cache):
    """decode() from an empty cache, after a prefill of the mixer's `noncausal_prefix` tokens
    if it declares one (JRT: a prompt encoded non-causally has no token-by-token form)."""
    prefix = getattr(mixer, "noncausal_prefix", 0)
    if not prefix:
        return decode(mixer, xs, cache)
    y_prompt, cache = mixer(xs[:, :prefix], cache=cache)
    y_rest, cache = decode(mixer, xs[:, prefix:], cache)
    return jnp.concatenate([y_prompt, y_rest], 1), cache


def leaf_name(path):
    return jax.tree_util.keystr(path)


# ---- the contract ---------------------------------------------------------------------------

# Each check takes a registered name and constructor options (default: the option table's), so
# family files run the same checks over their other configurations instead of copying them.

def check_causal(name, options=None):
    graphdef, params, rest = model(name, options)
    x = inputs(1)
    x2 = x.at[:, T0:].set(inputs(2)[:, T0:])

    @jax.jit
    def run(params, x, x2):
        mixer = nnx.merge(graphdef, params, rest)
        return mixer(x), mixer(x2)

    # A declared non-causal prompt (JRT) is causal from its end on: the causality cut and the
    # prefill of check_decoding must lie after it.
    assert getattr(nnx.merge(graphdef, params, rest), "noncausal_prefix", 0) <= min(T0, T1), name
    y, y2 = run(params, x, x2)
    leak = float(jnp.max(jnp.abs(y[:, :T0] - y2[:, :T0])))
    # Exact for most; an FFT convolution (S4D) mixes all steps at float32 round-off.
    assert leak <= 1e-6 * float(jnp.max(jnp.abs(y))), f"{name}: future leaks into the past: {leak}"
    assert rel_rmse(y2[:, T0:], y[:, T0:]) > 1e-2, f"{name}: the output ignores its input"


def check_decoding(name, options=None):
    """step-by-step, prefill-then-decode and prefill-then-prefill == the parallel form."""
    graphdef, params, rest = model(name, options)
    x = inputs(3)

    @jax.jit
    def run(params, x):
        mixer = nnx.merge(graphdef, params, rest)
        y = mixer(x)
        y_steps, _ = decode_from_start(mixer, x, init_cache(mixer, BATCH))
        y_pre, cache = mixer(x[:, :T1], cache=init_cache(mixer, BATCH))
        y_dec, _ = decode(mixer, x[:, T1:], cache)
        y_pre2, _ = mixer(x[:, T1:], cache=cache)
        return y, y_steps, jnp.concatenate([y_pre, y_dec], 1), jnp.concatenate([y_pre, y_pre2], 1)

    y, y_steps, y_prefill_decode, y_prefill_prefill = run(params, x)
    assert y.shape == x.shape and y.dtype == jnp.float32, (y.shape, y.dtype)
    assert_close(y_steps, y, F32_TOL, f"{name}: step-by-step vs parallel")
    assert_close(y_prefill_decode, y, F32_TOL, f"{name}: prefill then decode vs parallel")
    assert_close(y_prefill_prefill, y, F32_TOL, f"{name}: prefill, prefill vs parallel")


def check_packed_equals_alone(name, options=None):
    """Forward, input gradient and parameter gradients of packed rows == each document alone."""
    graphdef, params, rest = model(name, options)
    takes_segments = accepts_keyword(nnx.merge(graphdef, params, rest).__call__, "segment_ids")
    assert takes_segments, (
        f"{name}: __call__ does not take segment_ids, so packed documents would see each other")
    x, cotangent, seg = inputs(4), inputs(5), segment_ids()

    def packed(params, x):
        y = nnx.merge(graphdef, params, rest)(x, segment_ids=seg)
        return jnp.sum(y * cotangent), y

    docs = [(r, s, e) for r, row in enumerate(DOCS) for s, e in row]
    resolved = MIXER_OPTIONS.get(name, {}) if options is None else options
    causal = not resolved.get("bidirectional", False)

    def alone(params, x):
        mixer = nnx.merge(graphdef, params, rest)
        if causal:
            # Every document alone, all in one batched call (helpers.alone_rows: each at the
            # start of a row of its own, random tokens after it that causality keeps out).
            y = helpers.packed_layout(mixer(helpers.alone_rows(x, docs)), docs, x)
        else:  # a bidirectional mixer sees the tokens after a document: each runs exactly alone
            y = jnp.zeros(x.shape[:2] + (D,), x.dtype)
            for r, s, e in docs:
                y = y.at[r:r + 1, s:e].set(mixer(x[r:r + 1, s:e]))
        return jnp.sum(y * cotangent), y

    @jax.jit
    def run(params, x):
        grad = functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
        (_, y_packed), g_packed = grad(packed)(params, x)
        (_, y_alone), g_alone = grad(alone)(params, x)
        y_unsegmented = nnx.merge(graphdef, params, rest)(x)
        return y_packed, g_packed, y_alone, g_alone, y_unsegmented

    y_packed, (dp_packed, dx_packed), y_alone, (dp_alone, dx_alone), y_plain = run(params, x)
    # Without the ids the later documents see the earlier ones: the check below can fail.
    assert rel_rmse(y_plain, y_alone) > 1e-3, f"{name}: documents never interact"
    assert_close(y_packed, y_alone, F32_TOL, f"{name}: packed vs each document alone")
    assert_close(dx_packed, dx_alone, F32_TOL, f"{name}: d input, packed vs alone")
    flat_alone = dict(jax.tree_util.tree_leaves_with_path(dp_alone))
    for path, g in jax.tree_util.tree_leaves_with_path(dp_packed):
        assert_close(g, flat_alone[path], F32_TOL,
                     f"{name}: d {leaf_name(path)}, packed vs alone")


def check_gradients(name, options=None):
    """Finite, and non-zero for every parameter leaf, on a random input and cotangent."""
    graphdef, params, rest = model(name, options)
    x, cotangent = inputs(6), inputs(7)

    @jax.jit
    def run(params, x):
        return jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x) * cotangent),
                        argnums=(0, 1))(params, x)

    d_params, d_x = run(params, x)
    assert np.all(np.isfinite(d_x)) and np.any(d_x != 0), f"{name}: d input"
    leaves = jax.tree_util.tree_leaves_with_path(d_params)
    assert leaves, f"{name}: no parameters"
    for path, g in leaves:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), f"{name}: non-finite gradient at {leaf_name(path)}"
        assert np.any(g != 0), f"{name}: zero gradient at {leaf_name(path)}"


def _without_kv_buffers(cache):
    """The cache with every KVCache's key/value/conv buffers replaced by None."""
    from memzoo.attention import KVCache
    return jax.tree_util.tree_map(
        lambda c: c.replace(k=None, v=None, conv=None) if isinstance(c, KVCache) else c,
        cache, is_leaf=lambda c: isinstance(c, KVCache))


def check_bfloat16(name, options=None, *, decode_too=True):
    """dtype= is the compute dtype: parameters stay float32, outputs (parallel and decoded) are
    bfloat16 and match the float32 mixer with the same parameters to bfloat16 rounding."""
    mixer16 = build(name, options, dtype=jnp.bfloat16)
    for path, p in jax.tree_util.tree_leaves_with_path(nnx.state(mixer16, nnx.Param)):
        assert p.dtype == jnp.float32, f"{name}: parameter {leaf_name(path)} is {p.dtype}"
    graphdef16, _, rest16 = nnx.split(mixer16, nnx.Param, ...)
    graphdef, params, rest = model(name, options)
    x = inputs(8).astype(jnp.bfloat16)

    @jax.jit
    def run(params, x):
        mixer16 = nnx.merge(graphdef16, params, rest16)
        y16 = mixer16(x)
        if decode_too:
            y16_steps, cache = decode_from_start(mixer16, x[:, :T1], init_cache(mixer16, BATCH))
        else:  # a bidirectional mixer does not decode
            y16_steps, cache = y16[:, :T1], None
        y32 = nnx.merge(graphdef, params, rest)(x.astype(jnp.float32))
        return y16, y16_steps, cache, y32

    y16, y16_steps, cache, y32 = run(params, x)
    # The carried state stays float32: bfloat16 rounding would compound over a long decode.
    # An attention KV cache is exempt: it holds past keys and values as computed (in the compute
    # dtype, as its docstring says), copied and never accumulated, so nothing compounds.
    for path, leaf in jax.tree_util.tree_leaves_with_path(_without_kv_buffers(cache)):
        assert leaf.dtype != jnp.bfloat16, f"{name}: decoding state {leaf_name(path)} is bfloat16"
    assert y16.dtype == jnp.bfloat16 and y16_steps.dtype == jnp.bfloat16, (y16.dtype,
                                                                            y16_steps.dtype)
    assert_close(np.asarray(y16, np.float32), y32, BF16_TOL, f"{name}: bf16 vs f32, parallel")
    assert_close(np.asarray(y16_steps, np.float32), y32[:, :T1], BF16_TOL,
                 f"{name}: bf16 vs f32, decoded")


@pytest.mark.parametrize("name", NAMES)
def test_causal(name):
    check_causal(name)


@pytest.mark.parametrize("name", NAMES)
def test_step_and_prefill_equal_parallel(name):
    check_decoding(name)


@pytest.mark.parametrize("name", NAMES)
def test_packed_documents_equal_each_alone(name):
    check_packed_equals_alone(name)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_and_nonzero_for_every_parameter(name):
    check_gradients(name)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute_is_float32_in_value(name):
    check_bfloat16(name)


def test_option_table_names_registered_mixers():
    assert set(MIXER_OPTIONS) <= set(MIXERS), set(MIXER_OPTIONS) - set(MIXERS)


# ---- the contract test catches a mixer without segment support ------------------------------

class _RunningSum(nnx.Module):
    """y_t = sum_{s<=t} W x_s: causal and decodable, but ignores segment_ids."""

    def __init__(self, d_model, *, rngs, dtype=jnp.float32):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (d_model, d_model)) / d_model)
        self.d_model, self.dtype = d_model, dtype

    def __call__(self, x, cache=None, *, segment_ids=None):
        y = jnp.cumsum(x @ self.w[...], axis=1)
        if cache is None:
            return y
        y = y + cache[:, None]
        return y, y[:, -1]

    def init_cache(self, batch_size):
        return jnp.zeros((batch_size, self.d_model))

    def step(self, x_t, cache):
        cache = cache + x_t @ self.w[...]
        return cache, cache


class _RunningSumWithoutSegments(_RunningSum):
    def __call__(self, x, cache=None):
        return super().__call__(x, cache)


@pytest.fixture(params=[_RunningSum, _RunningSumWithoutSegments])
def segment_blind_mixer(request):
    name = f"_test_{request.param.__name__}"
    memzoo.register_mixer(name)(request.param)
    try:
        yield name
    finally:
        del MIXERS._entries[name]  # no public unregister: a test-only mixer must not linger
        _model.cache_clear()


def test_contract_catches_a_mixer_that_lets_documents_mix(segment_blind_mixer):
    name = segment_blind_mixer
    check_causal(name)  # it keeps the rest of the contract: only the packed check objects
    check_decoding(name)
    with pytest.raises(AssertionError, match="packed vs each document alone|segment_ids"):
        check_packed_equals_alone(name)


def test_block_refuses_segment_ids_its_mixer_cannot_honour():
    name = "_test_running_sum_without_segments"
    memzoo.register_mixer(name)(_RunningSumWithoutSegments)
    try:
        block = Block(D, name, mixer_options={}, mlp_ratio=0, norm="rmsnorm",
                      dtype=jnp.float32, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="segment_ids"):
            block(inputs(9), segment_ids=segment_ids())
    finally:
        del MIXERS._entries[name]
