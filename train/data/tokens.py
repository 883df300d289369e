"""Subword language modelling: a corpus tokenised once into array_record shards, packed when read.

`prepare(output, plan(...))` (the command line is `python -m train.tokenize`, train/tokenize.py)
trains a byte-level BPE tokenizer on the corpus' training documents (or takes the user's
tokenizer.json), tokenises every document once, in parallel over groups of files, and writes:

    tokenizer.json                      the tokenizer the ids belong to
    {split}-{i:05d}-of-{n:05d}.array_record
                                        one record per document of group i: its ids as
                                        little-endian `dtype` (no BOS / EOS), in corpus order; a
                                        group with no document of a split writes no file for it
    {split}.lengths.npy                 int32 ids per document, in record order
    metadata.json                       written last: vocab size, special ids, dtype, per split
                                        the files (records, bytes on disk) and the counts of
                                        documents / tokens / UTF-8 bytes, the settings and the
                                        fingerprint

Documents, their split (`byte_lm.split_of` of the path) and their order are the byte LM's
(`byte_lm.split_documents`), so a tokenised and a byte-level run on one corpus hold out the same
documents. The directory is built under a temporary name beside the output and renamed into
place, so an output either is complete or does not exist; the fingerprint (the corpus' file
list and sizes, and every setting that changes the ids) tells a stale output from a current one.

Reading (`train.data.build("tokens")`): `PackedRows` is a random-access source of the byte LM's
rows (`byte_lm.make_row`: inputs, targets, mask, segment_ids) over the stream [BOS] doc_0 [EOS]
[BOS] doc_1 [EOS] ...: row r reads only the documents that overlap stream[r T : r T + T + 1]
(found by prefix sums of the lengths), so grain shuffles, shards and resumes rows like any other
source, and the rows equal `byte_lm.pack_ids` over the same documents.

Text: documents are decoded as UTF-8 (an invalid sequence becomes U+FFFD, counted in
documents_not_utf8) and special tokens are never matched inside text (`encode_special_tokens`),
so a document containing "<|eos|>" is tokenised as those characters. Each document's ids are
checked to stand for exactly its UTF-8 bytes (`token_bytes`, the figure bits per byte divides
by); a tokenizer that normalises text or adds a prefix space fails that check, by name.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from train.data import byte_lm
from train.data.codec import Codec

FORMAT, VERSION = "memzoo-tokens", 1
METADATA, TOKENIZER = "metadata.json", "tokenizer.json"
SPLITS = ("train", "validation", "test")
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 256 + 3          # every byte, then PAD / BOS / EOS
DEFAULT_SAMPLE_MB = 256           # training text for the BPE merges; enough for 32k merges
# build("tokens") options; every one but dir (and workers, which do not change the ids) is a
# setting of `plan`
TASK_OPTIONS = ("dir", "corpus", "pattern", "tokenizer", "vocab_size", "min_frequency",
                "tokenizer_sample_mb", "validation_fraction", "test_fraction",
                "document_separator", "pad_token", "bos_token", "eos_token", "workers",
                "num_shards")
# how many documents / bytes a worker hands the tokenizer at once (Rust threads split a batch)
_BATCH_DOCS, _BATCH_BYTES = 512, 8 << 20


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_sha1(path: pathlib.Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The tokenizer


def new_tokenizer() -> tokenizers.Tokenizer:
    """An untrained byte-level BPE: no normaliser and no prefix space, so ids decode to exactly
    the text they came from."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterator[str], *, vocab_size: int, min_frequency: int = 2,
                    specials: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
                    ) -> tokenizers.Tokenizer:
    """A byte-level BPE of vocab_size ids trained on texts: the specials (ids 0, 1, ...), the 256
    byte symbols, then merges (fewer when the text has no more pairs seen min_frequency times)."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(specials), show_progress=False,
                                  # every byte, seen or not: no text is ever out of vocabulary
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer.from_file(os.fspath(path))
    # Text that spells a special token is text: a document never yields BOS / EOS / PAD ids.
    tok.encode_special_tokens = True
    return tok


def _is_byte_level(tok: tokenizers.Tokenizer) -> bool:
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def token_bytes(tok: tokenizers.Tokenizer, *, what: str = "the tokenizer") -> np.ndarray:
    """int32 [vocab]: the UTF-8 bytes each id stands for (0 for special tokens).

    A byte-level BPE spells every byte as one symbol of a 256-symbol alphabet, so a vocabulary
    entry's byte count is its length in symbols; an added (non-special) token is matched in raw
    text and stands for its own UTF-8. ValueError for a tokenizer that is not byte-level (its ids
    would not map to exact bytes, and bits per byte would be wrong)."""
    if not _is_byte_level(tok):
        raise ValueError(f"{what} is not a byte-level BPE (its decoder is not ByteLevel): a "
                         "token's exact UTF-8 bytes, which bits per byte needs, are only known "
                         "for byte-level tokenizers")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    out = np.zeros(max(vocab.values()) + 1, np.int32)
    for token, i in vocab.items():
        if i in added:
            out[i] = 0 if added[i].special else len(added[i].content.encode())
        elif set(token) <= alphabet:
            out[i] = len(token)
        else:
            raise ValueError(f"{what}: vocabulary entry {i} ({token!r}) is not spelled in the "
                             "byte-level alphabet, so its bytes are unknown")
    return out


def special_ids(tok: tokenizers.Tokenizer, names: dict[str, str]) -> dict[str, int]:
    """{"pad": id, "bos": id, "eos": id} of the named tokens (added as special tokens when the
    tokenizer lacks them: a user's tokenizer keeps its ids, the specials go after them)."""
    missing = [t for t in dict.fromkeys(names.values()) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in missing])
    ids = {role: tok.token_to_id(t) for role, t in names.items()}
    # An existing ordinary token named as a special would have a byte count and appear in text.
    added = tok.get_added_tokens_decoder()
    for role, i in ids.items():
        if i not in added or not added[i].special:
            raise ValueError(f"{role}_token {names[role]!r} is an ordinary token of the tokenizer "
                             f"(id {i}), not a special one; name a special token or a new one")
    return ids


# ---------------------------------------------------------------------------------------------
# What to build


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated request: the corpus, the settings that decide the ids, their fingerprint."""
    settings: dict[str, Any]
    files: tuple[pathlib.Path, ...]
    corpus_fingerprint: str
    fingerprint: str
    tokenizer: pathlib.Path | None      # the user's tokenizer.json; None: train one
    total_bytes: int

    @property
    def separator(self) -> bytes | None:
        sep = self.settings["document_separator"]
        return sep.encode() if sep else None

    def split_args(self) -> dict[str, Any]:
        s = self.settings
        return dict(seed=s["seed"], validation_fraction=s["validation_fraction"],
                    test_fraction=s["test_fraction"], document_separator=self.separator)

    def special_names(self) -> dict[str, str]:
        s = self.settings
        return {"pad": s["pad_token"], "bos": s["bos_token"], "eos": s["eos_token"]}


def plan(*, corpus: str | os.PathLike | None = None, pattern: str | None = None,
         tokenizer: str | os.PathLike | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
         min_frequency: int = 2, tokenizer_sample_mb: float = DEFAULT_SAMPLE_MB, seed: int = 0,
         validation_fraction: float = 0.05, test_fraction: float = 0.05,
         document_separator: str | None = None, pad_token: str = PAD_TOKEN,
         bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
         arg_prefix: str = "--") -> Plan:
    """Check the arguments and list the corpus (file names and sizes; nothing is read).

    Errors name the argument as `arg_prefix + name` (the command line's --vocab_size, or a
    config's data.task_options.vocab_size).
    """
    def bad(name: str, expected: str, value) -> ValueError:
        return ValueError(f"{arg_prefix}{name}: expected {expected}, got {value!r}")

    def integer(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    for name, value in (("validation_fraction", validation_fraction),
                        ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise bad(name, "a number in [0, 1)", value)
    if validation_fraction + test_fraction >= 1:
        raise bad("test_fraction", f"validation_fraction + test_fraction < 1 (no training "
                  f"documents otherwise; validation_fraction is {validation_fraction})",
                  test_fraction)
    if not integer(seed):
        raise bad("seed", "an integer", seed)
    for name, value in (("pad_token", pad_token), ("bos_token", bos_token),
                        ("eos_token", eos_token)):
        if not isinstance(value, str) or not value:
            raise bad(name, "a non-empty token string", value)
    if document_separator is not None and (not isinstance(document_separator, str)
                                           or not document_separator):
        raise bad("document_separator", "a non-empty string or None", document_separator)
    tokenizer_path = None
    if tokenizer is not None:
        tokenizer_path = pathlib.Path(tokenizer).expanduser().resolve()
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{arg_prefix}tokenizer: no such file {str(tokenizer_path)!r} "
                                    "(a Hugging Face tokenizer.json)")
    else:
        if not integer(vocab_size) or vocab_size < MIN_VOCAB_SIZE:
            raise bad("vocab_size", f"an integer >= {MIN_VOCAB_SIZE} (256 byte symbols + the pad, "
                      "bos and eos tokens)", vocab_size)
        if not integer(min_frequency) or min_frequency < 1:
            raise bad("min_frequency", "an integer >= 1", min_frequency)
        if not isinstance(tokenizer_sample_mb, (int, float)) or tokenizer_sample_mb <= 0:
            raise bad("tokenizer_sample_mb", "a number > 0", tokenizer_sample_mb)
    try:
        root, pattern, files = byte_lm.resolve_corpus(corpus, pattern)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{arg_prefix}corpus: {e}") from None
    sizes = [f.stat().st_size for f in files]
    if not any(sizes):
        raise ValueError(f"{arg_prefix}corpus: every file matching {pattern!r} under "
                         f"{str(root)!r} is empty")
    settings = dict(corpus=str(root), pattern=pattern, seed=int(seed),
                    validation_fraction=validation_fraction, test_fraction=test_fraction,
                    document_separator=document_separator, pad_token=pad_token,
                    bos_token=bos_token, eos_token=eos_token)
    if tokenizer_path is None:
        settings.update(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                        tokenizer_sample_mb=tokenizer_sample_mb, tokenizer=None)
    else:
        # The file's content, not its path, decides the ids.
        settings.update(tokenizer=str(tokenizer_path),
                        tokenizer_sha1=_file_sha1(tokenizer_path))
    corpus_fp = byte_lm.fingerprint(files)
    identity = {k: v for k, v in settings.items() if k != "tokenizer"}
    return Plan(settings=settings, files=tuple(files), corpus_fingerprint=corpus_fp,
                fingerprint=_digest({**identity, "format": VERSION, "corpus_files": corpus_fp}),
                tokenizer=tokenizer_path, total_bytes=sum(sizes))


def groups_of(files: tuple[pathlib.Path, ...], num_shards: int) -> list[list[pathlib.Path]]:
    """Contiguous runs of files with about equal bytes (at most num_shards): shard i holds the
    documents of run i, so the corpus order survives and no worker gets most of the text."""
    sizes = np.array([f.stat().st_size for f in files], np.float64)
    cum = np.cumsum(sizes)
    total = max(cum[-1], 1.0)
    cuts = np.searchsorted(cum, total * np.arange(1, num_shards) / num_shards, side="left") + 1
    bounds = sorted({0, len(files), *(int(c) for c in cuts if 0 < c < len(files))})
    return [list(files[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def default_num_shards(p: Plan) -> int:
    # 16 runs give a few workers even shares and a progress line; big corpora ~256 MB a shard.
    return max(1, min(len(p.files), max(16, math.ceil(p.total_bytes / (256 << 20)))))


# ---------------------------------------------------------------------------------------------
# Tokenising


@dataclasses.dataclass(frozen=True)
class _Job:
    index: int
    count: int
    files: tuple[str, ...]
    out_dir: str
    tokenizer_file: str
    split_args: dict[str, Any]
    dtype: str
    token_bytes: np.ndarray
    what: str                      # the tokenizer, as errors name it


def _shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def _tokenize_group(job: _Job, report: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Tokenise one run of files into its shard of each split; per split: the file (None when
    no document of the split is there), records, per-document lengths, tokens, bytes."""
    from array_record.python import array_record_module

    tok = load_tokenizer(job.tokenizer_file)
    stored = np.dtype(job.dtype).newbyteorder("<")
    writers: dict[str, Any] = {}
    out = {s: {"file": None, "lengths": [], "tokens": 0, "bytes": 0, "not_utf8": 0}
           for s in SPLITS}
    pending: list[tuple[str, str, int]] = []      # (split, text, its UTF-8 bytes)

    def flush():
        if not pending:
            return
        encodings = tok.encode_batch_fast([text for _, text, _ in pending],
                                          add_special_tokens=False)
        for (split, text, nbytes), enc in zip(pending, encodings):
            ids = np.asarray(enc.ids, np.int64)
            got = int(job.token_bytes[ids].sum())
            if got != nbytes:
                raise ValueError(
                    f"{job.what} does not reproduce the text byte for byte: a document of "
                    f"{nbytes} UTF-8 bytes came back as ids standing for {got} bytes (starting "
                    f"{text[:40]!r}); bits per byte would be wrong (a normaliser or a prefix "
                    "space changes the text)")
            if split not in writers:
                name = _shard_name(split, job.index, job.count)
                # group_size 1: each document is its own compressed chunk, read alone.
                writers[split] = array_record_module.ArrayRecordWriter(
                    os.path.join(job.out_dir, name), "group_size:1,zstd:3")
                out[split]["file"] = name
            writers[split].write(ids.astype(stored).tobytes())
            o = out[split]
            o["lengths"].append(ids.size)
            o["tokens"] += ids.size
            o["bytes"] += nbytes
        pending.clear()

    buffered = 0
    files = [pathlib.Path(f) for f in job.files]
    try:
        for f in files:
            for split, doc in byte_lm.split_documents([f], **job.split_args):
                try:
                    text, nbytes = doc.decode("utf-8"), len(doc)
                except UnicodeDecodeError:
                    # The ids stand for the text with U+FFFD in place of each bad sequence.
                    text = doc.decode("utf-8", "replace")
                    nbytes = len(text.encode("utf-8"))
                    out[split]["not_utf8"] += 1
                pending.append((split, text, nbytes))
                buffered += nbytes
                if len(pending) >= _BATCH_DOCS or buffered >= _BATCH_BYTES:
                    flush()
                    buffered = 0
            if report is not None:
                report(f.stat().st_size)
        flush()
    finally:
        for w in writers.values():
            w.close()
    for s in SPLITS:
        o = out[s]
        o["lengths"] = np.asarray(o["lengths"], np.int32)
        o["records"] = int(o["lengths"].size)
        o["size"] = os.path.getsize(os.path.join(job.out_dir, o["file"])) if o["file"] else 0
    return out


def _init_worker(threads: int) -> None:
    # The tokenizer's Rust threads, per worker: workers x threads stays near the core count.
    os.environ["RAYON_NUM_THREADS"] = str(threads)


class _Progress:
    """A plain-text progress line on stderr: redrawn in place on a terminal, else a line every
    10% (logs stay short)."""

    def __init__(self, what: str, total: int, enabled: bool):
        self.what, self.total, self.enabled = what, max(total, 1), enabled
        self.done, self.t0, self.last = 0, time.perf_counter(), -1
        self.tty = enabled and sys.stderr.isatty()

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        tenth = int(frac * 10)
        if not self.tty and tenth == self.last and frac < 1:
            return
        self.last = tenth
        dt = time.perf_counter() - self.t0
        rate = self.done / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        line = (f"{self.what}: {100 * frac:5.1f}%  {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
                f"  {rate / 1e6:.1f} MB/s  ETA {eta:.0f} s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def _sample_texts(p: Plan, sample_bytes: int) -> Iterator[str]:
    """Training documents for the BPE merges: every k-th file (k spreads about sample_bytes over
    the whole corpus, not its first directories), up to sample_bytes."""
    stride = max(1, math.ceil(p.total_bytes / sample_bytes))
    taken = 0
    for split, doc in byte_lm.split_documents(list(p.files[::stride]), **p.split_args()):
        if split == "train":
            yield doc.decode("utf-8", "replace")
            taken += len(doc)
            if taken >= sample_bytes:
                return


def _say(progress: bool, *args) -> None:
    if progress:
        print(*args, file=sys.stderr, flush=True)


def prepare(output: str | os.PathLike, p: Plan, *, workers: int | None = None,
            num_shards: int | None = None, overwrite: bool = False, progress: bool = True,
            arg_prefix: str = "--") -> pathlib.Path:
    """Tokenise the planned corpus into `output` (module docstring), or reuse it when it already
    holds this plan's output. An output of other settings or another corpus is an error unless
    overwrite; so is a directory that is not a tokenised corpus (but an empty one is used)."""
    output = pathlib.Path(output).expanduser().resolve()
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{arg_prefix}workers: expected an integer >= 1, got {workers!r}")
    if num_shards is not None and (not isinstance(num_shards, int) or num_shards < 1):
        raise ValueError(f"{arg_prefix}num_shards: expected an integer >= 1, got {num_shards!r}")
    if output.exists() and not overwrite:
        if not output.is_dir():
            raise FileExistsError(f"{arg_prefix}output: {str(output)!r} is a file")
        if (output / METADATA).is_file():
            meta = load_metadata(output, arg=f"{arg_prefix}output")
            if meta["fingerprint"] == p.fingerprint:
                _say(progress, f"tokenised corpus {output} is up to date (fingerprint "
                     f"{p.fingerprint})")
                return output
            raise ValueError(_stale_message(output, meta, p, f"{arg_prefix}output",
                                            "pass --overwrite to replace it" if arg_prefix == "--"
                                            else "delete it, or name another dir"))
        if any(output.iterdir()):
            raise FileExistsError(f"{arg_prefix}output: {str(output)!r} exists and is not a "
                                  f"tokenised corpus (no {METADATA}); choose another directory"
                                  + (" or pass --overwrite" if arg_prefix == "--" else ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    tmp.chmod(0o755)   # mkdtemp's 0o700 would hide a shared data_dir's output from other users
    try:
        meta = _write(tmp, p, workers=workers, num_shards=num_shards, progress=progress,
                      arg_prefix=arg_prefix)
        _publish(tmp, output, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"tokenised corpus written to {output}: " + ", ".join(
        f"{s} {meta['splits'][s]['documents']} documents / {meta['splits'][s]['tokens']:,} "
        f"tokens" for s in SPLITS))
    return output


def _publish(tmp: pathlib.Path, output: pathlib.Path, *, overwrite: bool) -> None:
    """Rename the finished directory into place; a concurrent writer of the same plan (several
    hosts preparing one shared data_dir) may have got there first, which is as good."""
    old = None
    if output.exists() and overwrite:
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    elif output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    try:
        tmp.rename(output)
    except OSError:
        if not (output / METADATA).is_file():
            raise
        ours = json.loads((tmp / METADATA).read_text())["fingerprint"]
        theirs = json.loads((output / METADATA).read_text())["fingerprint"]
        if ours != theirs:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write(tmp: pathlib.Path, p: Plan, *, workers: int, num_shards: int | None,
           progress: bool, arg_prefix: str) -> dict:
    s = p.settings
    t0 = time.perf_counter()
    if p.tokenizer is None:
        sample = int(s["tokenizer_sample_mb"] * (1 << 20))
        _say(progress, f"training a {s['vocab_size']}-id byte-level BPE on up to "
             f"{min(sample, p.total_bytes) / 1e6:.1f} MB of the training documents of "
             f"{s['corpus']} ({s['pattern']})")
        tok = train_tokenizer(_sample_texts(p, sample), vocab_size=s["vocab_size"],
                              min_frequency=s["min_frequency"],
                              specials=tuple(dict.fromkeys(p.special_names().values())))
        what = "the trained tokenizer"
        _say(progress, f"trained in {time.perf_counter() - t0:.1f} s: {tok.get_vocab_size()} ids")
    else:
        tok = load_tokenizer(p.tokenizer)
        what = f"{arg_prefix}tokenizer {str(p.tokenizer)!r}"
    ids = special_ids(tok, p.special_names())
    tb = token_bytes(tok, what=what)
    tok.save(str(tmp / TOKENIZER))
    vocab_size = int(tb.size)
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"

    groups = groups_of(p.files, num_shards or default_num_shards(p))
    jobs = [_Job(index=i, count=len(groups), files=tuple(map(str, g)), out_dir=str(tmp),
                 tokenizer_file=str(tmp / TOKENIZER), split_args=p.split_args(), dtype=dtype,
                 token_bytes=tb, what=what) for i, g in enumerate(groups)]
    bar = _Progress("tokenise", p.total_bytes, progress)
    workers = min(workers, len(jobs))
    if workers == 1:
        results = [_tokenize_group(job, bar) for job in jobs]
    else:
        results = [None] * len(jobs)
        # spawn, not fork: the parent may hold JAX's and the tokenizer's threads.
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(max(1, (os.cpu_count() or 1) // workers),))
        with pool:
            futures = {pool.submit(_tokenize_group, job): job for job in jobs}
            try:
                for future in concurrent.futures.as_completed(futures):
                    job = futures[future]
                    results[job.index] = future.result()
                    bar(sum(os.path.getsize(f) for f in job.files))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()

    splits = {}
    for split in SPLITS:
        parts = [r[split] for r in results]
        lengths = np.concatenate([r["lengths"] for r in parts]).astype(np.int32)
        np.save(tmp / f"{split}.lengths.npy", lengths)
        splits[split] = {
            "documents": int(lengths.size), "tokens": int(sum(r["tokens"] for r in parts)),
            "bytes": int(sum(r["bytes"] for r in parts)),
            "documents_not_utf8": int(sum(r["not_utf8"] for r in parts)),
            "files": [{"name": r["file"], "records": r["records"], "size": r["size"]}
                      for r in parts if r["file"]],
            "lengths": f"{split}.lengths.npy"}
    if not splits["train"]["documents"]:
        raise ValueError("no document of the corpus falls in the train split (too few documents "
                         "for validation_fraction / test_fraction, or every one is empty)")
    meta = {
        "format": FORMAT, "version": VERSION, "fingerprint": p.fingerprint,
        "corpus_fingerprint": p.corpus_fingerprint, "settings": s,
        "tokenizer": {"file": TOKENIZER, "sha1": _file_sha1(tmp / TOKENIZER),
                      "trained": p.tokenizer is None},
        "vocab_size": vocab_size, "special_ids": ids, "dtype": dtype, "splits": splits,
        "seconds": round(time.perf_counter() - t0, 3), "workers": workers,
        "num_shards": len(groups)}
    # Written last: its presence means every other file is complete.
    (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# Reading


def _stale_message(directory: pathlib.Path, meta: dict, p: Plan, arg: str, fix: str) -> str:
    old = meta.get("settings", {})
    changed = sorted(k for k in set(old) | set(p.settings)
                     if k != "tokenizer" and old.get(k) != p.settings.get(k))
    if meta.get("corpus_fingerprint") != p.corpus_fingerprint:
        changed.append("the corpus files (added, removed or resized)")
    return (f"{arg}: {str(directory)!r} holds a tokenised corpus of other settings (fingerprint "
            f"{meta.get('fingerprint')}, wanted {p.fingerprint}; differs in: "
            f"{', '.join(changed) or 'the format'}); {fix}")


def load_metadata(directory: str | os.PathLike, *, arg: str = "dir") -> dict:
    """The metadata of a complete tokenised corpus; FileNotFoundError / ValueError naming `arg`
    and the directory when it is missing, partial or damaged."""
    directory = pathlib.Path(directory).expanduser()
    remedy = f"(re)make it with `python -m train.tokenize --output {directory}`"
    if not directory.is_dir():
        raise FileNotFoundError(f"{arg}: {str(directory)!r} does not exist; {remedy}")
    path = directory / METADATA
    if not path.is_file():
        raise ValueError(f"{arg}: {str(directory)!r} is not a complete tokenised corpus (no "
                         f"{METADATA}); {remedy}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{arg}: {str(path)!r} is damaged ({e}); {remedy}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{arg}: {str(path)!r} is not a {FORMAT} v{VERSION} metadata file; "
                         f"{remedy}")
    problems = []
    if not (directory / meta["tokenizer"]["file"]).is_file():
        problems.append(meta["tokenizer"]["file"])
    for split, info in meta["splits"].items():
        for f in info["files"]:
            file = directory / f["name"]
            if not file.is_file() or file.stat().st_size != f["size"]:
                problems.append(f["name"])
        if not (directory / info["lengths"]).is_file():
            problems.append(info["lengths"])
    if problems:
        raise ValueError(f"{arg}: {str(directory)!r} is damaged: missing or resized "
                         f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}; "
                         f"{remedy} --overwrite")
    return meta


class PackedRows:
    """Rows of `seq_len` tokens in the byte-LM layout over one split of a tokenised corpus, by
    index (module docstring); picklable for grain's worker processes (files open lazily)."""

    def __init__(self, directory: str | os.PathLike, meta: dict, split: str, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        directory = pathlib.Path(directory)
        info = meta["splits"][split]
        self.paths = [str(directory / f["name"]) for f in info["files"]]
        self.lengths = np.load(directory / info["lengths"])
        self.seq_len = seq_len
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        ids = meta["special_ids"]
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]
        # ends[j]: the stream position just past document j's EOS
        self._ends = np.cumsum(self.lengths.astype(np.int64) + 2)
        self.stream_len = int(self._ends[-1]) if self._ends.size else 0
        self._len = byte_lm.num_rows(self.stream_len, seq_len)
        self._records = None

    def __getstate__(self):
        return {**self.__dict__, "_records": None}

    def __len__(self) -> int:
        return self._len

    def document(self, j: int) -> np.ndarray:
        if self._records is None:
            import grain
            self._records = grain.sources.ArrayRecordDataSource(self.paths)
        return np.frombuffer(self._records[j], self.dtype)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(index)
        start = index * self.seq_len
        stop = min(start + self.seq_len + 1, self.stream_len)
        first = int(np.searchsorted(self._ends, start, side="right"))
        last = int(np.searchsorted(self._ends, stop - 1, side="right"))
        docs = range(first, last + 1)
        tok = np.concatenate([np.concatenate([[self.bos], self.document(j), [self.eos]])
                              for j in docs]).astype(np.int32)
        ids = np.concatenate([np.full(self.lengths[j] + 2, j, np.int64) for j in docs])
        offset = start - (int(self._ends[first]) - int(self.lengths[first]) - 2)
        span = slice(offset, offset + stop - start)
        return byte_lm.padded_row(tok[span], ids[span], self.seq_len, pad=self.pad)


def _given(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("dir", "workers", "num_shards")}


def auto_dir(data_dir: str | os.PathLike, p: Plan) -> pathlib.Path:
    """Where build("tokens") keeps a corpus it tokenised itself: one directory per fingerprint,
    so other settings or an edited corpus never reuse stale ids."""
    return pathlib.Path(data_dir).expanduser() / "memzoo_tokens" / f"tokens_{p.fingerprint}"


def open_task(options: dict, *, data_dir: str | os.PathLike, seed: int,
              arg_prefix: str = "data.task_options.", progress: bool = True
              ) -> tuple[pathlib.Path, dict]:
    """(directory, metadata) for build("tokens", **options), tokenising on first use.

    dir given and present: used as is (when corpus settings are given too, they must be the
    ones it was made from). dir given and missing, or no dir (then data_dir/memzoo_tokens/
    tokens_<fingerprint>): the corpus settings (default: the standard library, data_seed
    splitting it) are tokenised there once.
    """
    unknown = sorted(set(options) - set(TASK_OPTIONS))
    if unknown:
        raise ValueError(f"task 'tokens' has no options {unknown}; known: "
                         f"{', '.join(TASK_OPTIONS)}")
    directory = options.get("dir")
    settings = _given(options)
    if directory is not None:
        directory = pathlib.Path(directory).expanduser()
        if directory.exists():
            meta = load_metadata(directory, arg=f"{arg_prefix}dir")
            if settings:
                p = plan(seed=seed, arg_prefix=arg_prefix, **settings)
                if p.fingerprint != meta["fingerprint"]:
                    raise ValueError(_stale_message(directory, meta, p, f"{arg_prefix}dir",
                                                    "give only dir to use it as it is, or "
                                                    "another dir"))
            return directory, meta
    p = plan(seed=seed, arg_prefix=arg_prefix, **settings)
    if directory is None:
        directory = auto_dir(data_dir, p)
        if (directory / METADATA).is_file():
            return directory, load_metadata(directory, arg=f"{arg_prefix}dir")
    _say(progress, f"tokenising {p.settings['corpus']} into {directory} (once)")
    prepare(directory, p, workers=options.get("workers"), num_shards=options.get("num_shards"),
            progress=progress, arg_prefix=arg_prefix)
    return directory, load_metadata(directory, arg=f"{arg_prefix}dir")


def layout_vocab_size(options: dict) -> int:
    """The vocabulary size of build("tokens", **options) without tokenising anything: from the
    dir's metadata when there is one, else the tokenizer file, else the vocab_size asked for
    (what a trained BPE reaches on any corpus of real size)."""
    unknown = sorted(set(options) - set(TASK_OPTIONS))
    if unknown:
        raise ValueError(f"task 'tokens' has no options {unknown}; known: "
                         f"{', '.join(TASK_OPTIONS)}")
    directory = options.get("dir")
    if directory is not None and (pathlib.Path(directory).expanduser() / METADATA).is_file():
        return int(load_metadata(directory)["vocab_size"])
    if options.get("tokenizer") is not None:
        tok = load_tokenizer(pathlib.Path(options["tokenizer"]).expanduser())
        special_ids(tok, {"pad": options.get("pad_token", PAD_TOKEN),
                          "bos": options.get("bos_token", BOS_TOKEN),
                          "eos": options.get("eos_token", EOS_TOKEN)})
        return int(token_bytes(tok).size)
    vocab_size = options.get("vocab_size", DEFAULT_VOCAB_SIZE)
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"data.task_options.vocab_size: expected an integer >= "
                         f"{MIN_VOCAB_SIZE}, got {vocab_size!r}")
    return vocab_size


@functools.lru_cache(maxsize=8)
def _codec(directory: str, sha1: str) -> Codec:
    del sha1  # part of the cache key: a rewritten directory is a new codec
    meta = load_metadata(directory)
    tok = load_tokenizer(pathlib.Path(directory) / meta["tokenizer"]["file"])
    tb = token_bytes(tok)
    tb.setflags(write=False)
    vocab = tb.size

    def encode(text: str) -> np.ndarray:
        return np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= 0) & (ids < vocab)]
        return tok.decode(ids.tolist(), skip_special_tokens=True)

    ids = meta["special_ids"]
    return Codec(encode=encode, decode=decode, token_bytes=tb, bos=int(ids["bos"]),
                 eos=int(ids["eos"]))


def codec(directory: str | os.PathLike) -> Codec:
    """The codec (train.data.codec) of a tokenised corpus: its tokenizer's encode / decode,
    token_bytes (0 for the specials), BOS and EOS ids."""
    directory = str(pathlib.Path(directory).expanduser().resolve())
    meta = load_metadata(directory)
    return _codec(directory, meta["tokenizer"]["sha1"])
