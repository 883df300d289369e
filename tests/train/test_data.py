"""train.data: the generators' invariants, tfds round trips without TensorFlow, grain loaders that
are deterministic, resumable and sharded, byte-LM packing, standard datasets via mock_data, errors."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import data
from train.data import byte_lm, tasks

SIZES = {"train": 24, "validation": 8, "test": 0}


def _examples(task, n=20, seq_len=64, **options):
    return [tasks.example(task, 0, "train", i, seq_len=seq_len, **options) for i in range(n)]


def _check_lm_format(ex, seq_len):
    assert set(ex) == {"inputs", "targets", "mask"}
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("mask", np.float32)]:
        assert ex[key].dtype == dtype and ex[key].shape == (seq_len,), key


# ---------------------------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_examples_are_a_function_of_seed_split_index(task):
    options = {"vocab_size": 64} if task == "mqar" else {}
    if task == "listops":
        options = {"max_depth": 4, "min_length": 4}
    a = tasks.example(task, 3, "train", 5, seq_len=64, **options)
    b = tasks.example(task, 3, "train", 5, seq_len=64, **options)
    c = tasks.example(task, 3, "validation", 5, seq_len=64, **options)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["inputs"], c["inputs"])
    if tasks.TASKS[task].num_classes is None:
        _check_lm_format(a, 64)
        assert a["mask"].sum() > 0


def test_mqar_targets_are_the_values_paired_with_the_query_keys():
    vocab, pairs = 128, 8
    for ex in _examples("mqar", vocab_size=vocab, num_kv_pairs=pairs, power_a=0.1):
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert np.all((1 <= keys) & (keys < vocab // 2)) and len(set(keys)) == pairs
        assert np.all((vocab // 2 <= values) & (values < vocab))
        queried = np.flatnonzero(m)
        assert len(queried) == pairs and np.all(queried >= 2 * pairs)
        assert sorted(x[queried]) == sorted(keys)     # every key asked once
        paired = dict(zip(keys, values))
        assert all(y[t] == paired[x[t]] for t in queried)
        assert np.all(y[m == 0] == 0)


def _check_mqar(ex, vocab) -> int:
    """Asserts the MQAR layout (keys, values, every key queried once, targets its value);
    returns the example's number of pairs."""
    x, y, m = ex["inputs"], ex["targets"], ex["mask"]
    queried = np.flatnonzero(m)
    pairs = len(queried)
    keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
    assert np.all((1 <= keys) & (keys < vocab // 2)) and len(set(keys)) == pairs
    assert np.all((vocab // 2 <= values) & (values < vocab))
    assert np.all(queried >= 2 * pairs) and sorted(x[queried]) == sorted(keys)
    paired = dict(zip(keys, values))
    assert all(y[t] == paired[x[t]] for t in queried)
    return pairs


def test_mqar_mixture_draws_each_example_count_from_the_list():
    counts = [_check_mqar(ex, 64) for ex in _examples("mqar", n=40, vocab_size=64,
                                                       num_kv_pairs=[2, 4, 16])]
    assert set(counts) == {2, 4, 16}
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs <= seq_len"):
        _examples("mqar", n=1, vocab_size=64, num_kv_pairs=[2, 17])


def test_mqar_train_options_apply_to_the_train_split_only():
    options = dict(vocab_size=256, num_kv_pairs=8, power_a=1.0, train_num_kv_pairs=[1, 2],
                   train_power_a=0.01)
    for i in range(20):
        for split, expected in [("train", (1, 2)), ("validation", (8,))]:
            ex = tasks.example("mqar", 0, split, i, seq_len=128, **options)
            assert _check_mqar(ex, 256) in expected
    assert tasks.split_options("mqar", "train", options)["power_a"] == 0.01
    held_out = tasks.split_options("mqar", "test", options)
    assert held_out["power_a"] == 1.0 and held_out["num_kv_pairs"] == 8
    assert not any(k.startswith("train_") for k in held_out)
    # unset train_ options leave the train split alone (the same examples as without them)
    plain = tasks.example("mqar", 0, "train", 3, seq_len=64, vocab_size=64)
    same = tasks.example("mqar", 0, "train", 3, seq_len=64, vocab_size=64,
                         train_num_kv_pairs=None)
    assert all(np.array_equal(plain[k], same[k]) for k in plain)


def test_mqar_filler_avoids_keys():
    def stray_keys(**options):
        n = 0
        for ex in _examples("mqar", n=20, seq_len=64, vocab_size=64, num_kv_pairs=8, **options):
            _check_mqar(ex, 64)
            x = ex["inputs"]
            # a key occurs at its pair and at its query; anything more is filler
            n += sum(int((x == k).sum()) - 2 for k in x[0:16:2])
        return n
    assert stray_keys(filler_avoids_keys=True) == 0
    assert stray_keys() > 0     # the default draws filler over the whole vocabulary


def test_mqar_read_twice_repeats_the_context_before_the_queries():
    pairs, vocab = 8, 64
    for ex in _examples("mqar", n=10, seq_len=64, vocab_size=vocab, num_kv_pairs=pairs,
                        read_twice=True, filler_avoids_keys=True):
        x, m = ex["inputs"], ex["mask"]
        _check_mqar(ex, vocab)
        assert np.array_equal(x[2 * pairs:4 * pairs], x[:2 * pairs])
        # scored only at the queries, all after the second copy
        assert np.all(np.flatnonzero(m) >= 4 * pairs) and m.sum() == pairs
        assert np.all(m[:4 * pairs] == 0)
    # the same draws without the copy: only the layout differs
    once = tasks.example("mqar", 0, "train", 1, seq_len=32, vocab_size=vocab, num_kv_pairs=pairs)
    twice = tasks.example("mqar", 0, "train", 1, seq_len=48, vocab_size=vocab,
                          num_kv_pairs=pairs, read_twice=True)
    assert np.array_equal(once["inputs"][:2 * pairs], twice["inputs"][:2 * pairs])
    assert np.array_equal(once["targets"][2 * pairs:], twice["targets"][4 * pairs:])
    with pytest.raises(ValueError, match="6 \\* num_kv_pairs <= seq_len"):
        tasks.example("mqar", 0, "train", 0, seq_len=40, vocab_size=vocab, num_kv_pairs=pairs,
                      read_twice=True)
    with pytest.raises(ValueError, match="read_twice to be a bool"):
        tasks.example("mqar", 0, "train", 0, seq_len=64, vocab_size=vocab, read_twice="yes")


def test_mqar_small_power_a_puts_queries_near_the_context():
    def mean_gap(a):
        return np.mean([np.flatnonzero(ex["mask"]).mean() for ex in
                        _examples("mqar", n=30, seq_len=256, vocab_size=512, power_a=a)])
    assert mean_gap(0.01) < mean_gap(1.0)


@pytest.mark.parametrize("task", ["copying", "selective_copying"])
def test_copy_targets_are_the_data_tokens_in_order(task):
    n = 6
    for ex in _examples(task, seq_len=32, num_tokens=n, vocab_size=10):
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        data_tokens = x[:32 - n][x[:32 - n] >= 2]
        assert len(data_tokens) == n
        assert x[32 - n] == tasks.DELIMITER and np.all(x[32 - n + 1:] == tasks.BLANK)
        np.testing.assert_array_equal(np.flatnonzero(m), np.arange(32 - n, 32))
        np.testing.assert_array_equal(y[m == 1], data_tokens)
        if task == "copying":
            np.testing.assert_array_equal(x[:n], data_tokens)


def test_induction_heads_target_follows_the_first_trigger():
    for ex in _examples("induction_heads", vocab_size=8):
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        first, last = np.flatnonzero(x == tasks.TRIGGER)
        assert last == len(x) - 1 and np.flatnonzero(m).tolist() == [last]
        assert y[last] == x[first + 1] != tasks.TRIGGER


def test_niah_target_is_the_needle_value():
    for ex in _examples("niah", vocab_size=32):
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        (at,) = np.flatnonzero(x[:-2] == tasks.NEEDLE)
        assert x[-2] == tasks.QUERY and x[-1] == x[at + 1]
        assert np.flatnonzero(m).tolist() == [len(x) - 1] and y[-1] == x[at + 2]


def test_variable_copying_copies_every_length_up_to_max_tokens():
    lengths = set()
    for ex in _examples("variable_copying", n=60, seq_len=12, vocab_size=10):
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        (n,) = np.flatnonzero(x == tasks.DELIMITER)
        lengths.add(int(n))
        assert np.all(x[:n] >= 2) and np.all(x[n + 1:] == tasks.BLANK)
        np.testing.assert_array_equal(np.flatnonzero(m), np.arange(n, 2 * n))
        np.testing.assert_array_equal(y[m == 1], x[:n])
    assert lengths == set(range(1, 7))


@pytest.mark.parametrize("hops", [1, 2])
def test_babi_answers_follow_the_last_supporting_facts(hops):
    o = {"num_entities": 3, "num_locations": 4, "num_objects": 2}
    ent0 = tasks.BABI_SPECIALS
    loc0, obj0 = ent0 + 3, ent0 + 7
    questions = 0
    for ex in _examples("babi", n=20, seq_len=48, hops=hops, **o):
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        _check_lm_format(ex, 48)
        assert x.max() < tasks.babi_vocab(o)
        where, holder = {}, {}
        for i, (a, b, c, d) in enumerate(x.reshape(-1, 4)):   # replay the story
            last = 4 * i + 3
            if b == tasks.BABI_MOVE:
                where[a] = c
            elif b == tasks.BABI_PICK:
                holder[c] = a
            if a == tasks.BABI_WHERE:
                assert (b, d) == (tasks.BABI_IS, tasks.BABI_QMARK) and m[last] == 1
                answer = where[c] if hops == 1 else where[holder[c]]
                assert (ent0 <= c < loc0) if hops == 1 else (obj0 <= c)
                assert y[last] == answer and loc0 <= answer < obj0
                questions += 1
            else:
                assert d == tasks.BABI_DOT and m[last] == 0
        assert x[-4] == tasks.BABI_WHERE and m.sum() == np.sum(x == tasks.BABI_QMARK)
    assert questions > 20


_FACTS = {"num_individuals": 64, "num_first_names": 16, "num_last_names": 16,
          "num_attributes": 2, "num_values": 4, "world_seed": 3}


def _read_facts(ex, options, lead):
    """(individual index, attribute, value) of every fact, read back through the world itself;
    checks the layout (targets at the attribute tokens, padding after the facts) on the way."""
    names, values = tasks.facts_world(**{k: v for k, v in options.items() if k != "num_topics"})
    F, L, A, V = (options[k] for k in ("num_first_names", "num_last_names", "num_attributes",
                                       "num_values"))
    index = {(f, l): i for i, (f, l) in enumerate(names.tolist())}
    x, y, m = ex["inputs"], ex["targets"], ex["mask"]
    n = (len(x) - lead) // 4
    facts = x[lead:lead + 4 * n].reshape(n, 4)
    assert np.all(x[lead + 4 * n:] == tasks.FACTS_PAD)
    at = lead + 4 * np.arange(n) + 2
    np.testing.assert_array_equal(np.flatnonzero(m), at)
    np.testing.assert_array_equal(y[at], x[at + 1])
    out = []
    for f, l, a, v in facts.tolist():
        i, a = index[(f - 1, l - 1 - F)], a - 1 - F - L
        v -= 1 + F + L + A + a * V
        assert 0 <= a < A and v == values[i, a]         # the world's fact, in every split
        out.append((i, a))
    assert len(set(out)) == n                            # distinct (individual, attribute)
    return [i for i, _ in out]


def test_factual_recall_topics_keep_each_example_to_one_topic():
    o = dict(_FACTS, num_topics=8)
    vocab = tasks.TASKS["factual_recall"].vocab_size(tasks.TASKS["factual_recall"].options(o))
    topic0 = 1 + 16 + 16 + 2 * (1 + 4)
    assert vocab == topic0 + 8
    seen = set()
    for split in ("train", "validation"):
        for i in range(12):
            ex = tasks.example("factual_recall", 0, split, i, seq_len=34, **o)
            again = tasks.example("factual_recall", 0, split, i, seq_len=34, **o)
            assert all(np.array_equal(ex[k], again[k]) for k in ex)
            topic = int(ex["inputs"][0]) - topic0
            assert 0 <= topic < 8 and ex["mask"][0] == 0 and ex["inputs"].max() < vocab
            who = _read_facts(ex, o, lead=1)
            assert len(who) == 8 and all(i % 8 == topic for i in who)
            seen.add((split, topic))
    assert len({t for s, t in seen if s == "train"}) > 3
    assert len({t for s, t in seen if s == "validation"}) > 3
    # without the token the same facts fill the whole sequence, still one topic each
    for index in range(6):
        ex = tasks.example("factual_recall", 0, "validation", index, seq_len=32,
                           **dict(o, topic_token=False))
        who = _read_facts(ex, o, lead=0)
        assert len(who) == 8 and len({i % 8 for i in who}) == 1


def test_factual_recall_without_topics_mixes_the_world():
    topics = set()
    for index in range(6):
        ex = tasks.example("factual_recall", 0, "train", index, seq_len=34, **_FACTS)
        assert ex["inputs"].max() < 1 + 16 + 16 + 2 * 5
        topics |= {i % 8 for i in _read_facts(ex, _FACTS, lead=0)}
    assert len(topics) > 1
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(ValueError, match="num_topics"):
            tasks.example("factual_recall", 0, "train", 0, seq_len=34, num_topics=bad,
                          **_FACTS)
    with pytest.raises(ValueError, match="topic_token must be a bool"):
        tasks.example("factual_recall", 0, "train", 0, seq_len=34, num_topics=8,
                      topic_token="yes", **_FACTS)
    with pytest.raises(ValueError, match="facts"):      # 33 topics: a topic of 1 person, 2 facts
        tasks.example("factual_recall", 0, "train", 0, seq_len=34, num_topics=33, **_FACTS)


def _evaluate_listops(tokens):
    """An evaluator written apart from the generator: a stack machine over the token list."""
    names = {11: min, 12: max, 13: lambda a: int(np.median(a)), 14: lambda a: sum(a) % 10}
    stack = []
    for tok in tokens:
        if tok in names:
            stack.append((names[tok], []))
        elif tok == 15:
            fn, args = stack.pop()
            value = fn(args)
            if not stack:
                return value
            stack[-1][1].append(value)
        else:
            if not stack:
                return tok - 1
            stack[-1][1].append(tok - 1)
    raise AssertionError("unterminated expression")


def test_listops_label_is_the_expression_value():
    exs = _examples("listops", n=40, seq_len=128, max_depth=5, min_length=10)
    for ex in exs:
        x = ex["inputs"]
        tokens = x[x != tasks.LISTOPS_PAD].tolist()
        assert 10 < len(tokens) <= 128 and np.all(x[len(tokens):] == 0)
        assert ex["label"].dtype == np.int32 and ex["label"] == _evaluate_listops(tokens)
        np.testing.assert_array_equal(ex["mask"], x != 0)
    assert len({int(ex["label"]) for ex in exs}) > 3


def test_delayed_recall_moved_and_still_importable_from_train_tasks():
    from train.tasks import delayed_recall
    assert delayed_recall is tasks.delayed_recall
    x, y, m = delayed_recall(np.random.default_rng(0), 2, 12, 5, 3)
    np.testing.assert_array_equal(y[:, 3:], x[:, :-3])
    assert m[:, :3].sum() == 0 and m[:, 3:].min() == 1


# ---------------------------------------------------------------------------------------------
# tfds builders (array_record, read back with data sources)


def test_builder_round_trip_equals_the_generator(tmp_path):
    kw = dict(batch_size=4, seq_len=32, data_dir=tmp_path, sizes=SIZES, vocab_size=16)
    loader, info = data.build("selective_copying", split="validation", shuffle=False, **kw)
    assert (info.vocab_size, info.num_classes, info.loss, info.target_key) == (16, None,
                                                                                "next_token",
                                                                                "targets")
    assert info.num_examples == 8 and info.num_batches == 2 and info.chance_accuracy == 1 / 14
    source = data.GeneratedSource("selective_copying", split="validation", size=8, seq_len=32,
                                  seed=0, **tasks.TASKS["selective_copying"].options(
                                      {"vocab_size": 16}))
    batches = list(loader)
    assert len(batches) == 2
    for key in ("inputs", "targets", "mask"):
        expected = np.stack([source[i][key] for i in range(8)])
        np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), expected)
    written = sorted(tmp_path.rglob("*.array_record*"))
    assert written and all("memzoo_tasks" in str(p) for p in written)
    # Second use: the same files, nothing regenerated.
    mtimes = [p.stat().st_mtime_ns for p in written]
    data.build("selective_copying", split="train", **kw)
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("*.array_record*"))] == mtimes
    # Read back directly with tfds, as any tool would.
    ds = tfds.data_source("memzoo_tasks", split="validation", data_dir=str(tmp_path),
                          builder_kwargs={"config": written[0].parent.parent.name})
    assert len(ds) == 8


def test_classification_batches(tmp_path):
    loader, info = data.build("listops", split="train", batch_size=4, seq_len=64,
                              data_dir=tmp_path, sizes=SIZES, max_depth=4, min_length=4)
    batch = next(loader)
    assert (info.num_classes, info.loss, info.target_key, info.vocab_size) == (
        10, "classification", "label", tasks.LISTOPS_VOCAB)
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (4, 64)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMZOO_DATA_DIR", str(tmp_path / "env"))
    data.build("induction_heads", batch_size=2, seq_len=16, sizes=SIZES)
    assert list((tmp_path / "env" / "memzoo_tasks").iterdir())


# ---------------------------------------------------------------------------------------------
# grain loaders: determinism, resume, sharding


def _ids(n):
    return [{"id": np.int32(i), "x": np.full(3, i, np.int32)} for i in range(n)]


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_same_seed_same_batches_other_seed_other_order():
    kw = dict(batch_size=5, shuffle=True, shard_index=0, shard_count=1)
    a = _take(data.make_loader(_ids(30), seed=1, **kw), 12)
    b = _take(data.make_loader(_ids(30), seed=1, **kw), 12)
    c = _take(data.make_loader(_ids(30), seed=2, **kw), 12)
    assert _same(a, b) and not _same(a, c)
    first, second = (np.concatenate([x["id"] for x in a[i:i + 6]]) for i in (0, 6))
    assert sorted(first) == sorted(second) == list(range(30))   # full epochs, reshuffled
    assert not np.array_equal(first, second)
    assert a[0]["x"].shape == (5, 3) and a[0]["id"].dtype == np.int32


def test_resume_from_saved_state_continues_an_uninterrupted_run():
    kw = dict(batch_size=4, seed=7, shuffle=True, shard_index=0, shard_count=1)
    reference = _take(data.make_loader(_ids(22), **kw), 12)   # crosses epoch boundaries
    interrupted = data.make_loader(_ids(22), **kw)
    _take(interrupted, 5)
    state = json.loads(json.dumps(interrupted.get_state()))   # as a checkpoint would hold it
    resumed = data.make_loader(_ids(22), **kw)
    resumed.set_state(state)
    assert _same(_take(resumed, 7), reference[5:])


def test_build_loader_resumes(tmp_path):
    kw = dict(batch_size=3, seq_len=16, seed=0, data_dir=tmp_path, sizes=SIZES, vocab_size=8)
    reference = _take(data.build("niah", **kw)[0], 6)
    loader = data.build("niah", **kw)[0]
    _take(loader, 2)
    state = loader.get_state()
    resumed = data.build("niah", **kw)[0]
    resumed.set_state(state)
    assert _same(_take(resumed, 4), reference[2:])


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_partition_the_data(shuffle):
    seen = []
    for shard in range(2):
        loader = data.make_loader(_ids(21), batch_size=2, seed=3, shuffle=shuffle, num_epochs=1,
                                  shard_index=shard, shard_count=2)
        ids = np.concatenate([b["id"] for b in loader]).tolist()
        assert len(ids) == 10 and loader.num_batches == 5    # equal shards: 21 -> 2 x 10
        seen.append(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20


def test_default_shard_is_this_jax_process():
    loader = data.make_loader(_ids(8), batch_size=8, seed=0, shuffle=False, num_epochs=1)
    assert sorted(next(loader)["id"].tolist()) == list(range(8))    # one process: everything


# ---------------------------------------------------------------------------------------------
# Byte-level LM


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    texts = {}
    for i, length in enumerate([5, 70, 1, 300, 17, 40, 90, 3]):
        name = root / ("sub" if i % 2 else "") / f"doc{i}.txt"
        texts[name] = bytes(rng.integers(32, 127, length).astype(np.uint8))
        name.write_bytes(texts[name])
    return root, texts


def test_packing_segments_change_exactly_at_document_starts(corpus):
    _, texts = corpus
    docs = list(texts.values())
    rows = list(byte_lm.pack(docs, 32))
    for r in rows:
        x, seg, m = r["inputs"], r["segment_ids"], r["mask"]
        real = x != byte_lm.PAD
        changes = np.flatnonzero(seg[1:] != seg[:-1]) + 1
        starts = np.flatnonzero(x == byte_lm.BOS)
        # A segment begins at every BOS inside the row (and where padding starts), nowhere else.
        assert set(changes) == set(starts[starts > 0]) | set(np.flatnonzero(~real)[:1])
        assert seg[0] == 1 and np.all(seg[~real] == 0)
        assert np.all(np.diff(seg[real]) >= 0)
        # Loss never crosses a document end or reads padding.
        assert np.all(m[x == byte_lm.EOS] == 0) and np.all(m[~real] == 0)
        assert np.all(m[real & (x != byte_lm.EOS)] == 1) or r is rows[-1]
    # The rows are the stream: inputs then the last target reproduce every document in order.
    stream = np.concatenate([r["inputs"] for r in rows] + [rows[-1]["targets"][-1:]])
    stream = stream[stream != byte_lm.PAD]
    expected = np.concatenate([np.r_[byte_lm.BOS, np.frombuffer(d, np.uint8).astype(np.int32), byte_lm.EOS]
                               for d in docs])
    np.testing.assert_array_equal(stream, expected)
    for r in rows:                                   # targets are the next token
        np.testing.assert_array_equal(r["targets"][:-1], r["inputs"][1:])


def test_bytes_build_round_trip(corpus, tmp_path):
    root, texts = corpus
    kw = dict(batch_size=1, seq_len=32, data_dir=tmp_path / "dd", corpus=root,
              validation_fraction=0.3, test_fraction=0.0, data_seed=1)
    files = byte_lm.corpus_files(root)             # the corpus order: sorted paths
    assert sorted(files) == files and set(files) == set(texts)
    splits = {s: [byte_lm.split_of(str(f.resolve()), 1, 0.3, 0.0) == s for f in files]
              for s in ("train", "validation")}
    assert all(any(v) for v in splits.values())    # this seed gives both splits documents
    for split in ("train", "validation"):
        loader, info = data.build("bytes", split=split, shuffle=False, num_epochs=1, **kw)
        assert info.has_segment_ids and info.vocab_size == byte_lm.VOCAB_SIZE == 259
        batches = list(loader)
        assert batches[0]["segment_ids"].shape == (1, 32)
        got = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
        docs = [texts[f] for f, keep in zip(files, splits[split]) if keep]
        expected = np.concatenate([r["inputs"] for r in byte_lm.pack(docs, 32)])
        np.testing.assert_array_equal(got, expected[:got.size])


def test_default_corpus_is_the_standard_library():
    root, pattern = byte_lm.default_corpus()
    files = byte_lm.corpus_files(root, pattern)
    assert any(f.name == "os.py" for f in files) and len(files) > 100
    assert not any("site-packages" in f.parts for f in files)


# ---------------------------------------------------------------------------------------------
# Standard tfds datasets (mocked: their data are never on a test machine)


def test_standard_datasets_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        loader, info = data.build("mnist", batch_size=3, seq_len=None, data_dir=tmp_path,
                                  shuffle=False)
        plain = next(loader)
        assert plain["inputs"].shape == (3, 784) and plain["inputs"].dtype == np.int32
        assert plain["label"].shape == (3,) and plain["label"].dtype == np.int32
        assert (info.num_classes, info.seq_len, info.vocab_size) == (10, 784, 256)
        assert info.chance_accuracy == 0.1
        permuted = next(data.build("pmnist", batch_size=3, seq_len=784, data_dir=tmp_path,
                                   shuffle=False)[0])
        assert not np.array_equal(permuted["inputs"], plain["inputs"])
        np.testing.assert_array_equal(np.sort(permuted["inputs"]), np.sort(plain["inputs"]))
        text, info = data.build("lm1b", batch_size=2, seq_len=16, data_dir=tmp_path)
        batch = next(text)
        assert info.loss == "next_token" and info.has_segment_ids
        assert batch["inputs"].shape == batch["segment_ids"].shape == (2, 16)
        assert np.all(batch["inputs"][:, 0] == byte_lm.BOS)


# ---------------------------------------------------------------------------------------------
# Errors


def test_clear_errors(tmp_path):
    kw = dict(batch_size=2, seq_len=16, data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown task 'mqra'.*mqar.*selective_copying.*bytes"):
        data.build("mqra", **kw)
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.build("bytes", corpus=missing, **kw)
    with pytest.raises(FileNotFoundError, match=f"'mnist'.*{tmp_path}"):
        data.build("mnist", batch_size=2, seq_len=None, data_dir=tmp_path)
    with pytest.raises(ValueError, match="no options.*'num_pairs'.*num_kv_pairs"):
        data.build("mqar", num_pairs=4, **kw)
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs <= seq_len"):
        data.build("mqar", num_kv_pairs=8, **kw)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OSError, match=str(blocked)):
        data.build("niah", batch_size=2, seq_len=16, data_dir=blocked / "sub")
