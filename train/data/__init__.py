"""Training data: synthetic memory tasks, byte-level and subword LMs on a text corpus, tfds data.

One entry point, `build(task, *, split, batch_size, seq_len, seed, ...) -> (loader, info)`:

    loader, info = build("mqar", split="train", batch_size=64, seq_len=256, seed=0,
                         num_kv_pairs=16)
    batch = next(loader)   # {"inputs": int32 [64, 256], "targets": ..., "mask": float32 ...}
    state = loader.get_state()   # JSON-serialisable; put it in the checkpoint

Synthetic tasks and the byte corpus are written once as array_record files by tfds builders into
data_dir (default $MEMZOO_DATA_DIR or ~/tensorflow_datasets) and read back with
`tfds.data_source` (no TensorFlow); standard tfds datasets are read from data_dir when prepared
there. The "tokens" task reads a corpus tokenised by `python -m train.tokenize` (or tokenises
it into data_dir on first use). Layout: tasks.py (generators), byte_lm.py (corpus, packing),
tokens.py (tokenised corpora), builders.py (tfds builders), standard.py (lm1b, mnist, ...),
pipeline.py (grain loader), codec.py (text <-> ids of the text tasks).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from train.data import builders, byte_lm, standard, tasks
from train.data.pipeline import Loader, make_loader
from train.data.tasks import TASKS

__all__ = ["build", "example_layout", "DataInfo", "GeneratedSource", "KNOWN_TASKS", "Loader",
           "make_loader", "TASKS"]

KNOWN_TASKS = (*TASKS, "bytes", "tokens", *standard.ALIASES, "tfds:<name>")
DEFAULT_SIZES = {"train": 100_000, "validation": 2_000, "test": 2_000}


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the model and the loss need to know about the batches.

    loss "next_token": cross-entropy of logits at t against batch[target_key][:, t] weighted by
    batch[mask_key]; "classification": logits (pooled over batch[mask_key] == 1) against
    batch[target_key] of shape [batch]. segment_ids (when has_segment_ids) mark documents in
    packed rows: 1, 2, ... per document, 0 on padding; a recurrent state resets where it changes.
    """
    task: str
    split: str
    vocab_size: int
    num_classes: int | None
    seq_len: int
    loss: str
    target_key: str
    mask_key: str = "mask"
    has_segment_ids: bool = False
    num_examples: int = 0              # in this split, before sharding
    num_batches: int | None = None     # this shard will yield; None when endless
    chance_accuracy: float | None = None   # uniform guessing among the answers; None for LM
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


class GeneratedSource:
    """A synthetic split generated on demand: record i is tasks.example(task, seed, split, i).

    The same records the tfds builder writes, without touching disk (`build(materialize=False)`).
    """

    def __init__(self, task: str, *, split: str, size: int, seq_len: int, seed: int, **options):
        self.task, self.split, self.size, self.seq_len, self.seed = task, split, size, seq_len, seed
        self.options = options

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(index)
        return tasks.example(self.task, self.seed, self.split, index, seq_len=self.seq_len,
                             **self.options)


def _unknown(task: str) -> ValueError:
    return ValueError(f"unknown task {task!r}; known tasks: {', '.join(KNOWN_TASKS)}")


def build(task: str, *, split: str = "train", batch_size: int, seq_len: int | None, seed: int = 0,
          data_dir: str | os.PathLike | None = None, shard_index: int | None = None,
          shard_count: int | None = None, shuffle: bool | None = None,
          num_epochs: int | None | str = "auto", worker_count: int = 0, data_seed: int = 0,
          sizes: dict[str, int] | None = None, materialize: bool = True,
          shard_by: str = "records", **task_options) -> tuple[Loader, DataInfo]:
    """A loader of batches for `task` and what the training loop needs to know about them.

    seed orders the batches (shuffle); data_seed decides the synthetic examples and the byte
    corpus' document split, so runs with different seeds share one prepared dataset. shuffle
    defaults to split == "train"; num_epochs "auto" means forever for train and once otherwise.
    sizes ({"train": n, "validation": n, "test": n}, synthetic tasks) default to DEFAULT_SIZES.
    materialize=False serves synthetic tasks from memory instead of data_dir (same records).
    shard_by "records" | "rows": how processes split the data (pipeline.make_loader); "rows"
    makes the global batches independent of the process count.
    task_options go to the task: e.g. vocab_size, num_kv_pairs for "mqar"; corpus, pattern,
    validation_fraction, test_fraction, document_separator for "bytes"; dir (a tokenised
    corpus), or the settings to tokenise one with (tokens.TASK_OPTIONS: corpus, vocab_size,
    tokenizer, ...) for "tokens"; permutation_seed for "pmnist".
    """
    if split not in tasks.SPLITS:
        raise ValueError(f"split must be one of {tasks.SPLITS}, got {split!r}")
    if task in TASKS:
        if seq_len is None:
            raise ValueError(f"task {task!r} needs a seq_len")
        spec = TASKS[task]
        options = spec.options(task_options)
        sizes = {**DEFAULT_SIZES, **(sizes or {})}
        # One example now: bad options fail here with the task's message, not inside tfds.
        tasks.example(task, data_seed, split, 0, seq_len=seq_len, **options)
        if materialize:
            config = builders.TaskConfig.make(task, seq_len=seq_len, sizes=sizes, seed=data_seed,
                                              **options)
            source = _split_source(builders.prepare(builders.MemzooTasks, config, data_dir),
                                   split, task)
        else:
            source = GeneratedSource(task, split=split, size=sizes[split], seq_len=seq_len,
                                     seed=data_seed, **options)
        loss, transform = spec.loss, None
        vocab_size, num_classes = spec.vocab_size(options), spec.num_classes
        has_segment_ids, chance = False, spec.chance(options)
    elif task == "bytes":
        if seq_len is None:
            raise ValueError("task 'bytes' needs a seq_len")
        options = dict(task_options)
        config = builders.BytesConfig.make(options.pop("corpus", None), seq_len=seq_len,
                                           seed=data_seed, **options)
        source = _split_source(builders.prepare(builders.MemzooBytes, config, data_dir), split,
                               task)
        options = {"corpus": config.corpus, "pattern": config.pattern}
        loss, transform, vocab_size, num_classes = "next_token", None, byte_lm.VOCAB_SIZE, None
        has_segment_ids, chance = True, None
    elif task == "tokens":
        if seq_len is None:
            raise ValueError("task 'tokens' needs a seq_len")
        # Imported here: the tokenizers package is needed by this task alone.
        from train.data import tokens
        directory, meta = tokens.open_task(task_options, data_dir=data_dir or
                                           builders.default_data_dir(), seed=data_seed)
        if not meta["splits"][split]["documents"]:
            raise ValueError(f"task 'tokens' has no {split!r} documents in {str(directory)!r} "
                             "(a larger corpus or validation_fraction / test_fraction gives it "
                             "some)")
        source = tokens.PackedRows(directory, meta, split, seq_len)
        options = {"dir": str(directory.resolve())}
        loss, transform, vocab_size, num_classes = "next_token", None, meta["vocab_size"], None
        has_segment_ids, chance = True, None
    elif task in standard.ALIASES or task.startswith("tfds:"):
        name, permute = standard.ALIASES.get(task, (task.removeprefix("tfds:"), False))
        options = dict(task_options)
        unknown = set(options) - {"permutation_seed"}
        if unknown:
            raise ValueError(f"task {task!r} has no options {sorted(unknown)}")
        source = standard.load(name, split, data_dir or builders.default_data_dir())
        transform, loss, seq_len, num_classes = standard.sequence_transform(
            name, source, seq_len=seq_len, permute=permute, **options)
        vocab_size = byte_lm.VOCAB_SIZE if loss == "next_token" else 256
        has_segment_ids = loss == "next_token"
        chance = 1 / num_classes if num_classes else None
    else:
        raise _unknown(task)

    train = split == "train"
    loader = make_loader(source, batch_size=batch_size, seed=seed,
                         shuffle=train if shuffle is None else shuffle,
                         num_epochs=(None if train else 1) if num_epochs == "auto" else num_epochs,
                         shard_index=shard_index, shard_count=shard_count,
                         worker_count=worker_count, transform=transform, shard_by=shard_by)
    info = DataInfo(task=task, split=split, vocab_size=vocab_size, num_classes=num_classes,
                    seq_len=seq_len, loss=loss,
                    target_key="targets" if loss == "next_token" else "label",
                    has_segment_ids=has_segment_ids, num_examples=len(source),
                    num_batches=loader.num_batches, chance_accuracy=chance, options=options)
    return loader, info


def example_layout(task: str, *, seq_len: int | None, data_seed: int = 0,
                   **task_options) -> tuple[dict[str, np.ndarray], int, int | None]:
    """(one example's arrays, vocab_size, num_classes) for `task`, reading nothing from disk.

    What an ahead-of-time compile needs to know of the batches (train/compile_for.py): the keys,
    per-example shapes and dtypes come from the very code that makes real examples (the task's
    generator in memory; byte_lm.make_row for the byte-LM layout), so they cannot drift apart.
    "tokens" reads at most its dir's metadata (tokens.layout_vocab_size).
    """
    if task in TASKS:
        if seq_len is None:
            raise ValueError(f"task {task!r} needs a seq_len")
        options = TASKS[task].options(task_options)
        example = tasks.example(task, data_seed, "train", 0, seq_len=seq_len, **options)
        return dict(example), TASKS[task].vocab_size(options), TASKS[task].num_classes
    if task in ("bytes", "tokens") or standard.ALIASES.get(task, ("", False))[0] == "lm1b":
        if seq_len is None:
            raise ValueError(f"task {task!r} needs a seq_len")
        vocab_size = byte_lm.VOCAB_SIZE
        if task == "tokens":
            from train.data import tokens
            vocab_size = tokens.layout_vocab_size(task_options)
        row = byte_lm.make_row(np.zeros(seq_len + 1, np.int32), np.zeros(seq_len + 1, np.int64),
                               seq_len)
        return row, vocab_size, None
    if task in KNOWN_TASKS or task.startswith("tfds:"):
        raise ValueError(f"task {task!r}: its example layout comes from the prepared dataset's "
                         "features; only the synthetic tasks, 'bytes', 'tokens' and 'lm1b' are "
                         "known without reading data")
    raise _unknown(task)


def _split_source(builder, split: str, task: str):
    if split not in builder.info.splits:
        raise ValueError(f"task {task!r} has no {split!r} split in {builder.data_dir!r} (it is "
                         "empty: give it a size, or a larger corpus / fraction)")
    return builder.as_data_source(split=split)
