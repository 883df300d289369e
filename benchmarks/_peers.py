"""The torch peers' side of a benchmark family: they live in their own venv (.peers/torch, built
by `bash ../shared/peers/setup.sh .peers`) and run by subprocess, back to back with ours in the
same invocation. One runner and one timing rule for every family.

A family's peer script is Python run by that venv's interpreter with its arguments in sys.argv;
it prints one JSON document as its last line of output. `TIMED` is put in front of it.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = ROOT / ".peers" / "torch" / "bin" / "python"

# The rule of _timing.time_calls on the torch side: one warm-up call, then the median of
# `repeats`; a first call slower than `budget` seconds is reported once, with repeats 0. It reads
# the script's globals `repeats` and `budget`, which every script sets from its arguments first.
TIMED = r'''
import statistics as _statistics, time as _time
def timed(step):
    t0 = _time.perf_counter(); step(); first = _time.perf_counter() - t0
    if first > budget:
        return first * 1e3, 0
    step()
    ts = []
    for _ in range(repeats):
        t0 = _time.perf_counter(); step(); ts.append((_time.perf_counter() - t0) * 1e3)
    return _statistics.median(ts), repeats
'''


def run_torch(ctx, script: str, args, *, what: str):
    """The parsed last line of `script` run by the torch venv, or None (logged) when the venv is
    missing, the run times out or fails: the peers' columns then read n/a."""
    if not TORCH_PYTHON.exists():
        ctx.log(f"torch peers not found at {TORCH_PYTHON}; build them with "
                "`bash ../shared/peers/setup.sh .peers` (columns read n/a)")
        return None
    cmd = [str(TORCH_PYTHON), "-c", TIMED + script, *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600,
                              env=dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1)))
    except subprocess.TimeoutExpired:
        ctx.log(f"{what} timed out; its columns read n/a")
        return None
    if proc.returncode != 0:
        ctx.log(f"{what} failed (rc {proc.returncode}); columns read n/a:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])
