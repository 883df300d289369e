"""memzoo.convert without the reference implementations: checkpoints written by memzoo itself
(the formats' own layouts), exact round trips, torch.save files without torch, and the errors
that name the file, key or config field."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.convert import (ConversionError, load_checkpoint, read_tensors, save_checkpoint,
                            torch_zip, write_tensors)
from memzoo.convert import fla as fla_format
from memzoo.convert import mamba as mamba_format
from memzoo.convert.__main__ import main as cli
from memzoo.models import CausalLM

MAMBA2 = dict(d_model=32, n_layer=2, vocab_size=50, d_intermediate=40, tie_embeddings=False,
              ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=16, ngroups=2))
GDN = dict(model_type="gated_deltanet", hidden_size=32, num_hidden_layers=2, vocab_size=50,
           head_dim=8, num_heads=2, norm_eps=1e-5, tie_word_embeddings=False)


def _checkpoint(path, config, module, seed=1):
    """A checkpoint in `module`'s format from a randomly initialised memzoo model."""
    model = CausalLM(**module.model_options(config), rngs=nnx.Rngs(seed))
    save_checkpoint(model, config, str(path))
    return model


@pytest.mark.parametrize("config,module,weights", [
    (MAMBA2, mamba_format, "pytorch_model.bin"), (GDN, fla_format, "model.safetensors")])
def test_round_trip_is_exact(tmp_path, config, module, weights):
    original = _checkpoint(tmp_path / "a", config, module)
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json", weights]
    model, loaded_config = load_checkpoint(str(tmp_path / "a"))
    assert loaded_config == json.loads(json.dumps(config))
    tokens = jnp.asarray([[1, 5, 9, 3, 7]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(original(tokens)))
    save_checkpoint(model, loaded_config, str(tmp_path / "b"))
    a, b = read_tensors(str(tmp_path / "a"))[0], read_tensors(str(tmp_path / "b"))[0]
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_torch_zip_round_trip(tmp_path):
    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.float32([0.5, -2.0]), "scalar": np.asarray(3.0, np.float32)}
    torch_zip.save(tensors, str(tmp_path / "x.bin"))
    back = torch_zip.load(str(tmp_path / "x.bin"))
    assert list(back) == list(tensors)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])


def test_missing_files(tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(GDN))
    with pytest.raises(ConversionError, match="no weights file"):
        load_checkpoint(str(tmp_path))


def test_missing_and_extra_tensors_are_named(tmp_path):
    _checkpoint(tmp_path, GDN, fla_format)
    tensors = read_tensors(str(tmp_path))[0]
    key = "model.layers.1.attn.dt_bias"
    del tensors[key]
    write_tensors(tensors, str(tmp_path), "model.safetensors")
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        load_checkpoint(str(tmp_path))
    tensors[key] = np.zeros(2, np.float32)
    tensors["model.layers.0.attn.surprise"] = np.zeros(3, np.float32)
    write_tensors(tensors, str(tmp_path), "model.safetensors")
    with pytest.raises(ConversionError, match="surprise"):
        load_checkpoint(str(tmp_path))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _checkpoint(tmp_path, MAMBA2, mamba_format)
    config = dict(MAMBA2, ssm_cfg=dict(MAMBA2["ssm_cfg"], d_state=4))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"in_proj\.weight.*\(164, 32\).*\(32, 148\)"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("config,field", [
    (dict(MAMBA2, ssm_cfg=dict(layer="Mamba2", D_has_hdim=True)), "D_has_hdim"),
    (dict(MAMBA2, ssm_cfg=dict(layer="Mamba2", norm_before_gate=True)), "norm_before_gate"),
    (dict(MAMBA2, attn_layer_idx=[1]), "attn_layer_idx"),
    (dict(MAMBA2, ssm_cfg=dict(layer="Mamba3")), "ssm_cfg.layer"),
    (dict(GDN, num_v_heads=4), "num_v_heads"),
    (dict(GDN, allow_neg_eigval="yes"), "allow_neg_eigval"),
    (dict(GDN, attn={"layers": [0]}), "attn"),
    ({**{k: v for k, v in GDN.items() if k != "head_dim"}, "model_type": "retnet",
      "num_kv_heads": 1}, "num_kv_heads"),
    (dict(GDN, mystery_option=3), "mystery_option"),
])
def test_unsupported_config_names_the_field(tmp_path, config, field):
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_tensors({}, str(tmp_path), "model.safetensors")
    with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
        load_checkpoint(str(tmp_path))


def test_unknown_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="llama"):
        load_checkpoint(str(tmp_path))


def test_converted_models_have_no_mlp_biases_and_biased_ones_are_refused(tmp_path):
    model = _checkpoint(tmp_path / "a", GDN, fla_format)
    assert model.stack.layers[0].mlp.down.bias is None   # nothing to train that fla lacks
    # A memzoo model with MLP biases (the default) exports only while they are zero.
    biased = CausalLM(**{**fla_format.model_options(GDN), "mlp_bias": True}, rngs=nnx.Rngs(0))
    save_checkpoint(biased, GDN, str(tmp_path / "b"))
    biased.stack.layers[0].mlp.down.bias[...] = jnp.ones(biased.stack.layers[0].mlp.down.bias.shape)
    with pytest.raises(ConversionError, match="bias"):
        save_checkpoint(biased, GDN, str(tmp_path / "c"))


def test_command_line(tmp_path, capsys):
    _checkpoint(tmp_path / "a", MAMBA2, mamba_format)
    assert cli([str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--tokens", "3,4"]) == 0
    out = capsys.readouterr().out
    assert "format mamba, mixer mamba2, 2 layers" in out and "pytorch_model.bin" in out
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "pytorch_model.bin"]
    assert cli([str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_bfloat16_safetensors_are_widened_exactly(tmp_path):
    # numpy has no bfloat16 (safetensors.numpy refuses it); the bytes are written by hand here.
    values = np.float32([1.0, -2.5, 3.140625, 0.0078125])  # exact in bfloat16
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2],
                               "data_offsets": [0, len(raw)]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw)
    tensors, _ = read_tensors(str(tmp_path))
    np.testing.assert_array_equal(tensors["w"], values.reshape(2, 2))
