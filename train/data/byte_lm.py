"""Byte-level language modelling on a corpus of text files, packed into fixed-length rows.

Vocabulary: bytes 0..255, then PAD = 256, BOS = 257, EOS = 258 (VOCAB_SIZE = 259). A document
(one file, or one piece of a file cut at `document_separator`) becomes [BOS, bytes..., EOS];
documents are concatenated into one stream and cut into rows of seq_len tokens, so a long
document continues in the next row: row r is stream[r seq_len : r seq_len + seq_len + 1] (one
token past its end, the target of its last input). Each row is an example:

- inputs int32 [t], targets int32 [t] (the next token of the stream), mask float32 [t]
- segment_ids int32 [t]: 1, 2, ... for the documents (pieces) in the row, in order, 0 on padding.
  The id changes exactly where a document begins (at every BOS but a row's first token), which is
  where a recurrent state must reset (pallas_kernels' segment_ids convention).

mask is 1 where the target belongs to the same document as the input, so no loss asks a model to
guess the first byte of an unrelated document from the end of another (the EOS -> BOS step is
masked; BOS -> first byte and last byte -> EOS count). Only the stream's tail row is padded.

The default corpus is the Python standard library's own source (`*.py` under
`sysconfig.get_paths()["stdlib"]`, without site-packages): every Python that can run this code
has it, offline, at a known path; it is ~30 MB of real, varied text in ~1,800 documents. It
differs between Python versions, so datasets built from it are keyed by a fingerprint of the
file list.

The corpus, its document split and the row layout are shared with the tokenised corpora
(`train.data.tokens`): `pack_ids` packs documents of any token ids with the caller's BOS / EOS /
PAD, and `num_rows` / `padded_row` are what random access into the same stream needs.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
import zlib
from collections.abc import Iterable, Iterator

import numpy as np

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259
_SKIPPED_PARTS = {"site-packages", "dist-packages", "__pycache__"}


def default_corpus() -> tuple[pathlib.Path, str]:
    """(directory, glob) of the default corpus: the standard library's Python sources."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"]), "**/*.py"


def resolve_corpus(corpus: str | os.PathLike | None,
                   pattern: str | None = None) -> tuple[pathlib.Path, str, list[pathlib.Path]]:
    """(absolute root, pattern, files) of a corpus; None means `default_corpus()`.

    The root is made absolute because documents are split by their path (`split_of`): the same
    corpus named two ways must split the same way.
    """
    if corpus is None:
        corpus, default_pattern = default_corpus()
        pattern = pattern or default_pattern
    root = pathlib.Path(corpus).expanduser().resolve()
    pattern = pattern or "**/*"
    return root, pattern, corpus_files(root, pattern)


def corpus_files(path: str | os.PathLike, pattern: str = "**/*") -> list[pathlib.Path]:
    """The corpus' files in a stable order; a FileNotFoundError names a missing or empty path."""
    root = pathlib.Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"byte-LM corpus path {str(root)!r} does not exist (give a text "
                                "file or a directory of them)")
    files = sorted(f for f in root.glob(pattern)
                   if f.is_file() and not _SKIPPED_PARTS & set(f.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"byte-LM corpus directory {str(root)!r} has no files matching "
                                f"{pattern!r}")
    return files


def fingerprint(files: list[pathlib.Path]) -> str:
    """Changes when a file is added, removed or resized, so a stale build is never reused."""
    digest = hashlib.sha1()
    for f in files:
        digest.update(f"{f}\0{f.stat().st_size}\0".encode())
    return digest.hexdigest()[:12]


def split_of(name: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """Documents go to splits by a hash of their name: stable as the corpus grows."""
    u = zlib.crc32(f"{seed}:{name}".encode()) / 2**32
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


def documents(files: list[pathlib.Path], split: str, *, seed: int = 0,
              validation_fraction: float = 0.05, test_fraction: float = 0.05,
              document_separator: bytes | None = None) -> Iterator[bytes]:
    """The documents of one split, as bytes."""
    for doc_split, doc in split_documents(files, seed=seed,
                                          validation_fraction=validation_fraction,
                                          test_fraction=test_fraction,
                                          document_separator=document_separator):
        if doc_split == split:
            yield doc


def split_documents(files: list[pathlib.Path], *, seed: int = 0,
                    validation_fraction: float = 0.05, test_fraction: float = 0.05,
                    document_separator: bytes | None = None) -> Iterator[tuple[str, bytes]]:
    """(split, document) for every non-empty document of the files, in corpus order: one read
    of each file serves all the splits."""
    for f in files:
        data = f.read_bytes()
        pieces = data.split(document_separator) if document_separator else [data]
        for i, piece in enumerate(pieces):
            if piece:
                name = f"{f}#{i}" if document_separator else str(f)
                yield split_of(name, seed, validation_fraction, test_fraction), piece


def pack(docs: Iterable[bytes], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of seq_len bytes from a stream of documents (see the module docstring)."""
    return pack_ids((np.frombuffer(doc, np.uint8) for doc in docs), seq_len, bos=BOS, eos=EOS,
                    pad=PAD)


def pack_ids(docs: Iterable[np.ndarray], seq_len: int, *, bos: int, eos: int,
             pad: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of seq_len tokens from a stream of documents given as token ids: each becomes
    [bos, ids..., eos], rows are cut as the module docstring says, the tail row padded."""
    tokens: list[np.ndarray] = []
    doc_ids: list[np.ndarray] = []
    buffered = 0
    for doc_id, doc in enumerate(docs):
        t = np.concatenate([[bos], np.asarray(doc), [eos]]).astype(np.int32)
        tokens.append(t)
        doc_ids.append(np.full(t.shape, doc_id, np.int64))
        buffered += t.size
        # A row needs one token past its end: the target of its last input.
        if buffered >= seq_len + 1:
            tok, ids = np.concatenate(tokens), np.concatenate(doc_ids)
            start = 0
            while tok.size - start >= seq_len + 1:
                end = start + seq_len + 1
                yield make_row(tok[start:end], ids[start:end], seq_len)
                start += seq_len
            tokens, doc_ids = [tok[start:]], [ids[start:]]
            buffered = tokens[0].size
    if buffered >= 2:
        yield padded_row(np.concatenate(tokens), np.concatenate(doc_ids), seq_len, pad=pad)


def num_rows(stream_len: int, seq_len: int) -> int:
    """How many rows `pack_ids` cuts from a stream of stream_len tokens: every full row, then the
    tail when it holds at least one (input, target) pair."""
    if stream_len < 2:
        return 0
    full = (stream_len - 1) // seq_len
    return full + (stream_len - full * seq_len >= 2)


def padded_row(tok: np.ndarray, ids: np.ndarray, seq_len: int, *,
               pad: int) -> dict[str, np.ndarray]:
    """make_row for up to seq_len + 1 tokens: the stream's tail is padded (ids -1)."""
    n = seq_len + 1 - tok.size
    return make_row(np.pad(tok, (0, n), constant_values=pad),
                    np.pad(ids, (0, n), constant_values=-1), seq_len)


def make_row(tok: np.ndarray, ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """One row from seq_len + 1 tokens and their document ids (-1 on padding)."""
    inputs, targets = tok[:seq_len], tok[1:]
    in_ids, target_ids = ids[:seq_len], ids[1:]
    real = in_ids >= 0
    starts = np.concatenate([[True], in_ids[1:] != in_ids[:-1]]) & real
    segment_ids = np.where(real, np.cumsum(starts), 0).astype(np.int32)
    mask = (real & (in_ids == target_ids)).astype(np.float32)
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
            "mask": mask, "segment_ids": segment_ids}
