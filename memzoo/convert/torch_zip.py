"""pytorch_model.bin (torch.save's zip format) read and written with numpy, without torch.

torch.save writes a zip: `<name>/data.pkl`, a pickle whose tensors are
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks) calls and
whose storages are persistent ids ("storage", torch.<Type>Storage, key, location, numel) naming
raw little-endian buffers `<name>/data/<key>`; plus `<name>/version` and `<name>/byteorder`.
State dicts need nothing else, so a restricted unpickler reads them (no other global is
allowed: loading runs no code from the file) and a hand-written pickle of the same shape writes
them for torch.load(weights_only=True) to read.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
            "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
            "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
            "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not size:
        return storage[offset].copy() if storage.size else np.zeros((), storage.dtype)
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *unused):
    return data


def bfloat16_to_float32(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"{self.source}: {module}.{name} is not part of a plain "
                                     f"state dict of tensors; load it with torch")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"{self.source}: unknown persistent id {kind!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        dtype = STORAGES[storage_type.name]
        if dtype == "bfloat16":
            return bfloat16_to_float32(raw)  # numpy has no bfloat16; widening is exact
        return np.frombuffer(raw, dtype)


def load(path: str) -> dict[str, np.ndarray]:
    """The state dict in a torch.save zip file, as numpy arrays."""
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise ValueError(f"{path}: no data.pkl (a pre-1.6 torch.save file?); load it with "
                             f"torch")
        prefix = pkl[0][:-len("data.pkl")]
        with archive.open(pkl[0]) as f:
            state = _Unpickler(io.BytesIO(f.read()), archive, prefix, path).load()
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _str(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _state_dict_pickle(tensors: dict[str, np.ndarray]) -> bytes:
    """Protocol-2 opcodes for OrderedDict(key -> float32 tensor i), storage i = data/<i>."""
    ordered_dict = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    out = [pickle.PROTO + bytes([2]), ordered_dict, pickle.MARK]
    for i, (key, a) in enumerate(tensors.items()):
        storage = _tuple([_str("storage"), _global("torch", "FloatStorage"), _str(str(i)),
                          _str("cpu"), _int(a.size)]) + pickle.BINPERSID
        strides = [int(np.prod(a.shape[j + 1:], dtype=np.int64)) for j in range(a.ndim)]
        args = _tuple([storage, _int(0), _tuple([_int(n) for n in a.shape]),
                       _tuple([_int(n) for n in strides]), pickle.NEWFALSE, ordered_dict])
        out += [_str(key), _global("torch._utils", "_rebuild_tensor_v2"), args, pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


def save(tensors: dict[str, np.ndarray], path: str) -> None:
    """Write float32 `tensors` as torch.save would, for torch.load (weights_only too)."""
    tensors = {k: np.ascontiguousarray(v, "<f4") for k, v in tensors.items()}
    prefix = "pytorch_model/"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(prefix + "data.pkl", _state_dict_pickle(tensors))
        archive.writestr(prefix + "byteorder", "little")
        for i, a in enumerate(tensors.values()):
            archive.writestr(f"{prefix}data/{i}", a.tobytes())
        archive.writestr(prefix + "version", "3\n")
