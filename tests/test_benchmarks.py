"""Smoke test of `python -m benchmarks`: the harness runs in --quick mode and its table is sane.

Peers are left out (they run in another venv, in a subprocess, and take longer than a smoke
test should); timings are not checked against anything, only that they exist.
"""
import json
import math

import pytest

from benchmarks import harness


def test_quick_linear_scan_table(tmp_path):
    out = tmp_path / "results.json"
    rows, probes = harness.run(["linear_scan", "--quick", "--no-peers", "--repeats", "2",
                                "--warmup", "0", "--json", str(out)], log=lambda msg: None)
    assert set(probes) == {"gemm", "rw fresh", "rw donated"}
    assert all(v > 0 and math.isfinite(v) for v in probes.values())

    ours = [r for r in rows if r.role == "ours"]
    assert {(r.op, r.implementation, r.mode) for r in ours} == {
        ("linear_scan", "memzoo xla", m) for m in ("fresh", "donated", "fwd+bwd")}
    for r in rows:
        assert r.ms is not None and math.isfinite(r.ms) and r.ms > 0, r
    # The in-process peers are compared with ours, mode by mode.
    for r in ours:
        assert set(r.ratios) == {"assoc", "lax.scan"}
        assert all(v > 0 and math.isfinite(v) for v in r.ratios.values())

    table = harness.format_table(rows, probes).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == list(harness.COLUMNS)
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == len(harness.COLUMNS) + 1 for line in table)

    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(rows)


def test_unknown_name_lists_known_ones(capsys):
    with pytest.raises(SystemExit):
        harness.run(["no_such_op"])
    err = capsys.readouterr().err
    assert "no_such_op" in err and "linear_scan" in err


def test_quick_train_entry():
    rows, probes = harness.run(["train", "--quick", "--no-peers", "--repeats", "2",
                                "--warmup", "0"], log=lambda msg: None)
    ours = [r for r in rows if r.role == "ours"]
    step = next(r for r in ours if r.op == "train step")
    assert step.ms is not None and step.ms > 0, step
    assert step.flops and step.flops > 0  # XLA's cost_analysis on this backend
    pct = harness.percent_of_ceiling(step, probes)
    assert pct is not None and 0 < pct and math.isfinite(pct)
    assert "steps/s" in step.note and "tok/s" in step.note

    compiles = [r for r in ours if r.op == "compile train step"]
    assert {r.implementation for r in compiles} == {"scan_layers", "unrolled"}
    for r in compiles:
        assert r.ms is not None and r.ms > 0 and "lower" in r.note, r
    table = harness.format_table(rows, probes).splitlines()
    assert len(table) == 2 + len(rows)
