"""MQAR with a subset of the keys queried and the queried keys listed in the prompt
(train.data.tasks.mqar `num_queries`, `list_queries`: the JRT ordering setting)."""
import numpy as np
import pytest

from train.data import tasks

PAIRS, ASKED, VOCAB = 8, 3, 64


def _example(i, seq_len=48, **options):
    return tasks.example("mqar", 0, "train", i, seq_len=seq_len, vocab_size=VOCAB,
                         num_kv_pairs=PAIRS, power_a=1.0, filler_avoids_keys=True, **options)


def _layout(ex, prompt):
    """(keys, values, queried positions) after checking each query's target is its value."""
    x, y, m = ex["inputs"], ex["targets"], ex["mask"]
    keys, values = x[0:2 * PAIRS:2], x[1:2 * PAIRS:2]
    assert len(set(keys)) == PAIRS and np.all((1 <= keys) & (keys < VOCAB // 2))
    assert np.all(values >= VOCAB // 2)
    queried = np.flatnonzero(m)
    assert np.all(queried >= prompt) and np.all(m[:prompt] == 0)
    paired = dict(zip(keys, values))
    assert all(y[t] == paired[x[t]] for t in queried)
    return keys, values, queried


def test_a_listed_subset_is_queried_once_each_after_the_list():
    for i in range(10):
        ex = _example(i, num_queries=ASKED, list_queries=True)
        prompt = 2 * PAIRS + ASKED
        keys, _, queried = _layout(ex, prompt)
        listed = ex["inputs"][2 * PAIRS:prompt]
        assert len(queried) == ASKED and len(set(listed)) == ASKED
        assert set(listed) <= set(keys)
        # the queries ask exactly the listed keys (filler avoids keys, so no stray copies)
        assert sorted(ex["inputs"][queried]) == sorted(listed)


def test_read_twice_repeats_pairs_and_list():
    block = 2 * PAIRS + ASKED
    for i in range(5):
        ex = _example(i, seq_len=2 * block + 2 * ASKED + 2, num_queries=ASKED,
                      list_queries=True, read_twice=True)
        x = ex["inputs"]
        assert np.array_equal(x[block:2 * block], x[:block])
        _layout(ex, 2 * block)


def test_subset_without_list_and_all_keys_listed():
    ex = _example(0, num_queries=ASKED)
    _, _, queried = _layout(ex, 2 * PAIRS)
    assert len(queried) == ASKED
    # num_queries = num_kv_pairs without a list is the default task, example for example
    for i in range(5):
        a, b = _example(i), _example(i, num_queries=PAIRS)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [0, PAIRS + 1, True, 1.5])
def test_bad_num_queries_is_named(bad):
    with pytest.raises(ValueError, match="num_queries"):
        _example(0, num_queries=bad)


def test_bad_list_queries_and_short_sequence_are_named():
    with pytest.raises(ValueError, match="list_queries to be a bool"):
        _example(0, num_queries=ASKED, list_queries="yes")
    # prompt 2 * 8 + 3 = 19 tokens + 2 * 3 query slots > 24
    with pytest.raises(ValueError, match="num_queries"):
        _example(0, seq_len=24, num_queries=ASKED, list_queries=True)
