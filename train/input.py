"""Batches for the training loop: `train.data.build` with the loop's choice of loader.

`build(task, *, loader, split, batch_size, seq_len, seed, data_dir, shard_index, shard_count,
**task_options) -> (iterator, info)`; batches are dicts of numpy arrays, the iterator's
`get_state()` is JSON, `batch_size` is per process. The generators live in train/data/tasks.py
alone (one per task); this module only picks how they are served:

  loader "data": train.data as configured (prepared array_record files under data_dir for
      synthetic tasks when data_dir is given, else generated in memory; records split over
      processes).
  loader "auto": the same.
  loader "synthetic": a synthetic task generated in memory, split over processes by rows of
      the global batch: process i of n gets rows [i b, (i + 1) b) of a global batch of n b rows,
      so a run's global batches do not depend on how many processes feed it (what the
      1-process-vs-2-process equality test needs).
"""
from __future__ import annotations

LOADERS = ("auto", "synthetic", "data")


def build(task: str, *, loader: str = "auto", **kwargs):
    if loader not in LOADERS:
        raise ValueError(f"data.loader: expected one of {LOADERS}, got {loader!r}")
    from train import data
    if loader == "synthetic":
        if task not in data.TASKS:
            raise ValueError(f"data.loader=synthetic serves the synthetic tasks "
                             f"({', '.join(data.TASKS)}), not {task!r}; use data.loader=data")
        kwargs.pop("data_dir", None)
        return data.build(task, materialize=False, shard_by="rows", **kwargs)
    if kwargs.get("data_dir") is None and task in data.TASKS:
        # Synthetic tasks from memory: the same records, without preparing files on disk.
        kwargs["materialize"] = False
    return data.build(task, **kwargs)
