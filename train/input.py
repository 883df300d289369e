"""Batches for the training loop, behind the interface of `train.data.build`.

`build(task, *, split, batch_size, seq_len, seed, data_dir, shard_index, shard_count,
**task_options) -> (iterator, info)`. When the data package (train/data, tfds + grain) is
present it serves every task; until then this module's adapter serves the synthetic tasks of
train/tasks.py with the same contract: batches are dicts of numpy arrays, the iterator's
`get_state()` is JSON, `batch_size` is per process, and process `shard_index` of `shard_count`
gets rows [shard_index * b, (shard_index + 1) * b) of a global batch of b * shard_count rows, so
a run's global batches do not depend on how many processes feed it.
"""
from __future__ import annotations

import types

import numpy as np

from train.tasks import delayed_recall

_SPLIT_SALT = {"train": 0, "validation": 1, "test": 2}


def mqar(rng: np.random.Generator, batch_size: int, seq_len: int, vocab_size: int,
         num_kv_pairs: int):
    """Key-value pairs k1 v1 k2 v2 ... then queries of those keys; target of a query is its value.

    Keys come from the lower half of the vocabulary, values from the upper half; every query
    position is unmasked and the rest masked, so accuracy is recall accuracy.
    """
    half = vocab_size // 2
    if num_kv_pairs > half or 2 * num_kv_pairs + num_kv_pairs > seq_len:
        raise ValueError(f"mqar: num_kv_pairs={num_kv_pairs} does not fit vocab_size={vocab_size}"
                         f" / seq_len={seq_len}")
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len), dtype=np.int32)
    targets = np.zeros_like(tokens)
    mask = np.zeros((batch_size, seq_len), np.float32)
    for i in range(batch_size):
        keys = rng.choice(half, num_kv_pairs, replace=False)
        values = rng.integers(half, vocab_size, num_kv_pairs)
        tokens[i, 0:2 * num_kv_pairs:2], tokens[i, 1:2 * num_kv_pairs:2] = keys, values
        positions = rng.choice(np.arange(2 * num_kv_pairs, seq_len), num_kv_pairs, replace=False)
        order = rng.permutation(num_kv_pairs)
        tokens[i, positions] = keys[order]
        targets[i, positions] = values[order]
        mask[i, positions] = 1.0
    return tokens, targets, mask


_TASKS = {"delayed_recall": delayed_recall, "mqar": mqar}


class SyntheticIterator:
    """Batch i is a pure function of (seed, split, i): the state is just i."""

    def __init__(self, task, *, split, batch_size, seq_len, seed, shard_index, shard_count,
                 options):
        self.task, self.split, self.seq_len = task, split, seq_len
        self.batch_size = batch_size * shard_count  # the global batch this shard is a slice of
        self.seed, self.options, self.index = seed, options, 0
        self.rows = slice(shard_index * batch_size, (shard_index + 1) * batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, _SPLIT_SALT.get(self.split, 3), self.index])
        self.index += 1
        tokens, targets, mask = _TASKS[self.task](rng, self.batch_size, self.seq_len,
                                                  **self.options)
        return {"inputs": tokens[self.rows], "targets": targets[self.rows],
                "mask": mask[self.rows]}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def _synthetic(task, *, split, batch_size, seq_len, seed, data_dir=None, shard_index=None,
               shard_count=None, **task_options):
    del data_dir
    if task not in _TASKS:
        raise ValueError(f"data: unknown task {task!r}; known: {', '.join(_TASKS)}")
    it = SyntheticIterator(task, split=split, batch_size=batch_size, seq_len=seq_len, seed=seed,
                           shard_index=shard_index or 0, shard_count=shard_count or 1,
                           options=task_options)
    info = types.SimpleNamespace(task=task, split=split, vocab_size=task_options["vocab_size"],
                                 num_classes=None, seq_len=seq_len, loss="next_token",
                                 target_key="targets")
    return it, info


def build(task: str, *, loader: str = "auto", **kwargs):
    """loader "auto": train.data when importable, else this adapter; "synthetic": this adapter
    (batches independent of the process count: what multi-process equality tests need);
    "data": train.data, required."""
    if loader not in ("auto", "synthetic", "data"):
        raise ValueError(f"data.loader: expected 'auto', 'synthetic' or 'data', got {loader!r}")
    data_package = None
    if loader != "synthetic":
        try:
            from train import data as data_package  # tfds + grain, when it has landed
        except ImportError:
            if loader == "data":
                raise
    if data_package is not None and hasattr(data_package, "build"):
        if kwargs.get("data_dir") is None and task in getattr(data_package, "TASKS", ()):
            # Synthetic tasks from memory: the same records, without preparing files on disk.
            kwargs["materialize"] = False
        return data_package.build(task, **kwargs)
    return _synthetic(task, **kwargs)
