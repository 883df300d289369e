"""train/eval.py, the language-model evaluation: bits per byte against independent numpy
computations (and equal to loss / ln 2 when every counted target is one byte), per-position sums
that add back to the mean loss, longer lengths, needle retrieval (the scoring with stub outputs
whose answer is known, and a real model's sharded scores against its full logits), the
end-of-run call and `python -m train.eval` on a checkpoint, and the errors."""
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from memzoo import losses as losses_lib
from tests.train.helpers import ROOT, subprocess_env, tiny
from train import eval as ev
from train import mesh as mesh_lib
from train.data import byte_lm
from train.data.codec import byte_codec
from train.trainer import Trainer

WORDS = ("alpha beta gamma delta river stone light cloud paper green window table market "
         "number seven orange").split()


def _documents(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS, rng.integers(3, 9))) + "."
                 for _ in range(rng.integers(3, 12))]
        docs.append(("\n".join(lines) + "\n").encode())
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(_documents(30, seed=1)):
        (root / f"doc{i:02d}.txt").write_bytes(doc)
    return root


def _bytes_sets(corpus, data_dir) -> list[str]:
    options = json.dumps({"corpus": str(corpus), "validation_fraction": 0.3})
    return ["data.task=bytes", "data.loader=data", f"data.task_options={options}",
            f"data.data_dir={data_dir}", "data.seq_len=24"]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """Two steps of a byte LM with a checkpoint, evaluated at the end of the run."""
    from train.loop import run
    base = tmp_path_factory.mktemp("lm")
    config = tiny(base / "run", *_bytes_sets(corpus, base / "data"), "optim.steps=2",
                  "checkpoint.every=2", "eval.enabled=true", "eval.length_multiples=2,4",
                  "eval.needle_trials=2")
    out = io.StringIO()
    result = run(config, out=out, devices=jax.devices()[:1])
    return config, result, out.getvalue()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """An initialised byte LM on a data=2 mesh: the batch split as training splits it."""
    config = tiny(tmp_path_factory.mktemp("sharded"), "data.task=bytes", "data.seq_len=32",
                  "data.batch_size=4", "mesh.data=2")
    trainer = Trainer(config, mesh_lib.make_mesh(config.mesh, jax.devices()[:2]),
                      vocab_size=byte_lm.VOCAB_SIZE)
    return trainer, trainer.init()


def _rows(seq_len=32, count=4, seed=0, document_ends=False) -> dict:
    rows = list(byte_lm.pack(_documents(12, seed), seq_len))
    if document_ends:   # rows where a document ends: a counted EOS target
        rows = [r for r in rows if (r["mask"] * (r["targets"] == byte_lm.EOS)).any()]
    rows = rows[:count]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _numpy_losses(trainer, state, batch) -> tuple[np.ndarray, np.ndarray]:
    """(per-token cross-entropy, argmax) in float64 from the model's full logits, eagerly."""
    model = nnx.merge(trainer.graphdef, state["params"], state["rest"])
    logits = np.asarray(model(jnp.asarray(batch["inputs"]),
                              segment_ids=jnp.asarray(batch["segment_ids"])), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return -picked, logits.argmax(-1)


def _document_positions(segment_ids: np.ndarray) -> np.ndarray:
    out = np.zeros_like(segment_ids)
    for b, row in enumerate(segment_ids):
        start = 0
        for t in range(row.size):
            if t and row[t] != row[t - 1]:
                start = t
            out[b, t] = t - start
    return out


def _position_sums(trainer, state, local, token_bytes) -> dict:
    batch = trainer.shard_batch(local)
    with jax.set_mesh(trainer.mesh):
        r = ev.position_step(trainer, batch)(state, batch, jnp.asarray(token_bytes))
    return {k: np.asarray(v, np.float64) for k, v in jax.device_get(r).items()}


# ---------------------------------------------------------------------------------------------
# Held-out metrics


def test_bits_per_byte_is_loss_over_ln2_when_every_target_is_a_byte(sharded):
    trainer, state = sharded
    local = _rows()
    local["mask"] = local["mask"] * (local["targets"] < 256)   # BOS/EOS/PAD targets left out
    sums = _position_sums(trainer, state, local, byte_codec().token_bytes)
    got = ev.summarize(sums)
    assert got["tokens"] == int(local["mask"].sum())
    assert got["bits_per_byte"] == pytest.approx(got["loss"] / math.log(2), rel=1e-12)
    loss, _ = _numpy_losses(trainer, state, local)
    np.testing.assert_allclose(got["loss"], (loss * local["mask"]).sum() / local["mask"].sum(),
                               rtol=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)


def test_bits_per_byte_against_numpy_with_special_targets_counted(sharded):
    trainer, state = sharded
    local = _rows(seed=3, document_ends=True)
    mask = local["mask"]
    # the packed rows count last byte -> EOS (a 0-byte target): bytes < tokens here
    assert ((local["targets"] == byte_lm.EOS) * mask).sum() > 0
    sums = _position_sums(trainer, state, local, byte_codec().token_bytes)
    loss, prediction = _numpy_losses(trainer, state, local)
    nbytes = ((local["targets"] < 256) * mask).sum()
    assert sums["bytes"] == nbytes < mask.sum()
    got = ev.summarize(sums)
    np.testing.assert_allclose(got["bits_per_byte"],
                               (loss * mask).sum() / (math.log(2) * nbytes), rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"],
                               ((prediction == local["targets"]) * mask).sum() / mask.sum())


def test_per_position_sums_are_exact_and_average_back_to_the_mean_loss(sharded):
    trainer, state = sharded
    local = _rows(seed=5)
    mask = local["mask"]
    sums = _position_sums(trainer, state, local, byte_codec().token_bytes)
    loss, _ = _numpy_losses(trainer, state, local)
    positions = _document_positions(local["segment_ids"])
    want_loss = np.bincount(positions.ravel(), (loss * mask).ravel(), minlength=32)
    want_count = np.bincount(positions.ravel(), mask.ravel(), minlength=32)
    np.testing.assert_allclose(sums["count"], want_count)
    np.testing.assert_allclose(sums["loss"], want_loss, rtol=1e-5, atol=1e-4)
    # the training system's own eval step (z-loss off) gives the same mean
    batch = trainer.shard_batch(local)
    with jax.set_mesh(trainer.mesh):
        r = jax.device_get(trainer.jitted_steps(batch)[1](state, batch))
    mean = float(r["loss_sum"] / r["count"])
    assert ev.summarize(sums)["loss"] == pytest.approx(mean, rel=1e-6)
    # buckets, weighted by their counts, average back to it too
    edges = ev.bucket_edges(32, 6)
    means = ev.bucket_means(sums["loss"], sums["count"], edges)
    counts = [sums["count"][lo:hi].sum() for lo, hi in zip(edges[:-1], edges[1:])]
    assert sum(m * c for m, c in zip(means, counts) if m is not None) / sum(counts) == \
        pytest.approx(mean, rel=1e-6)


@pytest.mark.parametrize("length,buckets", [(32, 6), (4096, 24), (5, 24), (1, 3)])
def test_bucket_edges_tile_the_positions(length, buckets):
    edges = ev.bucket_edges(length, buckets)
    assert edges[0] == 0 and edges[-1] == length and np.all(np.diff(edges) > 0)
    assert len(edges) - 1 <= max(buckets, 1) + 1
    means = ev.bucket_means(np.ones(length), np.ones(length), edges)
    assert means == [1.0] * (len(edges) - 1)
    # a bucket past a shorter length's sums is reported as empty
    assert ev.bucket_means(np.ones(1), np.ones(1), np.array([0, 1, 2])) == [1.0, None]


def test_chunked_per_token_losses_equal_the_whole():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 13)), jnp.int32)
    whole = losses_lib.cross_entropy_per_token(hidden, lambda h: h @ w, targets)
    chunked = losses_lib.cross_entropy_per_token(hidden, lambda h: h @ w, targets, chunk_size=4)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
    np.testing.assert_array_equal(chunked[1], whole[1])
    total, _ = losses_lib.cross_entropy_sums(hidden, lambda h: h @ w, targets)
    np.testing.assert_allclose(whole[0].sum(), total, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Needle retrieval


def _haystack() -> np.ndarray:
    return byte_codec().encode(b"\n".join(_documents(8, seed=7)).decode())


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_rows_put_the_needle_at_its_depth(depth):
    codec = byte_codec()
    batch, meta = ev.needle_rows(codec, _haystack(), 200, [depth], 2, [0, 1, 2], seed=0)
    assert batch["inputs"].shape == (3, 200) and meta[2] is None        # index 2: padding
    for r in range(2):
        number = meta[r]["number"]
        seq = np.concatenate([batch["inputs"][r], batch["targets"][r, -1:]])
        assert seq[0] == codec.bos
        text = codec.decode(seq)
        needle = ev.NEEDLE.format(number=number)
        assert text.count(needle) == 1 and 1000 <= number <= 9999
        assert text.endswith(ev.QUESTION + ev.ANSWER.format(number=number) + ev.END)
        before = text.index(needle)
        hay = len(text) - len(needle) - len(ev.QUESTION + ev.ANSWER.format(number=number)
                                             + ev.END)
        if depth == 0.0:
            assert before == 0
        elif depth == 1.0:
            assert before == hay
        else:   # at the middle, or moved to a line start near it
            cut = round(depth * hay)
            assert abs(before - cut) <= 16 and (text[before - 1] == "\n" or before == cut)
        answer = batch["targets"][r][batch["mask"][r] > 0]
        assert codec.decode(answer) == f" {number}"
        after = np.flatnonzero(batch["after"][r])
        assert after.size == 1 and codec.decode(batch["targets"][r, after]) == ev.END
    assert batch["mask"][2].sum() == 0 and batch["after"][2].sum() == 0
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_needle_scores_from_stub_outputs():
    """Stub logits: `scale` on one token per position, 0 elsewhere. On the answer the stub
    picks the target, or a wrong digit, or after the answer goes on with another digit."""
    codec = byte_codec()
    batch, meta = ev.needle_rows(codec, _haystack(), 64, [0.0, 1.0], 2, range(4), seed=1)
    v, scale = byte_lm.VOCAB_SIZE, 5.0
    picks = batch["targets"].copy()
    answer = batch["mask"] > 0
    wrong_row, digit_row = 1, 2
    first = np.flatnonzero(answer[wrong_row])[1]
    picks[wrong_row, first] = ord("0") + (batch["targets"][wrong_row, first] - ord("0") + 1) % 10
    picks[digit_row, np.flatnonzero(batch["after"][digit_row])] = ord("7")
    logits = scale * jax.nn.one_hot(picks, v)
    loss, prediction = losses_lib.token_losses(logits, jnp.asarray(batch["targets"]))
    sums = jax.device_get(ev.needle_sums(loss, prediction, {
        k: jnp.asarray(x) for k, x in batch.items()}))
    scores = ev.needle_score(sums, meta, codec)
    assert [exact for _, exact, _ in scores] == [True, False, False, True]
    hit = scale - math.log(math.exp(scale) + v - 1)      # log-softmax of the picked token
    miss = -math.log(math.exp(scale) + v - 1)
    n = answer.sum(1)
    want = [hit, ((n[1] - 1) * hit + miss) / n[1], hit, hit]
    np.testing.assert_allclose([lp for _, _, lp in scores], want, rtol=1e-5)
    assert [m["depth"] for m, _, _ in scores] == [0.0, 0.0, 1.0, 1.0]


def test_needle_scores_of_a_sharded_model_match_its_full_logits(sharded):
    trainer, state = sharded
    codec = byte_codec()
    local, meta = ev.needle_rows(codec, _haystack(), 80, [0.25, 0.75], 2, range(4), seed=2)
    batch = trainer.shard_batch(local)
    with jax.set_mesh(trainer.mesh):
        sums = jax.device_get(ev.needle_step(trainer, batch)(state, batch))
    loss, prediction = _numpy_losses(trainer, state, local)
    answer = local["mask"]
    np.testing.assert_allclose(sums["logprob"], -(loss * answer).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(sums["hits"], ((prediction == local["targets"]) * answer).sum(1))
    np.testing.assert_array_equal(sums["next"], (prediction * local["after"]).sum(1))
    for (m, exact, lp), r in zip(ev.needle_score(sums, meta, codec), range(4)):
        stops = not (ord("0") <= sums["next"][r] <= ord("9"))
        assert exact == (sums["hits"][r] == answer[r].sum() and stops)
        assert lp <= 0


# ---------------------------------------------------------------------------------------------
# The end of a run, and python -m train.eval


def test_end_of_run_evaluation(trained):
    config, result, out = trained
    run_dir = config.run_dir
    report = result["lm_eval"]
    final = json.loads(open(f"{run_dir}/final_metrics.json").read())
    assert final["lm_eval"] == json.loads(json.dumps(report))
    assert json.loads(open(f"{run_dir}/eval.json").read()) == final["lm_eval"]
    assert [r["seq_len"] for r in report["lengths"]] == [24, 48, 96]
    for row in report["lengths"]:
        assert row["tokens"] > 0 and row["batches"] >= 1
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
        assert row["bits_per_byte"] >= row["loss"] / math.log(2)   # some targets are EOS
        assert row["rows"] * row["seq_len"] == 8 * 24               # the training batch's tokens
    lp = report["loss_by_position"]
    assert lp["edges"][-1] == 96 and set(lp["loss"]) == {"24", "48", "96"}
    assert all(v is None for v, lo in zip(lp["loss"]["24"], lp["edges"]) if lo >= 24)
    needle = report["needle"]
    # every evaluated length, less those too short for the needle and question (noted)
    assert needle["lengths"] == [96] and len(needle["exact_match"][0]) == 5
    assert sum("needle retrieval at length" in n for n in report["notes"]) == 2
    assert all(0 <= x <= 1 for row in needle["exact_match"] for x in row)
    assert all(x < 0 for row in needle["answer_logprob"] for x in row)
    for name in ("eval.md", "loss_by_position.csv", "loss_by_position.md", "needle.md"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0
    csv = open(f"{run_dir}/loss_by_position.csv").read().splitlines()
    assert csv[0] == "position_start,position_end,loss@24,loss@48,loss@96"
    assert len(csv) == len(lp["edges"])
    if importlib.util.find_spec("matplotlib"):
        assert open(f"{run_dir}/loss_by_position.png", "rb").read(4) == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in out
    assert "language-model evaluation (step 2, task bytes" in out and "exact match" in out


def test_eval_command_on_the_checkpoint(trained):
    config, result, _ = trained
    run_dir = str(config.run_dir)
    out = io.StringIO()
    report = ev.run(run_dir, ["eval.length_multiples=2", "eval.needle_trials=0",
                              "eval.plot=false"], out=out, devices=jax.devices()[:1])
    assert report["step"] == 2 and "needle" not in report
    # the restored checkpoint and the same held-out batches: the end-of-run numbers again
    for got, want in zip(report["lengths"], result["lm_eval"]["lengths"][:2]):
        assert got["seq_len"] == want["seq_len"] and got["tokens"] == want["tokens"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-6)
    assert json.loads(open(f"{run_dir}/eval.json").read())["lengths"] == \
        json.loads(json.dumps(report["lengths"]))
    assert "length | x | tokens" in out.getvalue()


def test_eval_command_errors(tmp_path, capsys):
    missing = tmp_path / "nothing_here"
    assert ev.main(["--run_dir", str(missing)]) == 2
    assert f"no run directory {missing}" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ev.main(["--run_dir", str(empty)]) == 2
    assert f"{empty} holds no checkpoint" in capsys.readouterr().err
    # the module entry point itself
    proc = subprocess.run([sys.executable, "-m", "train.eval", "--run_dir", str(missing)],
                          cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "python -m train.eval: error: no run directory" in proc.stderr


def test_non_text_task(tmp_path, capsys):
    """A synthetic next-token task: loss, perplexity and loss by position, no bits per byte;
    asking for the text metrics is a clear error."""
    from train.loop import run
    run_dir = tmp_path / "run"
    run(tiny(run_dir, "optim.steps=1", "checkpoint.every=1"), out=io.StringIO(),
        devices=jax.devices()[:1])
    assert ev.main(["--run_dir", str(run_dir), "--set", "eval.text=on"]) == 2
    err = capsys.readouterr().err
    assert "'eval.text'" in err and "is not text" in err
    report = ev.run(run_dir, ["eval.length_multiples=2", "eval.plot=false"], out=io.StringIO(),
                    devices=jax.devices()[:1])
    assert [r["seq_len"] for r in report["lengths"]] == [16, 32]
    assert "bits_per_byte" not in report["lengths"][0] and "needle" not in report
    assert any("bits per byte and needle retrieval skipped" in n for n in report["notes"])


# ---------------------------------------------------------------------------------------------
# Config


def test_eval_config_errors():
    with pytest.raises(configs.ConfigError, match="'eval.text'.*delayed_recall.*not text"):
        configs.resolve(preset="smoke", sets=["eval.text=on"])
    with pytest.raises(configs.ConfigError, match="'eval.enabled'.*listops.*next-token"):
        configs.resolve(preset="smoke", sets=["data.task=listops", "data.task_options={}",
                                              "eval.enabled=true"])
    for bad, key in [("eval.length_multiples=1,2", "length_multiples"),
                     ("eval.length_multiples=2,2", "length_multiples"),
                     ("eval.length_multiples=two", "length_multiples"),
                     ("eval.needle_depths=0,1.5", "needle_depths"),
                     ("eval.needle_trials=-1", "needle_trials"), ("eval.split=train", "split"),
                     ("eval.position_buckets=0", "position_buckets")]:
        with pytest.raises(configs.ConfigError, match=f"'eval.{key}'"):
            configs.resolve(preset="smoke", sets=[bad])
    config = configs.resolve(preset="smoke", sets=["eval.length_multiples=[2, 16]",
                                                   "eval.needle_depths=0,0.5"])
    assert config.eval.length_multiples == (2, 16) and config.eval.needle_depths == (0.0, 0.5)


def test_saved_config_round_trip():
    """A checkpoint's config (JSON: tuples become lists) builds the same config, even where
    the saved values only agree with each other (learned positions shorter than the default
    data.seq_len)."""
    config = configs.resolve(preset="smoke", sets=["model.max_positions=16",
                                                   "eval.length_multiples=2,4"])
    assert configs.from_dict(json.loads(json.dumps(config.to_dict()))) == config
