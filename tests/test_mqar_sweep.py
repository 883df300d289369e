"""benchmarks/mqar_sweep.py: the sweep machinery end to end at 2 steps (so it cannot rot), and
its state counts against the models' real decoding caches."""
import json

import pytest

import configs
import memzoo
from benchmarks import mqar_sweep

# Mixers whose decoding cache is the matrix state alone (no conv window, token shift or second
# copy): there the sweep's formula must equal the cache; elsewhere it must not exceed it.
_CACHE_IS_STATE = {"linear_attention", "retnet", "gla", "hgrn2", "gsa", "based", "rebased"}


def test_sweep_mixers_are_registered_and_counted_from_their_cache():
    assert set(mqar_sweep.MIXERS) <= set(memzoo.MIXERS)
    args = mqar_sweep.parse(["--sizes", "8", "--seq-len", "16", "--pairs", "4", "--vocab", "16",
                             "--steps", "2"])
    for mixer in mqar_sweep.MIXERS:
        _, state, _ = mqar_sweep.mixer_setup(mixer, 8, pairs=args.pairs)
        config = configs.resolve(preset=mqar_sweep.BASE_PRESET,
                                 sets=mqar_sweep.run_sets(mixer, 8, args))
        cache = mqar_sweep.cache_per_layer(config)
        if mixer in _CACHE_IS_STATE:
            assert state == cache, mixer
        else:
            assert 0 < state <= cache, mixer


def test_mixer_setup_rejects_bad_sizes():
    with pytest.raises(ValueError, match="`d`"):
        mqar_sweep.mixer_setup("deltanet", 7, pairs=4)
    with pytest.raises(ValueError, match="`mixer`"):
        mqar_sweep.mixer_setup("attention", 8, pairs=4)


def test_one_run_is_recorded_then_skipped(tmp_path):
    out = tmp_path / "sweep.jsonl"
    argv = ["--mixers", "linear_attention", "--sizes", "4", "--steps", "2", "--seq-len", "16",
            "--pairs", "2", "--vocab", "16", "--batch", "8", "--out", str(out)]
    logs = []
    rows = mqar_sweep.main(argv, log=logs.append)
    assert len(rows) == 1 and "error" not in rows[0], rows[0].get("error")
    r = rows[0]
    assert (r["mixer"], r["d"], r["state_per_layer"]) == ("linear_attention", 4, 4 * 4 * 5)
    assert r["cache_per_layer"] == r["state_per_layer"]
    assert 0.0 <= r["eval_accuracy"] <= 1.0 and r["num_params"] > 0
    assert "python -m train --preset mqar_s4d" in r["command"]
    assert any("| linear_attention | 80 |" in m for m in logs)
    assert out.with_suffix(".png").exists() == any(m.startswith("plot:") for m in logs)
    # The same settings again: nothing to run, the file keeps its one line.
    mqar_sweep.main(argv, log=logs.append)
    assert len(out.read_text().splitlines()) == 1
    assert json.loads(out.read_text())["setting"]["steps"] == 2
