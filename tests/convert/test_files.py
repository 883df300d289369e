"""Checkpoint files beyond one float32 file: shards listed by a save_pretrained-style
`*.index.json`, and bfloat16 writing (what released checkpoints look like)."""
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from memzoo.convert import ConversionError, load_checkpoint, read_tensors, write_tensors
from memzoo.convert import fla as fla_format
from memzoo.convert import mamba as mamba_format
from memzoo.convert.__main__ import main as cli
from tests.convert.test_convert import GDN, MAMBA2, _checkpoint


def _shard(src, dst, name, num_shards=3):
    """Split src's single weights file into `num_shards` files plus the index, as
    save_pretrained(max_shard_size=...) lays them out."""
    tensors, _ = read_tensors(str(src))
    stem, ext = name.split(".")
    keys, weight_map = sorted(tensors), {}
    for i in range(num_shards):
        shard = f"{stem}-{i + 1:05d}-of-{num_shards:05d}.{ext}"
        part = {k: tensors[k] for k in keys[i::num_shards]}
        write_tensors(part, str(dst), name)
        os.rename(dst / name, dst / shard)
        weight_map.update({k: shard for k in part})
    (dst / f"{name}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return tensors


@pytest.mark.parametrize("config,module,name", [
    (MAMBA2, mamba_format, "pytorch_model.bin"), (GDN, fla_format, "model.safetensors")])
def test_sharded_checkpoint_loads_like_the_single_file(tmp_path, config, module, name):
    original = _checkpoint(tmp_path / "single", config, module)
    tensors = _shard(tmp_path / "single", tmp_path / "sharded", name)
    read, source = read_tensors(str(tmp_path / "sharded"))
    assert source.endswith(".index.json") and sorted(read) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(read[k], tensors[k], err_msg=k)
    model, _ = load_checkpoint(str(tmp_path / "sharded"))
    tokens = jnp.asarray([[1, 5, 9, 3]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(original(tokens)))


def test_sharded_checkpoint_errors_name_the_shard(tmp_path):
    _checkpoint(tmp_path / "single", GDN, fla_format)
    _shard(tmp_path / "single", tmp_path / "s", "model.safetensors")
    index = tmp_path / "s" / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    key, shard = next(iter(weight_map.items()))
    os.remove(tmp_path / "s" / shard)
    with pytest.raises(ConversionError, match=f"shard '{shard}' is missing"):
        read_tensors(str(tmp_path / "s"))
    _shard(tmp_path / "single", tmp_path / "t", "model.safetensors")
    index = tmp_path / "t" / "model.safetensors.index.json"
    moved = dict(weight_map, **{key: "model-00002-of-00003.safetensors"})
    if weight_map[key] == "model-00002-of-00003.safetensors":
        moved[key] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps({"weight_map": moved}))
    with pytest.raises(ConversionError, match="does not hold them"):
        read_tensors(str(tmp_path / "t"))
    index.write_text("{}")
    with pytest.raises(ConversionError, match="weight_map"):
        read_tensors(str(tmp_path / "t"))


def test_bfloat16_writing_rounds_to_nearest_even(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((5, 3)).astype(np.float32),
               "b": np.float32([1.0, 1.00390625, 1.01171875, -3e-39])}  # ties and a subnormal
    write_tensors(tensors, str(tmp_path), "model.safetensors", dtype="bfloat16")
    read, _ = read_tensors(str(tmp_path))
    for k, v in tensors.items():
        expect = v.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(read[k], expect, err_msg=k)
    # Round to nearest even: 1 + 2^-8 (a tie) goes down to 1, 1 + 3 * 2^-8 up to 1 + 2^-6.
    np.testing.assert_array_equal(read["b"][:3], [1.0, 1.0, 1.015625])
    with pytest.raises(ConversionError, match="dtype='bfloat16' is written as model.safetensors"):
        write_tensors(tensors, str(tmp_path), "pytorch_model.bin", dtype="bfloat16")
    with pytest.raises(ConversionError, match="dtype must be one of"):
        write_tensors(tensors, str(tmp_path), "model.safetensors", dtype="float16")


def test_command_line_writes_bfloat16(tmp_path):
    _checkpoint(tmp_path / "a", GDN, fla_format)
    assert cli([str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    full, _ = read_tensors(str(tmp_path / "a"))
    half, _ = read_tensors(str(tmp_path / "b"))
    for k in full:
        np.testing.assert_array_equal(half[k], full[k].astype(ml_dtypes.bfloat16).astype(np.float32))
    # What was written loads again (the reduced precision is the user's choice).
    load_checkpoint(str(tmp_path / "b"))
