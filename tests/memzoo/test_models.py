"""CausalLM and SequenceClassifier: prefill-then-decode == full forward (scanned and unrolled,
uniform and hybrid patterns), scan == unrolled with the same parameters, remat policies change
nothing numerically, bfloat16 compute with float32 parameters, generation, segment isolation,
logical axes, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.generate import generate
from memzoo.models import CausalLM, SequenceClassifier
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import lm_decode as decode
from tests.memzoo.helpers import lm_prefill as prefill
from tests.memzoo.helpers import lm_prefill_then_decode

V, D, T, BATCH = 13, 16, 10, 2
OPTIONS = {"state_size": 4, "attention": {"num_heads": 2}}


def lm(mixer, num_layers=2, seed=0, **kw):
    return CausalLM(vocab_size=V, d_model=D, num_layers=num_layers, mixer=mixer,
                    mixer_options=OPTIONS, mlp_ratio=1, rngs=nnx.Rngs(seed), **kw)


def tokens(seed=1, length=T, batch=BATCH):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, V)


@nnx.jit
def forward(model, tok):
    return model(tok)


# "s4d,attention" over 3 layers scans one repeat of the pattern and runs the third layer after.
DECODE_CASES = [("s4d", 2, False), ("attention", 2, True), ("s4d,attention", 2, False),
                ("s4d,attention", 3, True)]


@pytest.mark.parametrize("mixer,num_layers,scan", DECODE_CASES,
                         ids=[f"{m}-{n}-{scan=}" for m, n, scan in DECODE_CASES])
def test_prefill_then_decode_equals_forward(mixer, num_layers, scan):
    model, tok = lm(mixer, num_layers, scan_layers=scan), tokens()
    full = forward(model, tok)
    assert full.shape == (BATCH, T, V) and full.dtype == jnp.float32
    assert_close(lm_prefill_then_decode(model, tok, 6), full, 1e-5,
                 "prefill then decode vs forward")


def _copy_scanned_into_unrolled(scanned, unrolled):
    p = len(scanned.stack.scanned.blocks)
    for r in range(scanned.stack.repeats):
        for j in range(p):
            state = jax.tree.map(lambda a: a[r], nnx.state(scanned.stack.scanned.blocks[j]))
            nnx.update(unrolled.stack.layers[r * p + j], state)
    for i, block in enumerate(scanned.stack.layers):
        nnx.update(unrolled.stack.layers[scanned.stack.repeats * p + i], nnx.state(block))
    nnx.update(unrolled.final_norm, nnx.state(scanned.final_norm))
    unrolled.embed[...] = scanned.embed[...]


def test_scan_layers_equals_unrolled_stack_with_the_same_params():
    scanned = lm("s4d,attention", 5, scan_layers=True)  # 2 repeats + 1 layer after the scan
    unrolled = lm("s4d,attention", 5, seed=7)
    assert scanned.stack.repeats == 2 and len(scanned.stack.layers) == 1
    _copy_scanned_into_unrolled(scanned, unrolled)
    tok = tokens()
    assert_close(forward(unrolled, tok), forward(scanned, tok), 1e-6, "unrolled vs scanned")
    # Stacked parameters carry a leading "layers" axis name; the rest their usual names.
    for path, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var[...].ndim, path
        assert (axes[0] == "layers") == ("scanned" in path), path
    assert scanned.embed.get_metadata()["out_sharding"] == ("vocab", "embed")


def _loss(model, tok):
    logits = model(tok[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, 1:, None], -1))


@nnx.jit
def loss_and_grad(model, tok):
    return nnx.value_and_grad(_loss)(model, tok)


def test_remat_policies_give_identical_loss_and_grads():
    tok = tokens()
    # Attention only: jax cannot save S4D's complex dots under dots_saveable
    # ("reduce_precision does not accept dtype complex64"); "full" works for every mixer.
    results = {remat: loss_and_grad(lm("attention", 2, scan_layers=True, remat=remat), tok)
               for remat in ("none", "full", "dots_saveable")}
    loss0, grads0 = results["none"]
    for remat, (loss, grads) in results.items():
        assert_close(loss, loss0, 1e-6, f"loss {remat}")
        for (path, g), (_, g0) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads0)):
            assert_close(g[...], g0[...], 1e-5, f"grad {remat} {path}")
    assert all(np.any(np.asarray(g[...]) != 0) for _, g in nnx.to_flat_state(grads0))


def test_bfloat16_compute_keeps_float32_params_and_values():
    model = lm("s4d,attention", 2, scan_layers=True, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model.stack.scanned.blocks[1].mixer.dtype == jnp.bfloat16  # mixers get the dtype
    logits = forward(model, tokens())
    assert logits.dtype == jnp.float32
    reference = lm("s4d,attention", 2, scan_layers=True)
    nnx.update(reference, nnx.state(model, nnx.Param))
    # bfloat16 keeps 8 significant bits; a few layers of its rounding stay inside 2e-2.
    assert_close(logits, forward(reference, tokens()), 2e-2, "bf16 vs f32 logits")


def test_generate_greedy_is_the_argmax_of_the_forward_pass():
    model, prompt = lm("s4d,attention", 2, scan_layers=True), tokens(length=4)
    out = generate(model, prompt, 5)
    assert out.shape == (BATCH, 5) and out.dtype == jnp.int32
    # One causal forward over prompt + output scores every generated position at once.
    logits = forward(model, jnp.concatenate([prompt, out], axis=1))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.argmax(logits[:, 3:-1], -1)))
    sampled = generate(model, prompt, 5, temperature=1.0, rng=jax.random.key(0))
    assert sampled.shape == (BATCH, 5) and np.all((sampled >= 0) & (sampled < V))


@pytest.mark.parametrize("mixer", ["attention", "s4d"])
def test_segment_ids_isolate_documents_in_stacks(mixer):
    model, tok = lm(mixer, 2), tokens()
    cut = 4
    seg = jnp.broadcast_to((jnp.arange(T) >= cut).astype(jnp.int32)[None], (BATCH, T))
    packed = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tok, seg)
    assert_close(packed[:, :cut], forward(model, tok[:, :cut]), 1e-5, "doc 1 packed vs alone")
    assert_close(packed[:, cut:], forward(model, tok[:, cut:]), 1e-5, "doc 2 packed vs alone")


def test_learned_positions_decode_equals_forward_and_restart_per_segment():
    model, tok = lm("attention", 2, max_positions=T), tokens()
    full = forward(model, tok)
    # The positions matter: shifting the same tokens by one position changes the logits.
    shifted = forward(model, jnp.concatenate([tok[:, :1], tok[:, :-1]], axis=1))[:, 1:]
    assert float(jnp.max(jnp.abs(shifted - full[:, :-1]))) > 1e-3
    logits, cache = prefill(model, tok[:, :6], model.init_cache(BATCH, T))
    out = [logits]
    for t in range(6, T):
        logits_t, cache = decode(model, tok[:, t], cache)
        out.append(logits_t[:, None])
    assert int(cache.position) == T
    assert_close(jnp.concatenate(out, axis=1), full, 1e-5, "learned positions: decode vs forward")
    cut = 4
    seg = jnp.broadcast_to((jnp.arange(T) >= cut).astype(jnp.int32)[None], (BATCH, T))
    packed = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tok, seg)
    assert_close(packed[:, cut:], forward(model, tok[:, cut:]), 1e-5, "doc 2 starts at position 0")
    with pytest.raises(ValueError, match="max_positions=10"):
        model(tokens(length=T + 1))
    with pytest.raises(ValueError, match="max_positions=10"):
        model.prefill(tok, cache)   # the cache is already at position T
    with pytest.raises(ValueError, match="max_positions"):
        lm("attention", 1, max_positions=-1)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_sequence_classifier_shape_and_grads(pooling):
    clf = SequenceClassifier(vocab_size=V, num_classes=3, d_model=D, num_layers=2,
                             mixer="attention", pooling=pooling, mixer_options={"num_heads": 2},
                             scan_layers=True, rngs=nnx.Rngs(0))
    tok, labels = tokens(), jnp.array([0, 2])
    mask = jnp.arange(T)[None] < jnp.array([[T], [T - 3]])

    def loss(m):
        logits = m(tok, mask=mask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))

    value, grads = nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(clf)
    assert clf(tok).shape == (BATCH, 3) and np.isfinite(float(value))
    for path, g in nnx.to_flat_state(grads):
        assert np.all(np.isfinite(g[...])) and np.any(g[...] != 0), path
    # Padding after the mask changes nothing.
    padded = tok.at[1, T - 3:].set(0)
    assert_close(clf(padded, mask=mask), clf(tok, mask=mask), 1e-6, "padding ignored")


def test_bad_inputs_are_clear_errors():
    model = lm("attention", 1)
    with pytest.raises(ValueError, match=r"`tokens` must be an integer array"):
        model(jnp.zeros((BATCH, T), jnp.float32))
    with pytest.raises(ValueError, match=r"`tokens`.*\[batch, time\]"):
        model(jnp.zeros((T,), jnp.int32))
    with pytest.raises(ValueError, match=r"`tokens`.*\[batch\]"):
        model.decode_step(jnp.zeros((BATCH, 1), jnp.int32), model.init_cache(BATCH, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        model(tokens(), segment_ids=jnp.zeros((BATCH, T + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"`remat` must be one of"):
        lm("s4d", 1, remat="sometimes")
    with pytest.raises(ValueError, match="unknown mixer 'mamba9'"):
        lm("s4d,mamba9", 2)
    with pytest.raises(ValueError, match="taken by none"):
        CausalLM(vocab_size=V, d_model=D, num_layers=1, mixer="attention",
                 mixer_options={"num_hedas": 2}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(vocab_size=V, num_classes=2, d_model=D, num_layers=1,
                           pooling="max", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs `rng`"):
        generate(model, tokens(length=2), 2, temperature=1.0)
    # remat as a bool (configs that only switch it on) is "full" / "none".
    assert lm("s4d", 1, remat=True).stack.remat == "full"


def test_block_raises_for_a_mixer_without_segment_ids():
    """A mixer that cannot keep packed documents apart makes the model refuse segment_ids (it
    used to drop them and let the documents mix); without them it still runs."""
    from memzoo.registry import MIXERS

    class NoSegments(nnx.Module):
        def __init__(self, d_model, *, rngs, dtype=jnp.float32):
            self.d_model = d_model

        def __call__(self, x, cache=None):
            return jnp.cumsum(x, axis=1)

        def init_cache(self, batch_size):
            return None

        def step(self, x_t, cache):
            return x_t, cache

    MIXERS.register("_test_no_segments", NoSegments)
    try:
        lm = CausalLM(vocab_size=8, d_model=8, num_layers=1, mixer="_test_no_segments",
                      rngs=nnx.Rngs(0))
        tokens = jnp.zeros((1, 6), jnp.int32)
        assert lm(tokens).shape == (1, 6, 8)
        with pytest.raises(ValueError, match="_test_no_segments.*segment_ids"):
            lm(tokens, segment_ids=jnp.array([[1, 1, 1, 2, 2, 2]], jnp.int32))
    finally:
        MIXERS._entries.pop("_test_no_segments")
