"""CausalLM's reference-checkpoint options (issue 16): left at their defaults the model is the
plain pre-norm stack written out below, bit for bit; each option does what it says (the MLP
width and activation, every block norm's epsilon, the float32 residual stream, the input
embedding scale, the logit soft cap); decoding agrees with the forward pass with all of them
on; the training config carries them and names a bad key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.models import CausalLM, SequenceClassifier
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import lm_prefill_then_decode

V, D, T, BATCH = 13, 16, 9, 2
OPTIONS = {"state_size": 4, "attention": {"num_heads": 2}}


def lm(mixer="s4d,attention", num_layers=2, seed=0, **kw):
    kw.setdefault("mlp_ratio", 2)
    return CausalLM(vocab_size=V, d_model=D, num_layers=num_layers, mixer=mixer,
                    mixer_options=OPTIONS, rngs=nnx.Rngs(seed), **kw)


def tokens(seed=1, length=T):
    return jax.random.randint(jax.random.key(seed), (BATCH, length), 0, V)


def plain_forward(model, tok):
    """The stack as it was before the options existed: embedding in the compute dtype,
    x + mixer(norm(x)), x + SwiGLU(norm(x)), final norm, tied head."""
    x = jnp.take(model.embed[...], tok, axis=0).astype(model.dtype)
    for block in model.stack.layers:
        x = x + block.mixer(block.mixer_norm(x)).astype(model.dtype)
        h = block.mlp_norm(x)
        gate, value = jnp.split(h @ block.mlp.up.proj.kernel[...]
                                + block.mlp.up.proj.bias[...][None, None], 2, axis=-1)
        x = x + ((jax.nn.silu(gate) * value) @ block.mlp.down.kernel[...]
                 + block.mlp.down.bias[...][None, None])
    x = model.final_norm(x)
    return jnp.einsum("...d,vd->...v", x, model.embed[...]).astype(jnp.float32)


def test_defaults_are_the_plain_stack_bit_for_bit():
    model, tok = lm(), tokens()
    np.testing.assert_array_equal(np.asarray(model(tok)), np.asarray(plain_forward(model, tok)))
    for block in model.stack.layers:
        assert block.mlp.up.proj.kernel.shape == (D, 2 * 2 * D)
        assert block.mixer_norm.epsilon == 1e-6 and block.residual_dtype == jnp.float32
    assert model.embed_scale is None and model.logit_softcap is None


def test_mlp_hidden_sets_the_kernel_shapes_and_overrides_mlp_ratio():
    model = lm(mlp_hidden=24, mlp_ratio=3)
    for block in model.stack.layers:
        assert block.mlp.up.proj.kernel.shape == (D, 2 * 24)
        assert block.mlp.down.kernel.shape == (24, D)
    assert lm(mlp_hidden=5, mlp_ratio=0).stack.layers[0].mlp.down.kernel.shape == (5, D)
    assert lm(mlp_hidden=0).stack.layers[0].mlp is None
    assert lm(mlp_hidden=24)(tokens()).shape == (BATCH, T, V)


@pytest.mark.parametrize("activation,fn", [
    ("gelu", lambda g: jax.nn.gelu(g, approximate=True)),
    ("gelu_tanh", lambda g: jax.nn.gelu(g, approximate=True)),
    ("gelu_exact", lambda g: jax.nn.gelu(g, approximate=False)),
    ("silu", jax.nn.silu)])
def test_mlp_activation_is_the_gated_mlp_activation(activation, fn):
    mlp = lm(mlp_activation=activation).stack.layers[0].mlp
    x = jax.random.normal(jax.random.key(2), (BATCH, T, D))
    gate = x @ mlp.up.proj.kernel[:, :2 * D] + mlp.up.proj.bias[:2 * D][None, None]
    value = x @ mlp.up.proj.kernel[:, 2 * D:] + mlp.up.proj.bias[2 * D:][None, None]
    expected = (fn(gate) * value) @ mlp.down.kernel[...] + mlp.down.bias[...][None, None]
    assert_close(mlp(x), expected, 1e-6, activation)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_eps_reaches_every_block_norm_and_the_final_norm(norm):
    model = lm(norm=norm, norm_eps=0.25, num_layers=3, scan_layers=True)
    norms = [model.final_norm]
    for block in list(model.stack.scanned.blocks) + list(model.stack.layers):
        norms += [block.mixer_norm, block.mlp_norm]
    assert len(norms) == 7 and all(n.epsilon == 0.25 for n in norms)
    # Numerically too: a large epsilon shrinks a small input's normalised values.
    # Mean 0 and mean square 0.01: both norms divide by sqrt(0.01 + eps).
    x = jnp.tile(jnp.array([0.1, -0.1]), D // 2)[None]
    np.testing.assert_allclose(np.asarray(model.final_norm(x)), np.asarray(x) / np.sqrt(0.26),
                               rtol=1e-6)


def test_residual_fp32_keeps_the_stream_float32_under_bfloat16():
    tok = tokens()
    model = lm(dtype=jnp.bfloat16, residual_fp32=True)
    block = model.stack.layers[0]
    assert block.residual_dtype == jnp.float32
    x = model._embed(tok)
    assert x.dtype == jnp.float32
    # The embedding is rounded to the compute dtype first (a bf16 model's table), then widened.
    np.testing.assert_array_equal(
        np.asarray(x), np.asarray(jnp.take(model.embed[...], tok, 0).astype(jnp.bfloat16)
                                  .astype(jnp.float32)))
    out = block(x)
    assert out.dtype == jnp.float32
    h = x + block.mixer(block.mixer_norm(x)).astype(jnp.float32)
    expected = h + block.mlp(block.mlp_norm(h)).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    # Without it the stream is bfloat16, so the last layer's sum is rounded there.
    assert lm(dtype=jnp.bfloat16).stack.layers[0](x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    # Under float32 compute it changes nothing.
    tok32 = tokens(3)
    np.testing.assert_array_equal(np.asarray(lm(residual_fp32=True)(tok32)),
                                  np.asarray(lm()(tok32)))


def test_embed_scale_scales_the_input_embeddings_only():
    tok, s = tokens(), 4.0
    scaled = lm(embed_scale=s, tie_embeddings=False)
    plain = lm(tie_embeddings=False)
    plain.embed[...] = scaled.embed[...] * s
    np.testing.assert_array_equal(np.asarray(scaled(tok)), np.asarray(plain(tok)))
    # A tied head decodes with the unscaled table (Gemma).
    tied = lm(embed_scale=s)
    h = tied.features(tok)
    np.testing.assert_array_equal(np.asarray(tied(tok)), np.asarray(
        jnp.einsum("btd,vd->btv", h, tied.embed[...])))
    np.testing.assert_array_equal(np.asarray(tied._embed(tok)),
                                  np.asarray(jnp.take(tied.embed[...], tok, 0) * s))


def test_logit_softcap_bounds_the_logits():
    tok, plain = tokens(), lm()
    base = plain(tok)
    # Half the largest logit: the cap bites (tanh(2) < 1) without saturating float32's tanh.
    c = float(jnp.max(jnp.abs(base))) / 2
    capped = lm(logit_softcap=c)
    logits = capped(tok)
    assert float(jnp.max(jnp.abs(logits))) < c
    assert_close(logits, c * jnp.tanh(base / c), 1e-6, "softcap")
    h = capped.features(tok)
    assert_close(capped.project(h), logits, 1e-7, "project applies the cap")


@pytest.mark.parametrize("scan", [False, True])
def test_every_option_on_decode_equals_forward(scan):
    model = lm(num_layers=3, scan_layers=scan, mlp_hidden=20, mlp_activation="gelu_tanh",
               norm_eps=1e-5, residual_fp32=True, embed_scale=D ** 0.5, logit_softcap=3.0,
               max_positions=16, mlp_bias=False)
    tok = tokens()
    full = nnx.jit(lambda m, t: m(t))(model, tok)
    assert_close(lm_prefill_then_decode(model, tok, 5), full, 1e-5,
                 "prefill then decode vs forward")


def test_classifier_takes_the_block_options():
    clf = SequenceClassifier(vocab_size=V, num_classes=3, d_model=D, num_layers=1,
                             mlp_hidden=8, mlp_activation="gelu", norm_eps=1e-3,
                             residual_fp32=True, embed_scale=2.0, rngs=nnx.Rngs(0))
    assert clf.stack.layers[0].mlp.down.kernel.shape == (8, D)
    assert clf(tokens()).shape == (BATCH, 3)


@pytest.mark.parametrize("kw,match", [
    (dict(mlp_hidden=-1), "mlp_hidden"), (dict(mlp_hidden=2.0), "mlp_hidden"),
    (dict(mlp_activation="geglu"), "mlp_activation"), (dict(norm_eps=0.0), "norm_eps"),
    (dict(residual_fp32=1), "residual_fp32"), (dict(embed_scale=-2.0), "embed_scale"),
    (dict(logit_softcap=0), "logit_softcap"), (dict(mlp_bias=0), "mlp_bias")])
def test_bad_options_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        lm(**kw)


def test_training_config_carries_the_options():
    from configs import ConfigError
    from configs.base import ModelConfig, TrainConfig
    from train.trainer import build_model
    m = ModelConfig(mixer="s4d", d_model=D, num_layers=1, mlp_hidden=12,
                    mlp_activation="gelu_tanh", norm_eps=1e-5, residual_fp32=True,
                    embed_scale=4.0, logit_softcap=30.0, mlp_bias=False)
    model = build_model(TrainConfig(model=m), V, nnx.Rngs(0))
    block = model.stack.layers[0]
    assert block.mlp.down.kernel.shape == (12, D) and block.mlp.up.act_name == "gelu_tanh"
    assert block.mixer_norm.epsilon == 1e-5 and model.final_norm.epsilon == 1e-5
    assert block.residual_dtype == jnp.float32
    assert block.mlp.up.proj.bias is None and block.mlp.down.bias is None
    assert model.embed_scale == 4.0 and model.logit_softcap == 30.0
    with pytest.raises(ConfigError, match="model.logit_softcap"):
        build_model(TrainConfig(model=m), V, nnx.Rngs(0), num_classes=3)
    for key, value in [("mlp_hidden", -3), ("mlp_activation", "nope"), ("norm_eps", 0.0),
                       ("residual_fp32", "yes"), ("embed_scale", -1.0),
                       ("logit_softcap", 0.0), ("mlp_bias", None)]:
        with pytest.raises(ConfigError, match=f"model.{key}"):
            ModelConfig(**{key: value})


def test_residual_fp32_scans_and_decodes_under_bfloat16():
    # The scan's carry is the residual stream: float32 here while every layer computes in bf16.
    model = lm(num_layers=3, scan_layers=True, dtype=jnp.bfloat16, residual_fp32=True)
    reference = lm(num_layers=3, scan_layers=True)   # same seed: the same float32 parameters
    tok = tokens()
    full = nnx.jit(lambda m, t: m(t))(model, tok)
    assert_close(full, reference(tok), 2e-2, "bf16 compute, f32 residual vs float32")
    assert_close(lm_prefill_then_decode(model, tok, 5), full, 2e-2,
                 "prefill then decode vs forward")
