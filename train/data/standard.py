"""Standard tfds datasets as sequences, read from a data_dir where they are already prepared.

Nothing is downloaded: the data must have been prepared beforehand in array_record format
(`tfds build NAME --file_format=array_record --data_dir=DIR`, or `tfds convert_format` for an
existing tfrecord build), because only array_record is random-access and readable without
TensorFlow.

- images ("mnist", "fashion_mnist", "cifar10", any dataset with "image" and "label"): pixels in
  row-major (h, w, c) order as tokens 0..255, classification (sequential MNIST); "pmnist" applies
  one fixed permutation of the pixels drawn from `permutation_seed` (HiPPO's permuted MNIST).
- texts ("lm1b", any dataset with "text"): one example per text as bytes, [BOS] + bytes + [EOS]
  padded to seq_len + 1 tokens (a longer text is cut, without EOS), with segment_ids 1 on the text and 0 on padding, in the
  byte-LM layout of `train.data.byte_lm` (texts are not packed together).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from train.data import byte_lm

# memzoo name -> (tfds name, permute pixels)
ALIASES = {"mnist": ("mnist", False), "pmnist": ("mnist", True),
           "fashion_mnist": ("fashion_mnist", False), "cifar10": ("cifar10", False),
           "lm1b": ("lm1b", False)}


def load(name: str, split: str, data_dir: str | os.PathLike):
    """The tfds data source of a prepared dataset, or an error saying where it was looked for."""
    try:
        return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
    except Exception as e:  # tfds raises assorted types for "not there" and "wrong format"
        raise FileNotFoundError(
            f"tfds dataset {name!r} (split {split!r}) is not prepared in array_record format under "
            f"{os.fspath(data_dir)!r}: {type(e).__name__}: {e}. Prepare it there with `tfds build "
            f"{name} --file_format=array_record --data_dir={os.fspath(data_dir)}` (or `tfds "
            "convert_format` an existing build); memzoo does not download at training time."
        ) from e


@dataclasses.dataclass(frozen=True)
class ImageToSequence:
    """Picklable per-example transform (grain workers pickle it)."""
    permutation: np.ndarray | None

    def __call__(self, example):
        pixels = np.asarray(example["image"]).reshape(-1).astype(np.int32)
        if self.permutation is not None:
            pixels = pixels[self.permutation]
        return {"inputs": pixels, "label": np.asarray(example["label"], np.int32),
                "mask": np.ones(pixels.shape, np.float32)}


@dataclasses.dataclass(frozen=True)
class TextToBytes:
    seq_len: int

    def __call__(self, example):
        text = example["text"]
        data = text.encode() if isinstance(text, str) else bytes(text)
        if len(data) < self.seq_len:
            return next(byte_lm.pack([data], self.seq_len))
        # A cut text gets no EOS: the model should not learn that texts end where rows do.
        tokens = np.concatenate([[byte_lm.BOS], np.frombuffer(data[:self.seq_len], np.uint8)])
        return byte_lm.make_row(tokens.astype(np.int32), np.zeros(tokens.shape, np.int64),
                            self.seq_len)


def sequence_transform(name: str, source, *, seq_len: int | None, permute: bool,
                       permutation_seed: int = 0):
    """(transform, kind, natural seq_len, num_classes) for a tfds source's features."""
    features = source.dataset_info.features
    if "image" in features and "label" in features:
        length = int(np.prod(features["image"].shape))
        if seq_len not in (None, length):
            raise ValueError(f"{name!r} images are sequences of {length} pixels; got {seq_len=} "
                             "(pass seq_len=None or the pixel count)")
        permutation = (np.random.default_rng(permutation_seed).permutation(length)
                       if permute else None)
        return ImageToSequence(permutation), "classification", length, \
            features["label"].num_classes
    if "text" in features:
        if seq_len is None:
            raise ValueError(f"{name!r} is text: give a seq_len")
        return TextToBytes(seq_len), "next_token", seq_len, None
    raise ValueError(f"tfds dataset {name!r} has features {sorted(features)}; memzoo reads "
                     "'image'+'label' (classification) or 'text' (byte LM)")
