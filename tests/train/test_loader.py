"""The grain loader (train/data/pipeline.py) beyond test_data.py: row sharding (global batches
independent of the process count, what loader=synthetic serves) and worker processes
(worker_count > 0 yields worker_count=0's batches and resumes from a saved state)."""
import numpy as np
import pytest

from train.data import build
from train.input import build as input_build

OPTIONS = dict(task="mqar", seq_len=32, seed=3, vocab_size=64, num_kv_pairs=4,
               materialize=False)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _equal(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(xs, ys))


def test_rows_sharding_splits_the_global_batch():
    whole, info = build(split="train", batch_size=8, shard_index=0, shard_count=1,
                        shard_by="rows", **OPTIONS)
    parts = [build(split="train", batch_size=4, shard_index=i, shard_count=2, shard_by="rows",
                   **OPTIONS)[0] for i in range(2)]
    got = [{k: np.concatenate([a[k], b[k]]) for k in a}
           for a, b in zip(_take(parts[0], 3), _take(parts[1], 3))]
    assert _equal(got, _take(whole, 3))
    # finite splits: every shard steps the same number of times, the global count
    counts = [build(split="validation", batch_size=b, shard_index=i, shard_count=n,
                    shard_by="rows", sizes={"validation": 50}, **OPTIONS)[1].num_batches
              for b, i, n in ((8, 0, 1), (4, 0, 2), (4, 1, 2))]
    assert counts == [6, 6, 6]
    with pytest.raises(ValueError, match="shard_by must be 'records' or 'rows'"):
        build(split="train", batch_size=4, shard_by="row", **OPTIONS)


def test_synthetic_loader_is_the_data_package():
    """loader=synthetic is train.data's generator (no second copy), served by rows."""
    it, info = input_build("mqar", loader="synthetic", split="train", batch_size=4, seq_len=32,
                           seed=3, shard_index=1, shard_count=2, vocab_size=64, num_kv_pairs=4)
    ref, _ = build(split="train", batch_size=4, shard_index=1, shard_count=2, shard_by="rows",
                   **OPTIONS)
    assert _equal(_take(it, 2), _take(ref, 2))
    with pytest.raises(ValueError, match="serves the synthetic tasks"):
        input_build("bytes", loader="synthetic", split="train", batch_size=4, seq_len=32, seed=0)


def test_worker_processes_yield_the_same_batches_and_resume():
    """One grain worker process (each costs a Python start): the same batches as in-process,
    and a loader restored from a mid-stream state continues with the in-process batches."""
    kw = dict(split="train", batch_size=4, shard_index=0, shard_count=1, **OPTIONS)
    plain, _ = build(worker_count=0, **kw)
    expected = _take(plain, 5)
    workers, _ = build(worker_count=1, **kw)
    assert _equal(_take(workers, 3), expected[:3])
    state = workers.get_state()
    del workers
    resumed, _ = build(worker_count=1, **kw)
    resumed.set_state(state)
    assert _equal(_take(resumed, 2), expected[3:])
