"""Synthetic memory tasks: one seeded, pure-numpy generator per task, one example per call.

Every generator takes a `np.random.Generator` first and keyword options after it, and returns a
dict of arrays for one example:

- language-model style: {"inputs": int32 [t], "targets": int32 [t], "mask": float32 [t]}; the
  loss is cross-entropy of the prediction at t against targets[t], weighted by mask[t] (1 where
  it counts). Masked-out targets are 0.
- classification: {"inputs": int32 [t], "label": int32 [], "mask": float32 [t]} where mask marks
  the real (unpadded) tokens, for pooling.

`TASKS` maps each task name to its generator, defaults, vocabulary size and chance accuracy;
`example(task, seed, split, index, ...)` makes example `index` of a split from its own seed, so any
example can be regenerated alone (what the tfds builders write and what the in-memory source
serves are the same arrays).
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Example = dict[str, np.ndarray]


def _lm_example(inputs, targets, mask) -> Example:
    return {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32),
            "mask": np.asarray(mask, np.float32)}


def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


# --------------------------------------------------------------------------------------------
# Delayed recall (the first toy task; train/tasks.py re-exports the batched form)


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


def delayed_recall_example(rng: np.random.Generator, *, seq_len: int, vocab_size: int = 16,
                           delay: int = 8) -> Example:
    """One example of `delayed_recall` (vocabulary: all `vocab_size` tokens are data)."""
    _require(0 < delay < seq_len, f"delayed_recall needs 0 < delay < seq_len, got {delay=}, "
             f"{seq_len=}")
    tokens, targets, mask = delayed_recall(rng, 1, seq_len, vocab_size, delay)
    return _lm_example(tokens[0], targets[0], mask[0])


# --------------------------------------------------------------------------------------------
# MQAR (zoology)


def mqar(rng: np.random.Generator, *, seq_len: int, vocab_size: int = 8192,
         num_kv_pairs: int | Sequence[int] = 8, power_a: float = 0.01,
         random_non_queries: bool = True, filler_avoids_keys: bool = False,
         read_twice: bool = False, num_queries: int | None = None,
         list_queries: bool = False) -> Example:
    """Multi-query associative recall, following zoology's `multiquery_ar`.

    Vocabulary: 0 is never a key or value (zoology keeps it for "no query here"); keys come from
    [1, vocab_size // 2), values from [vocab_size // 2, vocab_size). The first 2 * num_kv_pairs
    positions hold key, value, key, value, ...; the rest is filler with every key queried once, at
    even offsets 2 * gap where the gaps are drawn without replacement with probability
    proportional to gap ** (power_a - 1) (small power_a crowds queries near the context, as in
    zoology). Filler is uniform over the whole vocabulary (random_non_queries) or 0. The target at
    a query key's position is its value (the next token). Chance accuracy: 1 / (vocab_size -
    vocab_size // 2) for a model that knows the value half of the vocabulary.

    num_kv_pairs may be a sequence of counts: each example draws its own count uniformly from it
    (zoology's training mixture; with `train_num_kv_pairs` in `example`, only the train split
    mixes). filler_avoids_keys keeps this example's keys out of the filler, so each key occurs
    only at its pair and at its query. At zoology's vocab_size 8192 random filler rarely repeats a
    key; at a vocabulary near seq_len it does often (about once per key at vocab_size = seq_len),
    and every such stray copy, followed by a random token, is a wrong match for a recall by
    content; this option restores the large-vocabulary task at a small vocabulary's cost.

    read_twice: JRT-Prompt (Arora et al., 2024, "Just read twice"): the 2 * num_kv_pairs context
    tokens are repeated verbatim right after themselves, then the queries, so a causal recurrent
    model reads every pair a second time knowing all the keys it will be asked about. Only the
    queries are scored; seq_len counts the copy (6 * num_kv_pairs <= seq_len).

    num_queries: how many of the keys are queried (a random subset, each once; None: all).
    list_queries: the queried keys are listed (unscored, in the order drawn) right after the pairs,
    so the prompt names the bindings it will ask for, after them. This is JRT's ordering lever
    (Arora et al., 2024): a causal fixed-size state reads the pairs before it knows which matter
    and must keep all of them, while a non-causal prompt encoder (the "jrt" mixer with prefix_len
    covering pairs and list) or a second read (read_twice repeats pairs and list) can keep only
    the queried ones. seq_len >= (2 if read_twice else 1) * (2 * num_kv_pairs + listed) +
    2 * num_queries. With both options at their defaults the examples are unchanged.
    """
    if not isinstance(num_kv_pairs, (int, np.integer)):
        counts = [int(n) for n in num_kv_pairs]
        _require(len(counts) > 0, "mqar needs at least one num_kv_pairs count")
        for n in counts:   # every count checked, not just the one this example draws
            _mqar_check(seq_len, vocab_size, n, read_twice, num_queries, list_queries)
        num_kv_pairs = counts[int(rng.integers(len(counts)))]
    num_kv_pairs = int(num_kv_pairs)
    _mqar_check(seq_len, vocab_size, num_kv_pairs, read_twice, num_queries, list_queries)
    asked_count = num_kv_pairs if num_queries is None else int(num_queries)
    key_vocab = vocab_size // 2
    context = 2 * num_kv_pairs
    block = context + (asked_count if list_queries else 0)    # the pairs, then the list
    prompt = 2 * block if read_twice else block
    keys = rng.choice(np.arange(1, key_vocab), size=num_kv_pairs, replace=False)
    values = rng.choice(np.arange(key_vocab, vocab_size), size=num_kv_pairs, replace=False)
    space = (seq_len - prompt) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    gaps = rng.choice(space, size=asked_count, replace=False, p=p / p.sum())
    # drawn only for a subset, so the default examples keep their random stream
    pick = (np.arange(num_kv_pairs) if asked_count == num_kv_pairs
            else rng.choice(num_kv_pairs, size=asked_count, replace=False))
    keys_asked, values_asked = keys[pick], values[pick]

    inputs = np.zeros(seq_len, np.int64)
    inputs[0:context:2], inputs[1:context:2] = keys, values
    inputs[context:block] = keys_asked[:block - context]
    inputs[block:prompt] = inputs[:prompt - block]
    query_at = prompt + 2 * gaps
    if random_non_queries:
        if filler_avoids_keys:
            inputs[prompt:] = rng.choice(np.setdiff1d(np.arange(vocab_size), keys),
                                         seq_len - prompt)
        else:
            inputs[prompt:] = rng.integers(0, vocab_size, seq_len - prompt)
    inputs[query_at] = keys_asked
    targets = np.zeros(seq_len, np.int64)
    mask = np.zeros(seq_len, np.float32)
    targets[query_at], mask[query_at] = values_asked, 1.0
    return _lm_example(inputs, targets, mask)


def _mqar_check(seq_len: int, vocab_size: int, num_kv_pairs: int,
                read_twice: bool = False, num_queries: int | None = None,
                list_queries: bool = False) -> None:
    _require(seq_len % 2 == 0, f"mqar needs an even seq_len, got {seq_len}")
    _require(num_kv_pairs >= 1, f"mqar needs num_kv_pairs >= 1, got {num_kv_pairs}")
    _require(isinstance(read_twice, (bool, np.bool_)),
             f"mqar needs read_twice to be a bool, got {read_twice!r}")
    _require(isinstance(list_queries, (bool, np.bool_)),
             f"mqar needs list_queries to be a bool, got {list_queries!r}")
    _require(num_queries is None or (isinstance(num_queries, (int, np.integer))
                                     and not isinstance(num_queries, bool)
                                     and 1 <= num_queries <= num_kv_pairs),
             f"mqar needs num_queries to be None or an int in [1, num_kv_pairs], got "
             f"{num_queries!r} with {num_kv_pairs=}")
    if num_queries is None and not list_queries:
        # context (twice with read_twice) + one query slot pair per key
        need = (6 if read_twice else 4) * num_kv_pairs
        _require(need <= seq_len, f"mqar needs {need // num_kv_pairs} * num_kv_pairs <= "
                 f"seq_len{' (read_twice)' if read_twice else ''}, got {num_kv_pairs=}, "
                 f"{seq_len=}")
    asked = num_kv_pairs if num_queries is None else int(num_queries)
    prompt = (2 if read_twice else 1) * (2 * num_kv_pairs + (asked if list_queries else 0))
    _require(prompt + 2 * asked <= seq_len,
             f"mqar needs the prompt ({prompt} tokens) + 2 * num_queries ({asked}) <= seq_len, "
             f"got {seq_len=}")
    _require(num_kv_pairs <= vocab_size // 2 - 1, f"mqar needs num_kv_pairs <= vocab_size // 2 "
             f"- 1 distinct keys, got {num_kv_pairs=}, {vocab_size=}")


# --------------------------------------------------------------------------------------------
# Copying and selective copying (Mamba)

BLANK, DELIMITER = 0, 1


def _copy_at(rng, positions, seq_len, vocab_size, num_tokens) -> Example:
    data = rng.integers(2, vocab_size, num_tokens)
    inputs = np.full(seq_len, BLANK, np.int64)
    inputs[positions] = data
    answer = seq_len - num_tokens
    inputs[answer] = DELIMITER
    targets = np.zeros(seq_len, np.int64)
    mask = np.zeros(seq_len, np.float32)
    targets[answer:], mask[answer:] = data, 1.0
    return _lm_example(inputs, targets, mask)


def copying(rng: np.random.Generator, *, seq_len: int, vocab_size: int = 16,
            num_tokens: int = 16) -> Example:
    """Copy `num_tokens` tokens after a delimiter, with a blank gap between.

    Vocabulary: 0 blank, 1 delimiter, [2, vocab_size) data. Layout: data at [0, num_tokens), blanks
    up to seq_len - num_tokens, where the delimiter stands, then blanks. The targets at the
    delimiter and the num_tokens - 1 blanks after it are the data in order (the model sees no
    copy of its own output). Chance accuracy: 1 / (vocab_size - 2).
    """
    _require(2 * num_tokens <= seq_len, f"copying needs 2 * num_tokens <= seq_len, got "
             f"{num_tokens=}, {seq_len=}")
    _require(vocab_size > 2, f"copying needs vocab_size > 2, got {vocab_size}")
    return _copy_at(rng, np.arange(num_tokens), seq_len, vocab_size, num_tokens)


def selective_copying(rng: np.random.Generator, *, seq_len: int, vocab_size: int = 16,
                      num_tokens: int = 16) -> Example:
    """Mamba's selective copying: data tokens scattered among blanks, reproduced in order at the end.

    Vocabulary and answer layout as `copying`; the num_tokens data tokens stand at sorted random
    positions in [0, seq_len - num_tokens), so the gap between data is not fixed and a
    time-invariant convolution cannot solve it. Chance accuracy: 1 / (vocab_size - 2).
    """
    _require(2 * num_tokens <= seq_len, f"selective_copying needs 2 * num_tokens <= seq_len, got "
             f"{num_tokens=}, {seq_len=}")
    _require(vocab_size > 2, f"selective_copying needs vocab_size > 2, got {vocab_size}")
    positions = np.sort(rng.choice(seq_len - num_tokens, size=num_tokens, replace=False))
    return _copy_at(rng, positions, seq_len, vocab_size, num_tokens)


# --------------------------------------------------------------------------------------------
# Induction heads (Mamba)

TRIGGER = 0


def induction_heads(rng: np.random.Generator, *, seq_len: int, vocab_size: int = 16) -> Example:
    """A trigger token followed by an answer token somewhere; the trigger again at the end.

    Vocabulary: 0 the trigger (appears exactly twice), [1, vocab_size) ordinary tokens. The
    trigger stands at a uniform position p in [0, seq_len - 3], the answer at p + 1, the trigger
    again at seq_len - 1, whose target is the answer (the only masked-in position). Chance
    accuracy: 1 / (vocab_size - 1).
    """
    _require(seq_len >= 3, f"induction_heads needs seq_len >= 3, got {seq_len}")
    _require(vocab_size >= 2, f"induction_heads needs vocab_size >= 2, got {vocab_size}")
    inputs = rng.integers(1, vocab_size, seq_len)
    p = rng.integers(0, seq_len - 2)
    inputs[p], inputs[-1] = TRIGGER, TRIGGER
    targets = np.zeros(seq_len, np.int64)
    mask = np.zeros(seq_len, np.float32)
    targets[-1], mask[-1] = inputs[p + 1], 1.0
    return _lm_example(inputs, targets, mask)


# --------------------------------------------------------------------------------------------
# Single needle in a haystack (RULER-style S-NIAH on tokens)

NEEDLE, QUERY = 0, 1


def niah(rng: np.random.Generator, *, seq_len: int, vocab_size: int = 64) -> Example:
    """One key-value needle in a haystack of random tokens; the key is asked for at the end.

    Vocabulary: 0 needle marker, 1 query marker, [2, vocab_size) haystack, keys and values. The
    needle [NEEDLE, key, value] starts at a uniform position in [0, seq_len - 5]; the example ends
    with [QUERY, key] and the target at the final key is the value. Chance accuracy:
    1 / (vocab_size - 2).
    """
    _require(seq_len >= 5, f"niah needs seq_len >= 5, got {seq_len}")
    _require(vocab_size > 2, f"niah needs vocab_size > 2, got {vocab_size}")
    inputs = rng.integers(2, vocab_size, seq_len)
    key, value = rng.integers(2, vocab_size, 2)
    at = rng.integers(0, seq_len - 4)
    inputs[at:at + 3] = NEEDLE, key, value
    inputs[-2:] = QUERY, key
    targets = np.zeros(seq_len, np.int64)
    mask = np.zeros(seq_len, np.float32)
    targets[-1], mask[-1] = value, 1.0
    return _lm_example(inputs, targets, mask)


# --------------------------------------------------------------------------------------------
# Factual recall ("How do language models learn facts?", Zucchet et al., 2025): a fixed world of
# individuals and their attributes, stated as facts; answering needs parametric memory.

FACTS_PAD = 0


def facts_world(world_seed: int, num_individuals: int, num_first_names: int,
                num_last_names: int, num_attributes: int, num_values: int):
    """The world: (names [N, 2] of distinct (first, last) pairs, attributes [N, A] in [0, V)).

    Fixed by `world_seed` alone, so every split (and every process) states the same facts."""
    _require(num_individuals <= num_first_names * num_last_names,
             f"factual_recall: num_individuals ({num_individuals}) must be <= num_first_names * "
             f"num_last_names ({num_first_names * num_last_names}): names must be distinct")
    rng = np.random.default_rng([world_seed, 0xFAC75])
    pairs = rng.choice(num_first_names * num_last_names, num_individuals, replace=False)
    names = np.stack([pairs // num_last_names, pairs % num_last_names], axis=1)
    attributes = rng.integers(0, num_values, (num_individuals, num_attributes))
    return names, attributes


_WORLDS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def factual_recall(rng: np.random.Generator, *, seq_len: int, num_individuals: int = 4096,
                   num_first_names: int = 128, num_last_names: int = 128,
                   num_attributes: int = 4, num_values: int = 32,
                   world_seed: int = 0, num_topics: int = 0,
                   topic_token: bool = True) -> Example:
    """Facts "first last attribute value" about individuals of one fixed world, 4 tokens each.

    Each individual has a two-token name (a distinct (first, last) pair, so no single token
    identifies a person: the model must bind the pair) and one value for each of
    `num_attributes` attribute types, drawn uniformly from that type's `num_values` values. An
    example is seq_len // 4 facts about distinct (individual, attribute) pairs (the rest
    padded); the target at every attribute token is the value token that follows, so the
    answer is never in context: it has to come from the weights. Every split states facts of
    the same world (`world_seed`), so held-out accuracy measures what was memorised.

    Vocabulary: 0 pad; first names [1, 1 + F); last names [1 + F, 1 + F + L); attribute types
    [1 + F + L, 1 + F + L + A); then A blocks of V value tokens, block a for attribute a.
    vocab_size = 1 + F + L + A + A * V. Chance accuracy: 1 / V (the attribute token tells the
    value block; a model that knows nothing of the person guesses within it).

    Topics (`num_topics` = T > 0; 0, the default, is the task above): the regime of hierarchical
    memory banks (Pouransari et al., 2025), where a document's context fetches the memory of its
    cluster. Individual i belongs to topic i mod T (names are random pairs, so a topic's names
    are a random set) and every example is about one topic, drawn uniformly: its facts are
    about that topic's individuals only. With `topic_token` (the default) the example starts
    with the topic's token, vocabulary id (the size above) + topic, and holds
    (seq_len - 1) // 4 facts after it. Why the token: the paper's retriever sees the whole
    document, and a real document shows its topic throughout; here names are shared across
    topics, so without a token a causal model could tell the topic only after memorising
    which individuals are in it, and the first facts of every example would have no context
    to fetch by. The token is not scored; it is the document's visible topic, nothing more
    (it does not tell any value). vocab_size grows by T with the token.
    """
    _require(seq_len >= 4, f"factual_recall needs seq_len >= 4, got {seq_len}")
    _require(not isinstance(num_topics, bool) and isinstance(num_topics, (int, np.integer))
             and 0 <= num_topics <= num_individuals,
             f"factual_recall: num_topics must be an integer in [0, num_individuals = "
             f"{num_individuals}] (0: no topics), got {num_topics!r}")
    _require(isinstance(topic_token, (bool, np.bool_)),
             f"factual_recall: topic_token must be a bool, got {topic_token!r}")
    key = (world_seed, num_individuals, num_first_names, num_last_names, num_attributes,
           num_values)
    if key not in _WORLDS:
        _WORLDS[key] = facts_world(world_seed, num_individuals, num_first_names,
                                   num_last_names, num_attributes, num_values)
    names, attributes = _WORLDS[key]
    lead = 1 if num_topics and topic_token else 0
    n_facts = (seq_len - lead) // 4
    # topic t's individuals are t, t + T, t + 2T, ...: the smallest topic has N // T of them
    pool = num_individuals // num_topics if num_topics else num_individuals
    _require(1 <= n_facts <= pool * num_attributes,
             f"factual_recall: seq_len {seq_len} gives {n_facts} facts; an example needs 1 to "
             f"{pool * num_attributes} (the facts of {'a topic' if num_topics else 'the world'})")
    if num_topics:
        topic = int(rng.integers(num_topics))
        picks = rng.choice(pool * num_attributes, n_facts, replace=False)
        who, attr = topic + num_topics * (picks // num_attributes), picks % num_attributes
    else:
        picks = rng.choice(num_individuals * num_attributes, n_facts, replace=False)
        who, attr = picks // num_attributes, picks % num_attributes
    first0 = 1
    last0 = first0 + num_first_names
    attr0 = last0 + num_last_names
    value0 = attr0 + num_attributes
    facts = np.stack([first0 + names[who, 0], last0 + names[who, 1], attr0 + attr,
                      value0 + attr * num_values + attributes[who, attr]], axis=1)
    inputs = np.full(seq_len, FACTS_PAD, np.int64)
    if lead:
        inputs[0] = value0 + num_attributes * num_values + topic
    inputs[lead:lead + 4 * n_facts] = facts.reshape(-1)
    targets = np.zeros(seq_len, np.int64)
    mask = np.zeros(seq_len, np.float32)
    at = lead + 4 * np.arange(n_facts) + 2   # the attribute tokens
    targets[at], mask[at] = inputs[at + 1], 1.0
    return _lm_example(inputs, targets, mask)


def _facts_vocab(o):
    return 1 + o["num_first_names"] + o["num_last_names"] + o["num_attributes"] * (
        1 + o["num_values"]) + (o["num_topics"] if o["topic_token"] else 0)


# --------------------------------------------------------------------------------------------
# ListOps (Long Range Arena's generator)

LISTOPS_PAD = 0
LISTOPS_DIGIT0 = 1          # digits 0..9 are tokens 1..10
LISTOPS_OPERATORS = {"MIN": 11, "MAX": 12, "MED": 13, "SM": 14}
LISTOPS_END = 15
LISTOPS_VOCAB = 16
_VALUE_P = 0.25             # LRA: the chance that a non-leaf draw becomes an operator


def _listops_tree(rng, depth, max_depth, max_args, out: list[int]) -> int:
    """Appends one subtree's tokens to `out` (LRA's generate_tree draw order) and returns its value."""
    if depth < max_depth and rng.random() <= _VALUE_P:
        num_args = int(rng.integers(2, max_args + 1))
        start = len(out)
        out.append(-1)          # the operator token, chosen after its arguments as in LRA
        args = [_listops_tree(rng, depth + 1, max_depth, max_args, out) for _ in range(num_args)]
        op = list(LISTOPS_OPERATORS)[int(rng.integers(len(LISTOPS_OPERATORS)))]
        out[start] = LISTOPS_OPERATORS[op]
        out.append(LISTOPS_END)
        return listops_apply(op, args)
    value = int(rng.integers(10))
    out.append(LISTOPS_DIGIT0 + value)
    return value


def listops_apply(op: str, args: list[int]) -> int:
    """LRA's semantics: MED is int(np.median(...)) (the floor of a half-integer median)."""
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "MED":
        return int(np.median(args))
    return sum(args) % 10


def listops(rng: np.random.Generator, *, seq_len: int, max_depth: int = 10, max_args: int = 10,
            min_length: int | None = None, max_tries: int = 10_000) -> Example:
    """A nested MAX/MIN/MED/SM (sum mod 10) expression over digits; the label is its value.

    LRA's generator (lra_benchmarks/data/listops.py): depth-first, each node an operator with 2 to
    max_args arguments with probability 0.25 below max_depth, else a digit; trees are rejected
    unless min_length < tokens <= seq_len (LRA: 500 < tokens < 2000; min_length defaults to
    seq_len // 4, LRA's ratio). Unlike LRA, duplicates are not removed. Tokens (LRA's string
    without parentheses): 0 pad, 1..10 digits 0..9, 11 MIN, 12 MAX, 13 MED, 14 SM, 15 "]"; inputs
    are right-padded with 0. 10 classes; uniform chance is 1/10, but the labels are not uniform
    (predicting the most frequent class does better).
    """
    min_length = seq_len // 4 if min_length is None else min_length
    for _ in range(max_tries):
        tokens: list[int] = []
        value = _listops_tree(rng, 1, max_depth, max_args, tokens)
        if min_length < len(tokens) <= seq_len:
            inputs = np.full(seq_len, LISTOPS_PAD, np.int32)
            inputs[:len(tokens)] = tokens
            mask = (inputs != LISTOPS_PAD).astype(np.float32)
            return {"inputs": inputs, "label": np.asarray(value, np.int32), "mask": mask}
    raise ValueError(f"listops drew no tree with {min_length} < length <= {seq_len} tokens in "
                     f"{max_tries} tries (max_depth={max_depth}, max_args={max_args}); lower "
                     "min_length or raise max_depth")


# --------------------------------------------------------------------------------------------
# Variable-length copy (Neural Turing Machines, section 4.1)


def variable_copying(rng: np.random.Generator, *, seq_len: int, vocab_size: int = 16,
                     max_tokens: int | None = None) -> Example:
    """The NTM paper's copy task: a sequence of random length, a delimiter, then the sequence.

    Vocabulary as `copying` (0 blank, 1 delimiter, [2, vocab_size) data). The length L is uniform
    in [1, max_tokens] (default seq_len // 2, so a longer eval length, data.eval_seq_len, also
    asks for longer copies than training saw); data at [0, L), the delimiter at L, blanks after.
    The targets at the delimiter and the L - 1 blanks after it are the data in order. Chance
    accuracy: 1 / (vocab_size - 2).
    """
    max_tokens = seq_len // 2 if max_tokens is None else max_tokens
    _require(1 <= max_tokens and 2 * max_tokens <= seq_len, f"variable_copying needs 1 <= "
             f"max_tokens and 2 * max_tokens <= seq_len, got {max_tokens=}, {seq_len=}")
    _require(vocab_size > 2, f"variable_copying needs vocab_size > 2, got {vocab_size}")
    n = int(rng.integers(1, max_tokens + 1))
    data = rng.integers(2, vocab_size, n)
    inputs = np.full(seq_len, BLANK, np.int64)
    inputs[:n], inputs[n] = data, DELIMITER
    targets = np.zeros(seq_len, np.int64)
    mask = np.zeros(seq_len, np.float32)
    targets[n:2 * n], mask[n:2 * n] = data, 1.0
    return _lm_example(inputs, targets, mask)


# --------------------------------------------------------------------------------------------
# bAbI-like stories (Weston et al., 2015: tasks 1 and 2, "single / two supporting facts"),
# generated offline: fixed-length sentences for End-to-End Memory Networks.

BABI_SENTENCE = 4
# ".", "?", "moved-to", "picked-up", "where", "is"; then entities, locations, objects
BABI_DOT, BABI_QMARK, BABI_MOVE, BABI_PICK, BABI_WHERE, BABI_IS = range(6)
BABI_SPECIALS = 6


def babi_vocab(o) -> int:
    return BABI_SPECIALS + o["num_entities"] + o["num_locations"] + o["num_objects"]


def babi(rng: np.random.Generator, *, seq_len: int, hops: int = 1, num_entities: int = 4,
         num_locations: int = 6, num_objects: int = 4, question_prob: float = 0.25,
         move_prob: float = 0.6) -> Example:
    """A story of 4-token sentences with questions among them; each answer is a location.

    Facts: [entity, moved-to, location, .] (probability move_prob) or [entity, picked-up,
    object, .] (the object goes with its last picker). Questions (each sentence after the first
    with probability question_prob, when one can be answered; the last sentence always):
    hops=1 "where is entity ?" [where, is, entity, ?], answered by the entity's LAST move;
    hops=2 "where is object ?", answered by the last move of the object's last picker (two
    supporting facts). Questions state nothing. The target at a question's "?" is the answer
    location, the only scored positions. Tokens: 0-5 as BABI_*, then entities, locations,
    objects (babi_vocab). seq_len must be a multiple of 4. Chance accuracy: 1 / num_locations.
    """
    _require(hops in (1, 2), f"babi needs hops 1 or 2, got {hops!r}")
    _require(seq_len % BABI_SENTENCE == 0 and seq_len >= 3 * BABI_SENTENCE,
             f"babi needs seq_len a multiple of {BABI_SENTENCE} and >= {3 * BABI_SENTENCE}, "
             f"got {seq_len}")
    for name, value in (("num_entities", num_entities), ("num_locations", num_locations),
                        ("num_objects", num_objects)):
        _require(isinstance(value, (int, np.integer)) and value >= 1,
                 f"babi needs {name} >= 1, got {value!r}")
    _require(0 <= question_prob < 1 and 0 < move_prob < 1, f"babi needs 0 <= question_prob < 1 "
             f"and 0 < move_prob < 1, got {question_prob=}, {move_prob=}")
    ent0 = BABI_SPECIALS
    loc0, obj0 = ent0 + num_entities, ent0 + num_entities + num_locations
    n = seq_len // BABI_SENTENCE
    while True:   # a story whose last question cannot be answered is drawn again
        where = np.full(num_entities, -1)
        holder = np.full(num_objects, -1)
        inputs, targets = [], np.zeros(seq_len, np.int64)
        for i in range(n):
            known = np.flatnonzero(where >= 0)
            if hops == 2:
                askable = np.flatnonzero((holder >= 0) & (where[np.maximum(holder, 0)] >= 0))
            else:
                askable = known
            ask = len(askable) > 0 and (i == n - 1 or (i > 0 and rng.random() < question_prob))
            if ask:
                x = int(rng.choice(askable))
                answer = where[x] if hops == 1 else where[holder[x]]
                inputs += [BABI_WHERE, BABI_IS, (ent0 if hops == 1 else obj0) + x, BABI_QMARK]
                targets[BABI_SENTENCE * (i + 1) - 1] = loc0 + answer
            elif i == n - 1:
                break
            else:
                e = int(rng.integers(num_entities))
                if rng.random() < move_prob:
                    where[e] = int(rng.integers(num_locations))
                    inputs += [ent0 + e, BABI_MOVE, loc0 + where[e], BABI_DOT]
                else:
                    o = int(rng.integers(num_objects))
                    holder[o] = e
                    inputs += [ent0 + e, BABI_PICK, obj0 + o, BABI_DOT]
        if len(inputs) == seq_len:
            mask = (targets > 0).astype(np.float32)
            return _lm_example(inputs, targets, mask)


# --------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: its generator, default options and what the training loop needs to know."""
    name: str
    generate: Callable[..., Example]
    defaults: dict[str, Any]
    vocab_size: Callable[[dict[str, Any]], int]
    chance: Callable[[dict[str, Any]], float]   # accuracy of guessing among the possible answers
    num_classes: int | None = None
    # "train_<option>": <option>'s value on the train split when not None; other splits keep
    # <option>. Zoology trains on one distribution (a mixture) and tests on another.
    train_options: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def loss(self) -> str:
        return "next_token" if self.num_classes is None else "classification"

    def options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"task {self.name!r} has no options {sorted(unknown)}; it takes "
                             f"{sorted(self.defaults)}")
        return {**self.defaults, **overrides}


def _vocab_option(options):
    return options["vocab_size"]


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("delayed_recall", delayed_recall_example, {"vocab_size": 16, "delay": 8}, _vocab_option,
         lambda o: 1 / o["vocab_size"]),
    Task("mqar", mqar, {"vocab_size": 8192, "num_kv_pairs": 8, "power_a": 0.01,
                        "random_non_queries": True, "filler_avoids_keys": False,
                        "read_twice": False, "num_queries": None, "list_queries": False,
                        "train_num_kv_pairs": None, "train_power_a": None}, _vocab_option,
         lambda o: 1 / (o["vocab_size"] - o["vocab_size"] // 2),
         train_options={"train_num_kv_pairs": "num_kv_pairs", "train_power_a": "power_a"}),
    Task("copying", copying, {"vocab_size": 16, "num_tokens": 16}, _vocab_option,
         lambda o: 1 / (o["vocab_size"] - 2)),
    Task("selective_copying", selective_copying, {"vocab_size": 16, "num_tokens": 16},
         _vocab_option, lambda o: 1 / (o["vocab_size"] - 2)),
    Task("induction_heads", induction_heads, {"vocab_size": 16}, _vocab_option,
         lambda o: 1 / (o["vocab_size"] - 1)),
    Task("niah", niah, {"vocab_size": 64}, _vocab_option, lambda o: 1 / (o["vocab_size"] - 2)),
    Task("variable_copying", variable_copying, {"vocab_size": 16, "max_tokens": None},
         _vocab_option, lambda o: 1 / (o["vocab_size"] - 2)),
    Task("babi", babi, {"hops": 1, "num_entities": 4, "num_locations": 6, "num_objects": 4,
                        "question_prob": 0.25, "move_prob": 0.6}, babi_vocab,
         lambda o: 1 / o["num_locations"]),
    Task("factual_recall", factual_recall,
         {"num_individuals": 4096, "num_first_names": 128, "num_last_names": 128,
          "num_attributes": 4, "num_values": 32, "world_seed": 0, "num_topics": 0,
          "topic_token": True}, _facts_vocab,
         lambda o: 1 / o["num_values"]),
    Task("listops", listops, {"max_depth": 10, "max_args": 10, "min_length": None,
                              "max_tries": 10_000}, lambda _: LISTOPS_VOCAB, lambda _: 0.1,
         num_classes=10),
]}

SPLITS = ("train", "validation", "test")


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Example `index` of `split` has its own stream: any example can be regenerated alone."""
    split_key = zlib.crc32(split.encode())      # stable across processes, unlike hash()
    return np.random.default_rng([seed, split_key, index])


def split_options(task: str, split: str, options: dict[str, Any]) -> dict[str, Any]:
    """The generator's options for `split`: defaults filled in, and each "train_<option>" that is
    set replacing <option> on the train split only (and dropped everywhere)."""
    spec = TASKS[task]
    options = spec.options(options)
    for train_key, key in spec.train_options.items():
        value = options.pop(train_key)
        if split == "train" and value is not None:
            options[key] = value
    return options


def example(task: str, seed: int, split: str, index: int, *, seq_len: int, **options) -> Example:
    return TASKS[task].generate(example_rng(seed, split, index), seq_len=seq_len,
                                **split_options(task, split, options))
