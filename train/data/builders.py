"""tfds builders that write the synthetic tasks and the byte-LM corpus as array_record files.

TensorFlow is not needed: `GeneratorBasedBuilder` with `file_format="array_record"` serialises
with protobuf alone, and `builder.as_data_source(split)` reads back through array_record into
numpy (tested with tensorflow-datasets 4.9.10). `DatasetInfo` is built directly rather than with
`dataset_info_from_configs`, which looks for metadata files beside the builder's module.

A config's name is the task plus a digest of everything that decides the data (options,
seq_len, split sizes, seed; the corpus fingerprint), so differently-configured datasets live side
by side in one data_dir and a second `build` with the same settings reuses the files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from train.data import byte_lm, tasks

VERSION = tfds.core.Version("1.0.0")


def default_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MEMZOO_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class _NoCodePath:
    """tfds 4.9.10 finds a builder's source via `importlib_resources` (a backport tfds does not
    install) for builders in a package; with no code path it only skips its checksums file,
    which a builder that downloads nothing never needs."""

    def __get__(self, obj, objtype=None):
        return None


def _vector(seq_len: int, dtype) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(seq_len,), dtype=dtype)


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
    task: str = ""
    seq_len: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    seed: int = 0

    @classmethod
    def make(cls, task: str, *, seq_len: int, sizes: dict[str, int], seed: int,
             **options) -> "TaskConfig":
        options = tasks.TASKS[task].options(options)
        settings = dict(task=task, seq_len=seq_len, options=options, sizes=sizes, seed=seed)
        return cls(name=f"{task}_{_digest(settings)}", version=VERSION,
                   description=json.dumps(settings, sort_keys=True), **settings)


class MemzooTasks(tfds.core.GeneratorBasedBuilder):
    """The synthetic memory tasks of `train.data.tasks`; example i of a split is
    `tasks.example(task, seed, split, i, ...)`, so the files equal the in-memory source."""

    VERSION = VERSION
    code_path = _NoCodePath()

    def _info(self) -> tfds.core.DatasetInfo:
        config: TaskConfig = self.builder_config
        t = config.seq_len
        if tasks.TASKS[config.task].num_classes is None:
            features = {"inputs": _vector(t, np.int32), "targets": _vector(t, np.int32),
                        "mask": _vector(t, np.float32)}
        else:
            features = {"inputs": _vector(t, np.int32), "mask": _vector(t, np.float32),
                        "label": tfds.features.Tensor(shape=(), dtype=np.int32)}
        # Keys are example indices; keeping their order makes record i be example i.
        return tfds.core.DatasetInfo(builder=self, description=config.description,
                                     features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        sizes = self.builder_config.sizes
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, num_examples: int):
        c: TaskConfig = self.builder_config
        for i in range(num_examples):
            yield i, tasks.example(c.task, c.seed, split, i, seq_len=c.seq_len, **c.options)


@dataclasses.dataclass(eq=False)
class BytesConfig(tfds.core.BuilderConfig):
    corpus: str = ""
    pattern: str = "**/*"
    seq_len: int = 0
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    document_separator: str | None = None
    seed: int = 0

    @classmethod
    def make(cls, corpus: str | os.PathLike | None, *, seq_len: int, seed: int,
             pattern: str | None = None, validation_fraction: float = 0.05,
             test_fraction: float = 0.05, document_separator: str | None = None) -> "BytesConfig":
        # fails early, naming a missing path
        corpus, pattern, files = byte_lm.resolve_corpus(corpus, pattern)
        settings = dict(corpus=str(corpus), pattern=pattern, seq_len=seq_len,
                        validation_fraction=validation_fraction, test_fraction=test_fraction,
                        document_separator=document_separator, seed=seed)
        name = f"bytes_{_digest({**settings, 'files': byte_lm.fingerprint(files)})}"
        return cls(name=name, version=VERSION, description=json.dumps(settings, sort_keys=True),
                   **settings)


class MemzooBytes(tfds.core.GeneratorBasedBuilder):
    """Byte-level LM rows packed from a text corpus (`train.data.byte_lm`)."""

    VERSION = VERSION
    code_path = _NoCodePath()

    def _info(self) -> tfds.core.DatasetInfo:
        t = self.builder_config.seq_len
        features = {"inputs": _vector(t, np.int32), "targets": _vector(t, np.int32),
                    "mask": _vector(t, np.float32), "segment_ids": _vector(t, np.int32)}
        # Rows keep the corpus order (the loader shuffles).
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                     features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        # tfds refuses to write an empty split; a split no document falls into is left out.
        return {split: self._generate_examples(split) for split in tasks.SPLITS
                if next(self._documents(split), None) is not None}

    def _documents(self, split: str):
        c: BytesConfig = self.builder_config
        files = byte_lm.corpus_files(c.corpus, c.pattern)
        sep = c.document_separator.encode() if c.document_separator else None
        return byte_lm.documents(files, split, seed=c.seed,
                                 validation_fraction=c.validation_fraction,
                                 test_fraction=c.test_fraction, document_separator=sep)

    def _generate_examples(self, split: str):
        yield from enumerate(byte_lm.pack(self._documents(split), self.builder_config.seq_len))


def prepare(builder_cls, config: tfds.core.BuilderConfig, data_dir: str | os.PathLike | None):
    """The builder for `config` in data_dir, generated there on first use."""
    data_dir = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the data directory {str(data_dir)!r}: {e}") from e
    if not os.access(data_dir, os.W_OK):
        raise PermissionError(f"the data directory {str(data_dir)!r} is not writable")
    builder = builder_cls(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()   # a no-op when the files are already there
    return builder
