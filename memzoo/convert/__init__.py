"""Reference checkpoints <-> memzoo CausalLM: load a model trained elsewhere, write it back.

    model, config = load_checkpoint("path/to/dir")     # config.json + weights, auto-detected
    save_checkpoint(model, config, "path/to/out")       # the same format, the same tensors

A checkpoint directory holds `config.json` and `model.safetensors` (read with safetensors' numpy
API) or `pytorch_model.bin` (torch.save's zip, read and written by memzoo.convert.torch_zip with
numpy alone), or shards of either listed by their `*.index.json`: converting needs no torch.
Tensors are widened to float32 (memzoo's parameters) and written back as float32 (exact) or
bfloat16. A format is one module listed in FORMATS with `detect(config) ->
bool`, `build(config, tensors, source=...) -> CausalLM`, `export(model, config) -> tensors` and
`WEIGHTS_NAME` (the file it writes):

  mamba   mamba-ssm's MambaLMHeadModel.save_pretrained (Mamba-1 and Mamba-2 stacks)
  fla     flash-linear-attention's Hugging Face models (model_type gated_deltanet, gla, ...)

A format's tensor table (`Tensor` rows) is the whole mapping: loading and saving walk the same
rows in opposite directions, so a round trip is exact. Every failure is a `ConversionError`
naming the file, the tensor key or the config field.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable

import numpy as np

from memzoo.convert import torch_zip

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
# name -> module under memzoo.convert; a format is added by a line here.
FORMATS = {"mamba": "memzoo.convert.mamba", "fla": "memzoo.convert.fla"}


class ConversionError(ValueError):
    """A checkpoint that cannot be read into (or written from) a memzoo model."""


def _identity(x):
    return x


def linear(w):
    """torch Linear weight [out, in] <-> memzoo kernel [in, out] (the transpose both ways)."""
    return np.ascontiguousarray(np.asarray(w).T)


@dataclasses.dataclass
class Tensor:
    """One reference tensor `key` stored in memzoo as `owner.<attr>`: to_memzoo maps the file's
    array to the parameter, to_reference maps it back (exact inverses of each other). A tuple
    of keys is several reference tensors in one parameter (e.g. fla's q/k/v convolutions, one
    memzoo convolution): to_memzoo takes them in order, to_reference returns them so."""
    key: str | tuple[str, ...]
    owner: Any
    attr: str
    to_memzoo: Callable[[np.ndarray], np.ndarray] = _identity
    to_reference: Callable[[np.ndarray], np.ndarray] = _identity


# ---- files -------------------------------------------------------------------------------------

def read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise ConversionError(f"{path}: no {CONFIG_NAME} (a checkpoint directory holds "
                              f"{CONFIG_NAME} and {SAFETENSORS_NAME} or {TORCH_NAME})")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file}: not valid JSON ({e})") from None


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def _read_bfloat16_safetensors(file: str) -> dict[str, np.ndarray]:
    """A safetensors file with bfloat16 tensors, widened to float32 (exact): the format is an
    8-byte little-endian header size, a JSON header (dtype, shape, data_offsets per tensor),
    then the raw buffer."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw, shape = data[start:end], tuple(info["shape"])
        if info["dtype"] == "BF16":
            out[key] = torch_zip.bfloat16_to_float32(raw).reshape(shape)
        else:
            out[key] = np.frombuffer(raw, _SAFETENSORS_DTYPES[info["dtype"]]).reshape(shape)
    return out


def _read_file(file: str) -> dict[str, np.ndarray]:
    """One weights file (safetensors or torch.save's zip) -> key -> float32 array."""
    if file.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ConversionError(f"reading {file} needs the safetensors package "
                                  f"(pip install 'memzoo[convert]')") from None
        try:
            raw = load_file(file)
        except Exception as e:
            try:  # numpy has no bfloat16, so safetensors.numpy refuses such files
                raw = _read_bfloat16_safetensors(file)
            except Exception:
                raise ConversionError(f"{file}: cannot read ({e})") from None
    else:
        try:
            raw = torch_zip.load(file)
        except Exception as e:
            raise ConversionError(f"{file}: cannot read ({e})") from None
    return {k: np.asarray(v, np.float32) for k, v in raw.items()}


def _read_sharded(index_file: str) -> dict[str, np.ndarray]:
    """A checkpoint split over shards (save_pretrained's `max_shard_size`): the index's
    weight_map names the shard of every tensor; each shard is read once, and a tensor the
    index places in a shard that lacks it is an error, not a silent omission."""
    try:
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index_file}: not a shard index with a weight_map ({e!r})") from None
    folder, out = os.path.dirname(index_file), {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(folder, shard)
        if not os.path.isfile(file):
            raise ConversionError(f"{index_file}: shard {shard!r} is missing")
        tensors = _read_file(file)
        wanted = [k for k, v in weight_map.items() if v == shard]
        absent = [k for k in wanted if k not in tensors]
        if absent:
            raise ConversionError(f"{file}: the index places {absent[:8]} here but the shard "
                                  f"does not hold them")
        out.update({k: tensors[k] for k in wanted})
    return out


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], str]:
    """(key -> float32 numpy array, the weights file read): model.safetensors if present, else
    pytorch_model.bin, else either one's shard index (`*.index.json`, the shards beside it).
    Half-precision tensors are widened: memzoo keeps float32 parameters."""
    for name in (SAFETENSORS_NAME, TORCH_NAME):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return _read_file(file), file
    for name in (SAFETENSORS_NAME, TORCH_NAME):
        index = os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            return _read_sharded(index), index
    raise ConversionError(f"{path}: no weights file ({SAFETENSORS_NAME}, {TORCH_NAME} or their "
                          f"sharded .index.json)")


def _write_bfloat16_safetensors(tensors: dict[str, np.ndarray], file: str) -> None:
    """The layout _read_bfloat16_safetensors reads: header size, JSON header, raw buffer (the
    header padded with spaces to 8 bytes, as safetensors writes it)."""
    import ml_dtypes
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key in sorted(tensors):
        raw = np.ascontiguousarray(tensors[key], np.float32).astype(ml_dtypes.bfloat16).tobytes()
        header[key] = {"dtype": "BF16", "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for raw in chunks:
            f.write(raw)


WRITE_DTYPES = ("float32", "bfloat16")


def write_tensors(tensors: dict[str, np.ndarray], path: str, name: str,
                  dtype: str = "float32") -> str:
    """`dtype="bfloat16"` rounds to nearest even (the size releases ship; safetensors only)."""
    if dtype not in WRITE_DTYPES:
        raise ConversionError(f"dtype must be one of {WRITE_DTYPES}, got {dtype!r}")
    if name not in (SAFETENSORS_NAME, TORCH_NAME):
        raise ConversionError(f"unknown weights file name {name!r}; use {SAFETENSORS_NAME} or "
                              f"{TORCH_NAME}")
    if dtype == "bfloat16" and name != SAFETENSORS_NAME:
        raise ConversionError(f"dtype='bfloat16' is written as {SAFETENSORS_NAME} only, "
                              f"not {name!r}")
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, name)
    if dtype == "bfloat16":
        _write_bfloat16_safetensors(tensors, file)
        return file
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    if name == SAFETENSORS_NAME:
        from safetensors.numpy import save_file
        save_file(tensors, file, metadata={"format": "pt"})
    else:
        torch_zip.save(tensors, file)
    return file


def write_config(config: dict, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, CONFIG_NAME)
    with open(file, "w") as f:
        json.dump(config, f, indent=2)
    return file


# ---- the tensor table ----------------------------------------------------------------------

def assign(rows: list[Tensor], tensors: dict[str, np.ndarray], source: str,
           ignore: tuple[str, ...] = ()) -> None:
    """Copy every row's tensor into its memzoo parameter, checking keys and shapes both ways."""
    missing = [k for r in rows for k in _keys(r) if k not in tensors]
    if missing:
        raise ConversionError(f"{source}: missing tensor(s) {missing[:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    used = {k for r in rows for k in _keys(r)} | set(ignore)
    extra = sorted(k for k in tensors if k not in used)
    if extra:
        raise ConversionError(f"{source}: tensor(s) {extra[:8]} have no place in the memzoo model "
                              f"(an option this converter does not support?)")
    for r in rows:
        var = getattr(r.owner, r.attr)
        try:
            value = np.asarray(r.to_memzoo(*(tensors[k] for k in _keys(r))), np.float32)
        except ValueError as e:  # e.g. a reshape the file's shape does not allow
            raise ConversionError(f"{source}: tensor(s) {r.key!r} of shape(s) "
                                  f"{[tuple(tensors[k].shape) for k in _keys(r)]} do not fit "
                                  f"{type(r.owner).__name__}.{r.attr} {tuple(var.shape)}: {e}"
                                  ) from None
        if tuple(value.shape) != tuple(var.shape):
            raise ConversionError(
                f"{source}: tensor(s) {r.key!r} of shape(s) "
                f"{[tuple(tensors[k].shape) for k in _keys(r)]}, which map "
                f"to {tuple(value.shape)}, but the model built from config.json wants "
                f"{tuple(var.shape)} for {type(r.owner).__name__}.{r.attr}")
        var[...] = value


def _keys(row: Tensor) -> tuple[str, ...]:
    return row.key if isinstance(row.key, tuple) else (row.key,)


def extract(rows: list[Tensor]) -> dict[str, np.ndarray]:
    out = {}
    for r in rows:
        values = r.to_reference(np.asarray(getattr(r.owner, r.attr)[...], np.float32))
        if not isinstance(r.key, tuple):
            values = (values,)
        out.update({k: np.asarray(v, np.float32) for k, v in zip(_keys(r), values)})
    return out


def require_zero(owner, attr: str, what: str) -> None:
    """A memzoo parameter the reference does not have (e.g. an MLP bias): saving is only exact
    while it is still zero."""
    var = getattr(owner, attr, None)
    if var is not None and np.any(np.asarray(var[...]) != 0):
        raise ConversionError(f"{what}: memzoo parameter {type(owner).__name__}.{attr} is nonzero, "
                              f"and the reference format has no place for it")


def gated_mlps(model):
    """(up, down) of every block's gated MLP: the converters build mlp_bias=False models, but
    a model built otherwise (memzoo's default has MLP biases) may be exported too."""
    for block in model.stack.layers:
        if block.mlp is not None:
            yield block.mlp.up.proj, block.mlp.down


def require_zero_mlp_biases(model, what: str) -> None:
    for up, down in gated_mlps(model):
        require_zero(up, "bias", what), require_zero(down, "bias", what)


# ---- the public entry points -----------------------------------------------------------------

def detect_format(config: dict, source: str = "config.json") -> str:
    for name, module in FORMATS.items():
        if importlib.import_module(module).detect(config):
            return name
    raise ConversionError(f"{source}: not a checkpoint format memzoo reads (model_type="
                          f"{config.get('model_type')!r}; formats: {', '.join(FORMATS)})")


def load_checkpoint(path: str, *, format: str | None = None, **build_options):
    """(memzoo CausalLM with the checkpoint's weights, the reference config dict). `format`
    overrides detection; `build_options` go to the format's builder (e.g. dtype)."""
    config = read_config(path)
    name = format or detect_format(config, os.path.join(path, CONFIG_NAME))
    if name not in FORMATS:
        raise ConversionError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    tensors, source = read_tensors(path)
    module = importlib.import_module(FORMATS[name])
    return module.build(config, tensors, source=source, **build_options), config


def save_checkpoint(model, config: dict, path: str, *, format: str | None = None,
                    weights_name: str | None = None, dtype: str = "float32") -> str:
    """Write `model` in the reference format of `config` (as load_checkpoint returned it):
    config.json and the weights file (the format's usual one unless `weights_name`), float32
    (exact) or `dtype="bfloat16"` (rounded, safetensors)."""
    name = format or detect_format(config)
    module = importlib.import_module(FORMATS[name])
    tensors = module.export(model, config)
    write_config(config, path)
    return write_tensors(tensors, path, weights_name or module.WEIGHTS_NAME, dtype)


__all__ = ["ConversionError", "load_checkpoint", "save_checkpoint", "read_tensors",
           "read_config", "write_tensors", "write_config", "detect_format", "FORMATS"]
