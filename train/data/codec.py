"""Text <-> token ids for the language-modelling tasks, and what a token is worth in bytes.

Evaluation needs both: bits per byte divides a model's summed loss by the UTF-8 bytes its
targets stand for (`token_bytes[target]`, 0 for the special tokens), which makes byte-level and
subword models comparable; needle retrieval writes a prompt as text and reads the answer back.

`codec_for(info)` gives the codec of a built task ("bytes" here; "tokens": the tokenizer of the
tokenised corpus in info.options["dir"], train/data/tokens.py) or raises ValueError for tasks
that are not text.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from train.data import byte_lm


@dataclasses.dataclass(frozen=True)
class Codec:
    encode: Callable[[str], np.ndarray]     # text -> int32 ids (no BOS / EOS added)
    decode: Callable[[np.ndarray], str]     # ids -> text (special tokens dropped)
    token_bytes: np.ndarray                 # int32 [vocab]: UTF-8 bytes each id stands for
    bos: int
    eos: int

    @property
    def vocab_size(self) -> int:
        return int(self.token_bytes.shape[0])


def byte_codec() -> Codec:
    token_bytes = np.zeros(byte_lm.VOCAB_SIZE, np.int32)
    token_bytes[:256] = 1

    def encode(text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", "replace")

    return Codec(encode=encode, decode=decode, token_bytes=token_bytes, bos=byte_lm.BOS,
                 eos=byte_lm.EOS)


def tokens_codec(info) -> Codec:
    from train.data import tokens   # the tokenizers package is this codec's alone
    return tokens.codec(info.options["dir"])


# task name -> (DataInfo -> Codec)
CODECS: dict[str, Callable] = {"bytes": lambda info: byte_codec(),
                               "lm1b": lambda info: byte_codec(),
                               "tokens": tokens_codec}


def codec_for(info) -> Codec:
    """The codec of a built task's DataInfo; ValueError for a task that is not text."""
    make = CODECS.get(info.task)
    if make is None:
        raise ValueError(f"task {info.task!r} is not a text task: perplexity in bits per byte "
                         f"and needle retrieval need one of {', '.join(sorted(CODECS))}")
    return make(info)
