"""grain pipelines: random-access source -> shard -> shuffle -> epochs -> batches, resumable.

Order is a pure function of (seed, epoch, index): grain's `MapDataset.shuffle` permutes each epoch
with its own seed (seed + epoch) without materialising anything, so an iterator's whole state is
a position, and a restored iterator yields exactly what an uninterrupted one would.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np


def _as_numpy(example: dict[str, Any]) -> dict[str, np.ndarray]:
    # Sources hand back scalars as Python ints (int64 once in numpy) and texts as str/bytes;
    # batches promise int32 integers.
    out = {}
    for k, v in example.items():
        if not isinstance(v, (str, bytes)):
            v = np.asarray(v)
            if v.dtype.kind in "iu" and v.dtype.itemsize > 4:
                v = v.astype(np.int32)
        out[k] = v
    return out


class Loader:
    """An iterator over batches (dicts of numpy arrays [batch, ...]) with a checkpointable state.

    `get_state()` is a JSON-serialisable dict; `set_state(state)` on a loader made with the same
    arguments continues exactly where the saved one stopped.
    """

    def __init__(self, dataset: grain.IterDataset, num_batches: int | None):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self.num_batches = num_batches   # per epoch * epochs on this shard; None when endless

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        # A JSON round trip now, so a state that a checkpoint cannot hold fails here, not later.
        return json.loads(json.dumps(self._iterator.get_state()))

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)


def make_loader(source: Sequence[dict[str, Any]], *, batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None,
                shard_index: int | None = None, shard_count: int | None = None,
                worker_count: int = 0, transform: Callable[[dict], dict] | None = None,
                drop_remainder: bool = True) -> Loader:
    """Batches of `source` (anything with __len__ and __getitem__ returning dicts).

    Sharding: shard i of n takes records i, i + n, i + 2n, ... of the first len - len % n records,
    so shards are disjoint, equally long (every process steps the same number of times), and
    together cover the data; defaults are this JAX process' index and the process count. Each
    shard is then shuffled (seed, per epoch) and repeated num_epochs times (None: forever).
    `transform` maps each example before batching. worker_count > 0 runs the pipeline in that many
    processes (the source and transform must be picklable).
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"make_loader needs 0 <= shard_index < shard_count, got {shard_index=}, "
                         f"{shard_count=}")
    if batch_size < 1:
        raise ValueError(f"make_loader needs batch_size >= 1, got {batch_size}")
    usable = len(source) - len(source) % shard_count
    ds = grain.MapDataset.source(source)[shard_index:usable:shard_count]
    per_epoch = len(ds)
    if per_epoch == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} is empty: the source has only "
                         f"{len(source)} records")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(_as_numpy)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    num_batches = None
    if num_epochs is not None:
        total = per_epoch * num_epochs
        num_batches = total // batch_size if drop_remainder else -(-total // batch_size)
    iter_ds = ds.to_iter_dataset()
    if worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return Loader(iter_ds, num_batches)
