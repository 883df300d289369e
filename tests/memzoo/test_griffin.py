"""Griffin in memzoo: attention's partial RoPE and output bias (the contract's checks over those
options), the Griffin model helper, and recurrentgemma's parameters converted into a memzoo
CausalLM giving recurrentgemma's own logits (its JAX model run on small random weights, plain
and packed rows), and back to the same arrays."""
import importlib.util
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.attention import Attention, rope
from memzoo.convert import ConversionError
from memzoo.convert.recurrentgemma import (embed_scale, flatten, from_recurrentgemma,
                                           model_options, to_recurrentgemma)
from memzoo.models import griffin
from pallas_kernels._testing import assert_close, rel_rmse
from tests.memzoo import helpers, test_contract

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER_SCRIPT = os.path.join(ROOT, "tests", "memzoo", "recurrentgemma_peer.py")
PEER_PYTHON = os.path.join(ROOT, ".peers", "jax", "bin", "python")
ATTENTION_OPTIONS = dict(num_heads=2, num_kv_heads=1, window=6, rope_fraction=0.5, out_bias=True)


# ---- attention options --------------------------------------------------------------------

def test_rope_fraction_rotates_only_the_leading_dimensions():
    attn = Attention(16, num_heads=2, rope_fraction=0.5, rngs=nnx.Rngs(0))
    assert attn.rope_dims == 4
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    y = attn._rope(x, pos)
    np.testing.assert_array_equal(np.asarray(y[..., 4:]), np.asarray(x[..., 4:]))
    assert_close(y[..., :4], rope(x[..., :4], pos, 10_000.0), 1e-7, "rotated part")
    with pytest.raises(ValueError, match="rope"):
        Attention(16, num_heads=2, rope_fraction=0.3, rngs=nnx.Rngs(0))


def test_out_bias_is_added_to_the_output():
    attn = Attention(16, num_heads=2, out_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    y0 = attn(x)
    attn.out_bias[...] = jnp.arange(16.0)
    assert_close(attn(x) - y0, jnp.broadcast_to(jnp.arange(16.0), y0.shape), 1e-6, "bias")
    assert Attention(16, num_heads=2, rngs=nnx.Rngs(0)).out_bias is None


@pytest.mark.parametrize("check", [test_contract.check_decoding,
                                   test_contract.check_packed_equals_alone,
                                   test_contract.check_gradients])
def test_griffin_attention_keeps_the_contract(check):
    check("attention", ATTENTION_OPTIONS)


# ---- the model helper -----------------------------------------------------------------------

def test_griffin_helper_builds_the_pattern_and_decodes_like_the_forward_pass():
    model = griffin(vocab_size=23, d_model=16, num_layers=4, num_heads=2, window=5,
                    rngs=nnx.Rngs(0))
    names = [b.mixer_name for b in model.stack.layers]
    assert names == ["rglru", "rglru", "attention", "rglru"]
    assert model.embed_scale == 4.0 and model.logit_softcap == 30.0
    block = model.stack.layers[2]
    assert block.mlp.down.kernel.shape == (48, 16) and block.mlp.up.act_name == "gelu_tanh"
    assert block.mixer.num_kv_heads == 1 and block.mixer.window == 5
    tok = jax.random.randint(jax.random.key(0), (2, 11), 0, 23)
    full = nnx.jit(lambda m, t: m(t))(model, tok)
    logits, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(model, tok[:, :4],
                                                             model.init_cache(2, 11))
    decode = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    out = [logits]
    for t in range(4, 11):
        logits_t, cache = decode(model, tok[:, t], cache)
        out.append(logits_t[:, None])
    assert_close(jnp.concatenate(out, axis=1), full, 1e-5, "prefill then decode vs forward")


# ---- recurrentgemma's own model -------------------------------------------------------------

def _run_peer(path):
    if importlib.util.find_spec("recurrentgemma") is not None:
        spec = importlib.util.spec_from_file_location("recurrentgemma_peer", PEER_SCRIPT)
        peer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer)
        peer.main(path)
        return
    if not os.path.exists(PEER_PYTHON):
        helpers.peers_missing("recurrentgemma is not importable here and there is no .peers/jax venv "
                    "(bash ../shared/peers/setup.sh .peers builds it)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the test session's 8 host devices are not the peer's business
    subprocess.run([PEER_PYTHON, PEER_SCRIPT, path], check=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("recurrentgemma") / "golden.npz")
    _run_peer(path)
    data = np.load(path)
    params = {k.removeprefix("param:"): data[k] for k in data.files if k.startswith("param:")}
    return json.loads(str(data["config"])), params, data


def test_converted_model_gives_recurrentgemmas_logits(golden):
    config, params, data = golden
    model = from_recurrentgemma(params, config)
    tokens = jnp.asarray(data["tokens"])
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert float(np.max(np.abs(data["logits"]))) > 1.0  # not a near-zero comparison
    assert_close(logits, data["logits"], 1e-4, "memzoo vs recurrentgemma logits")
    # Packed rows: recurrentgemma's segment_pos restarts == memzoo's segment_ids.
    packed = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens,
                                                           jnp.asarray(data["segment_ids"]))
    assert_close(packed, data["logits_packed"], 1e-4, "packed rows vs recurrentgemma")
    assert rel_rmse(data["logits_packed"], data["logits"]) > 1e-2  # the restarts matter


def test_round_trip_gives_back_the_same_arrays(golden):
    config, params, _ = golden
    back = flatten(to_recurrentgemma(from_recurrentgemma(params, config), config))
    assert set(back) == set(params)
    for key, value in params.items():
        if key.endswith("norm/scale"):  # stored as 1 + scale: float32 rounding of the sum
            bound = np.finfo(np.float32).eps * (1 + np.abs(value))
            assert np.all(np.abs(back[key] - value) <= bound), key
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_conversion_errors_name_the_tensor_or_field():
    config = dict(vocab_size=11, width=8, mlp_expanded_width=12, num_heads=2,
                  block_types=("RECURRENT", "ATTENTION"), embeddings_scale_by_sqrt_dim=True,
                  attention_window_size=3, logits_soft_cap=30.0)
    model = griffin(vocab_size=11, d_model=8, num_layers=2, num_heads=2, window=4, mlp_hidden=12,
                    rngs=nnx.Rngs(0), pattern="rglru,attention")
    params = flatten(to_recurrentgemma(model, config))
    assert embed_scale(2560) == 50.5 and model_options(config)["embed_scale"] == embed_scale(8)
    with pytest.raises(ConversionError, match="ffw_down/bias"):
        from_recurrentgemma({k: v for k, v in params.items() if "ffw_down/bias" not in k}, config)
    with pytest.raises(ConversionError, match="proj_q"):
        from_recurrentgemma({**params, "blocks.1/attention_block/proj_q/kernel":
                             np.zeros((8, 4), np.float32)}, config)
    with pytest.raises(ConversionError, match="block_types"):
        from_recurrentgemma(params, {**config, "block_types": ("RECURRENT", "MLP")})
    with pytest.raises(ConversionError, match="attention_window_size"):
        from_recurrentgemma(params, {k: v for k, v in config.items()
                                     if k != "attention_window_size"})
