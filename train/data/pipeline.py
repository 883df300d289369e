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


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which are unparsed outside `absl.app.run` (the
    first batch then fails with UnparsedFlagAccessError); their defaults are what we want."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


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
                drop_remainder: bool = True, shard_by: str = "records") -> Loader:
    """Batches of `source` (anything with __len__ and __getitem__ returning dicts).

    Sharding (shard_by="records"): shard i of n takes records i, i + n, i + 2n, ... of the first
    len - len % n records, so shards are disjoint, equally long (every process steps the same
    number of times), and together cover the data; defaults are this JAX process' index and the
    process count. Each shard is then shuffled (seed, per epoch) and repeated num_epochs times
    (None: forever). shard_by="rows": the whole source is shuffled and batched into global
    batches of n * batch_size, and shard i yields rows [i * batch_size, (i + 1) * batch_size) of
    each: a run's global batches do not depend on how many processes feed it (what equality
    tests across process counts need; every shard reads only its own rows).
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
    if shard_by not in ("records", "rows"):
        raise ValueError(f"make_loader: shard_by must be 'records' or 'rows', got {shard_by!r}")
    by_rows = shard_by == "rows"
    usable = len(source) - len(source) % shard_count
    ds = grain.MapDataset.source(source)
    if not by_rows:
        ds = ds[shard_index:usable:shard_count]
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
    if by_rows:
        # Global batch g is made of the consecutive sub-batches g n, ..., g n + n - 1; this shard
        # takes the i-th of each (lazily: the other rows are never made here).
        if drop_remainder:
            ds = ds[:len(ds) - len(ds) % shard_count]
        ds = ds[shard_index::shard_count]
    num_batches = None
    if num_epochs is not None:
        num_batches = len(ds)
    iter_ds = ds.to_iter_dataset()
    if worker_count > 0:
        _absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return Loader(iter_ds, num_batches)
