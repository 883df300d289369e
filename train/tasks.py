"""Synthetic memory tasks generated from a seed (no data on disk, nothing from the network)."""
from __future__ import annotations

import numpy as np


def delayed_recall(rng: np.random.Generator, batch_size: int, seq_len: int, vocab_size: int,
                   delay: int):
    """Uniform random tokens; the target at t is the token seen `delay` steps earlier.

    Returns (tokens [b, t] int32, targets [b, t] int32, mask [b, t] float32): positions t < delay
    have nothing to recall and are masked out. Chance accuracy is 1 / vocab_size; a model must
    keep the last `delay` tokens in its state to do better.
    """
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len), dtype=np.int32)
    targets = np.zeros_like(tokens)
    targets[:, delay:] = tokens[:, :-delay]
    mask = np.zeros((batch_size, seq_len), np.float32)
    mask[:, delay:] = 1.0
    return tokens, targets, mask
