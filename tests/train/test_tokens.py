"""Tokenised corpora (train/data/tokens.py, python -m train.tokenize, the "tokens" task).

One small corpus written here (a few dozen text files, multi-byte UTF-8, a file that spells the
special tokens, an empty file, a file that is not UTF-8) is tokenised once with two worker
processes; the tests check it against a direct tokenisation, the byte-LM row layout, the
loader's sharding and resume, the codec, stale / damaged outputs, errors, and a short run of the
tiny preset.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import tokenizers

import configs
from train import data
from train.data import byte_lm, codec, tokens
from train.loop import run

WORDS = ("the memory state of a recurrent model keeps what it read before and forgets slowly "
         "attention reads every token again while a scan carries one state naïve café "
         "日本語 données 🙂 résumé").split()
SPLIT_ARGS = dict(validation_fraction=0.25, test_fraction=0.25)
VOCAB = 320


def _text(rng, words: int) -> str:
    lines = []
    for _ in range(max(1, words // 12)):
        lines.append(" ".join(rng.choice(WORDS, 12)).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok") / "corpus"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(36):
        (root / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt").write_text(
            _text(rng, int(rng.integers(20, 400))), encoding="utf-8")
    (root / "special.txt").write_text("a document that spells <|eos|> and <|bos|> and <|pad|>\n")
    (root / "empty.txt").write_bytes(b"")                       # no document at all
    (root / "latin1.txt").write_bytes("café crème, naïve\n".encode("latin-1"))   # not UTF-8
    (root / "notes.md").write_text("not matched by the pattern\n")
    files = byte_lm.corpus_files(root, "**/*.txt")
    # A seed that gives every split a few documents, whatever tmp path the corpus landed in.
    seed = next(s for s in range(100) if all(
        sum(byte_lm.split_of(str(f), s, **SPLIT_ARGS) == split for f in files) >= 4
        for split in tokens.SPLITS))
    return root, files, seed


def _plan(corpus, **kw):
    root, _, seed = corpus
    return tokens.plan(corpus=root, pattern="**/*.txt", seed=seed,
                       **{"vocab_size": VOCAB, **SPLIT_ARGS, **kw})


@pytest.fixture(scope="module")
def tokenised(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "out"
    tokens.prepare(out, _plan(corpus), workers=2, num_shards=4, progress=False)
    return out, tokens.load_metadata(out)


def _texts(corpus, split):
    """The split's documents as the tokenizer sees them (invalid UTF-8 replaced)."""
    _, files, seed = corpus
    return [d.decode("utf-8", "replace")
            for d in byte_lm.documents(files, split, seed=seed, **SPLIT_ARGS)]


def _all_docs(out, meta, split):
    src = tokens.PackedRows(out, meta, split, 8)
    return [src.document(j) for j in range(src.lengths.size)]


def test_counts_match_a_direct_tokenisation(corpus, tokenised):
    out, meta = tokenised
    tok = tokens.load_tokenizer(out / "tokenizer.json")
    assert meta["vocab_size"] == tok.get_vocab_size() == VOCAB
    assert meta["special_ids"] == {"pad": 0, "bos": 1, "eos": 2}
    assert meta["num_shards"] == 4 and meta["tokenizer"]["trained"]
    not_utf8 = 0
    for split in tokens.SPLITS:
        texts = _texts(corpus, split)
        expected = [np.asarray(tok.encode(t, add_special_tokens=False).ids) for t in texts]
        got = _all_docs(out, meta, split)
        s = meta["splits"][split]
        assert s["documents"] == len(texts) == len(got) >= 4
        assert s["tokens"] == sum(e.size for e in expected)
        assert s["bytes"] == sum(len(t.encode()) for t in texts)
        np.testing.assert_array_equal(np.load(out / s["lengths"]), [e.size for e in expected])
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(g, e)
        not_utf8 += s["documents_not_utf8"]
        for e, t in zip(expected, texts):
            if "<|eos|>" in t:     # spelled specials are text, never the special ids
                assert not set(e.tolist()) & {0, 1, 2}
    assert not_utf8 == 1
    # One process writes the very same shards: the output does not depend on --workers.
    again = tokens.prepare(out.parent / "one_worker", _plan(corpus), workers=1, num_shards=4,
                           progress=False)
    for split in tokens.SPLITS:
        names = [f["name"] for f in meta["splits"][split]["files"]]
        assert names == [f["name"] for f in
                         tokens.load_metadata(again)["splits"][split]["files"]]
        for n in names:
            assert (again / n).read_bytes() == (out / n).read_bytes()


def test_codec_round_trip_and_token_bytes(corpus, tokenised):
    out, meta = tokenised
    _, info = data.build("tokens", split="validation", batch_size=1, seq_len=16, dir=out)
    c = codec.codec_for(info)
    assert (c.vocab_size, c.bos, c.eos) == (VOCAB, 1, 2)
    np.testing.assert_array_equal(c.token_bytes[:3], 0)          # the specials
    # The 256 byte symbols are one byte each; every merge stands for the bytes it spells.
    rest = c.token_bytes[3:]
    assert np.sum(rest == 1) == 256 and np.all(rest >= 1)
    tok = tokens.load_tokenizer(out / "tokenizer.json")
    # (an id that is part of a multi-byte character decodes to U+FFFD alone)
    whole = [i for i in range(3, VOCAB) if "\ufffd" not in tok.decode([i])]
    assert len(whole) > 150
    for i in whole:
        assert c.token_bytes[i] == len(tok.decode([i]).encode()), i
    for text in ("naïve café 🙂 日本語", "spelled <|bos|> stays text", " x\n\ty  ", ""):
        ids = c.encode(text)
        assert ids.dtype == np.int32 and not set(ids.tolist()) & {0, 1, 2}
        assert c.decode(ids) == text
        assert c.token_bytes[ids].sum() == len(text.encode())
    assert c.decode(np.r_[c.bos, c.encode("abc"), c.eos, 0]) == "abc"
    # Per split, the ids stand for exactly the corpus' UTF-8 bytes (what bits per byte uses).
    for split in tokens.SPLITS:
        ids = np.concatenate(_all_docs(out, meta, split)).astype(np.int64)
        utf8 = sum(len(t.encode()) for t in _texts(corpus, split))
        assert c.token_bytes[ids].sum() == meta["splits"][split]["bytes"] == utf8


@pytest.mark.parametrize("seq_len", [7, 32])
def test_rows_have_the_byte_lm_layout(tokenised, seq_len):
    out, meta = tokenised
    src = tokens.PackedRows(out, meta, "train", seq_len)
    docs = _all_docs(out, meta, "train")
    expected = list(byte_lm.pack_ids(docs, seq_len, bos=1, eos=2, pad=0))
    assert len(src) == len(expected) == byte_lm.num_rows(src.stream_len, seq_len)
    for i, want in enumerate(expected):
        row = src[i]
        assert {k: v.dtype for k, v in row.items()} == {
            "inputs": np.int32, "targets": np.int32, "mask": np.float32, "segment_ids": np.int32}
        for k in want:
            np.testing.assert_array_equal(row[k], want[k], err_msg=f"row {i} {k}")
    # The layout: segments change exactly at document starts (a BOS inside the row) and where
    # padding begins; no loss across a document end or on padding.
    for i in range(len(src)):
        r = src[i]
        x, seg, m = r["inputs"], r["segment_ids"], r["mask"]
        real = seg > 0
        changes = set(np.flatnonzero(seg[1:] != seg[:-1]) + 1)
        starts = np.flatnonzero(x == 1)
        assert changes == set(starts[starts > 0]) | set(np.flatnonzero(~real)[:1])
        assert seg[0] == 1 and np.all(x[~real] == 0)
        assert np.all(m[x == 2] == 0) and np.all(m[~real] == 0)
        assert np.all(m[real & (x != 2)] == 1)
        np.testing.assert_array_equal(r["targets"][:-1], r["inputs"][1:])
    # The rows are the stream [BOS] doc [EOS] ... in corpus order.
    rows = [src[i] for i in range(len(src))]
    stream = np.concatenate([r["inputs"] for r in rows] + [rows[-1]["targets"][-1:]])
    stream = stream[stream != 0]                 # PAD: only the tail row's end
    np.testing.assert_array_equal(stream, np.concatenate([np.r_[1, d, 2] for d in docs]))
    with pytest.raises(IndexError):
        src[len(src)]


def test_host_shards_are_disjoint_and_cover_the_rows(tokenised):
    out, meta = tokenised
    src = tokens.PackedRows(out, meta, "train", 16)
    usable = len(src) - len(src) % 3
    seen = []
    for index in range(3):
        loader, info = data.build("tokens", split="train", batch_size=1, seq_len=16, dir=out,
                                  shard_index=index, shard_count=3, shuffle=False, num_epochs=1)
        got = [b["inputs"][0] for b in loader]
        assert info.num_batches == len(got) == usable // 3
        for j, x in zip(range(index, usable, 3), got):     # shard i: rows i, i + 3, ...
            np.testing.assert_array_equal(x, src[j]["inputs"])
        seen += range(index, usable, 3)
    assert sorted(seen) == list(range(usable))             # disjoint, and together all rows


def test_iterator_state_resumes_exactly(tokenised):
    out, _ = tokenised
    kw = dict(split="train", batch_size=4, seq_len=16, dir=out, seed=3)
    loader, _ = data.build("tokens", **kw)
    for _ in range(3):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(5)]              # past an epoch's end, too
    resumed, _ = data.build("tokens", **kw)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_stale_partial_and_damaged_outputs_are_detected(corpus, tokenised, tmp_path):
    out, meta = tokenised
    stamp = (out / "metadata.json").stat().st_mtime_ns
    assert tokens.prepare(out, _plan(corpus), progress=False) == out     # up to date: reused
    assert (out / "metadata.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"--output: .*other settings.*vocab_size.*--overwrite"):
        tokens.prepare(out, _plan(corpus, vocab_size=VOCAB + 1), progress=False)
    with pytest.raises(ValueError, match=r"data.task_options.dir: .*other settings.*vocab_size"):
        data.build("tokens", batch_size=1, seq_len=8, dir=out, vocab_size=VOCAB + 1)
    # A corpus that changed after tokenising: its fingerprint no longer matches.
    root = tmp_path / "corpus"
    shutil.copytree(corpus[0], root)
    small = dict(corpus=root, pattern="**/*.txt", vocab_size=VOCAB, **SPLIT_ARGS)
    copy = tokens.prepare(tmp_path / "copy", tokens.plan(**small), workers=1, progress=False)
    with open(root / "doc01.txt", "a") as f:
        f.write("more text\n")
    with pytest.raises(ValueError, match="the corpus files"):
        tokens.prepare(copy, tokens.plan(**small), workers=1, progress=False)
    tokens.prepare(copy, tokens.plan(**small), workers=1, overwrite=True, progress=False)
    assert tokens.load_metadata(copy)["fingerprint"] == tokens.plan(**small).fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".copy")]  # no temp left
    # Damaged: a shard cut short, then the metadata gone (a partial copy).
    shard = copy / tokens.load_metadata(copy)["splits"]["train"]["files"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(ValueError, match=f"{copy}.* is damaged.*{shard.name}"):
        data.build("tokens", batch_size=1, seq_len=8, dir=copy)
    (copy / "metadata.json").unlink()
    with pytest.raises(ValueError, match="not a complete tokenised corpus"):
        data.build("tokens", batch_size=1, seq_len=8, dir=copy)
    with pytest.raises(FileExistsError, match="is not a tokenised corpus.*--overwrite"):
        tokens.prepare(copy, tokens.plan(**small), workers=1, progress=False)


def test_a_given_tokenizer(corpus, tokenised, tmp_path):
    out, meta = tokenised
    # The trained tokenizer handed back as the user's, with one special it lacks: that one is
    # added after its ids, and every document gets the same ids as before.
    p = _plan(corpus, tokenizer=out / "tokenizer.json", bos_token="<s>")
    given = tokens.prepare(tmp_path / "given", p, workers=1, progress=False)
    m = tokens.load_metadata(given)
    assert m["special_ids"] == {"pad": 0, "bos": VOCAB, "eos": 2} and m["vocab_size"] == VOCAB + 1
    assert not m["tokenizer"]["trained"]
    for split in tokens.SPLITS:
        for a, b in zip(_all_docs(out, meta, split), _all_docs(given, m, split)):
            np.testing.assert_array_equal(a, b)
    # A tokenizer that adds a prefix space does not give back the text's bytes: refused.
    shifted = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    shifted.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)
    shifted.save(str(tmp_path / "prefix.json"))
    with pytest.raises(ValueError, match="--tokenizer .*prefix.json.* byte for byte"):
        tokens.prepare(tmp_path / "prefix", _plan(corpus, tokenizer=tmp_path / "prefix.json"),
                       workers=1, progress=False)
    # A word-level tokenizer has no byte-exact ids at all.
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1},
                                                             unk_token="[UNK]"))
    words.save(str(tmp_path / "words.json"))
    with pytest.raises(ValueError, match="--tokenizer .*words.json.* is not a byte-level BPE"):
        tokens.prepare(tmp_path / "words", _plan(corpus, tokenizer=tmp_path / "words.json"),
                       workers=1, progress=False)
    assert not (tmp_path / "prefix").exists() and not (tmp_path / "words").exists()


def test_bad_arguments_give_clear_errors(corpus, tokenised, tmp_path, capsys):
    from train.tokenize import main
    root = corpus[0]
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=f"--corpus: .*{missing}"):
        tokens.plan(corpus=missing)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="--corpus: every file .* is empty"):
        tokens.plan(corpus=tmp_path / "blank")
    with pytest.raises(FileNotFoundError, match="--corpus: .*no files matching '\\*\\*/\\*.rst'"):
        tokens.plan(corpus=root, pattern="**/*.rst")
    with pytest.raises(ValueError, match="--vocab_size: expected an integer >= 259"):
        tokens.plan(corpus=root, vocab_size=200)
    with pytest.raises(ValueError, match="--test_fraction: .*< 1"):
        tokens.plan(corpus=root, validation_fraction=0.6, test_fraction=0.4)
    with pytest.raises(FileNotFoundError, match=f"--tokenizer: no such file.*{missing}"):
        tokens.plan(corpus=root, tokenizer=missing)
    with pytest.raises(ValueError, match="--workers: expected an integer >= 1"):
        tokens.prepare(tmp_path / "w", _plan(corpus), workers=0)
    with pytest.raises(ValueError, match="task 'tokens' has no options \\['vocab'\\]"):
        data.build("tokens", batch_size=1, seq_len=8, vocab=300)
    with pytest.raises(ValueError, match="data.task_options.vocab_size: expected an integer"):
        data.build("tokens", batch_size=1, seq_len=8, corpus=root, vocab_size=10)
    with pytest.raises(ValueError, match="task 'tokens' needs a seq_len"):
        data.build("tokens", batch_size=1, seq_len=None, dir=tokenised[0])
    # The command line: one line naming the argument, exit 2, no traceback.
    assert main(["--corpus", str(missing), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m train.tokenize: error: --corpus: ") and str(missing) in err
    assert "Traceback" not in err
    assert main(["--corpus", str(root), "--vocab_size", "100", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: --vocab_size: expected an integer >= 259" in err and "got 100" in err


def test_build_prepares_a_missing_corpus_and_layout_reads_metadata(corpus, tmp_path):
    root, _, seed = corpus
    kw = dict(corpus=str(root), pattern="**/*.txt", vocab_size=VOCAB, workers=1, **SPLIT_ARGS)
    loader, info = data.build("tokens", batch_size=2, seq_len=16, data_dir=tmp_path / "dd",
                              data_seed=seed, **kw)
    made = tmp_path / "dd" / "memzoo_tokens" / f"tokens_{_plan(corpus).fingerprint}"
    assert info.options == {"dir": str(made)} and info.vocab_size == VOCAB
    stamp = (made / "metadata.json").stat().st_mtime_ns
    _, again = data.build("tokens", batch_size=2, seq_len=16, data_dir=tmp_path / "dd",
                          data_seed=seed, **kw)                      # found, not rebuilt
    assert again.options == info.options and (made / "metadata.json").stat().st_mtime_ns == stamp
    batch = next(loader)
    row, vocab, classes = data.example_layout("tokens", seq_len=16, dir=str(made))
    assert (vocab, classes) == (VOCAB, None)
    assert {k: (v.shape, v.dtype) for k, v in row.items()} == {
        k: (v.shape[1:], v.dtype) for k, v in batch.items()}
    # Without data: the vocabulary asked for (example_layout reads nothing else).
    assert data.example_layout("tokens", seq_len=16, vocab_size=999)[1] == 999


def test_tiny_preset_trains_on_the_corpus(tokenised, tmp_path):
    out, _ = tokenised
    config = configs.resolve(preset="lm_tiny_tokens", sets=[
        f"run_dir={tmp_path / 'run'}", f"data.task_options={json.dumps({'dir': str(out)})}",
        "optim.steps=3", "optim.warmup_steps=1", "data.batch_size=8", "data.seq_len=64",
        "data.eval_batches=2", "logging.eval_every=0", "logging.log_every=1",
        "checkpoint.every=0", "logging.tensorboard=false", "logging.progress=false"])
    assert (config.model.d_model, config.model.num_layers) == (128, 2)
    result = run(config, out=open(os.devnull, "w"))
    losses = [row["loss"] for row in result["history"]]
    assert result["step"] == 3 and len(losses) == 3 and all(map(math.isfinite, losses))
    assert result["eval_loss"] < result["initial_eval_loss"]
