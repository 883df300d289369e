"""Timing shared by the harness and the peer scripts, so every number is taken the same way.

Imports only jax and the standard library: the peer scripts run in other virtual environments.
"""
from __future__ import annotations

import statistics
import time

import jax


def time_calls(step, *, repeats: int, warmup: int, budget_s: float | None = None) -> dict:
    """Median wall time of `step()` in ms; `step` must block on its results itself.

    The first call (compilation) and `warmup` more are discarded: the first few runs of a fresh
    executable also pay for page faults on its buffers, which a model in a training loop does not.
    If that first call alone takes longer than `budget_s`, its time (compilation included) is the
    result, with repeats 0: an entry pathologically slow should show up in the table, not stall
    the whole run for an hour.
    """
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    if budget_s is not None and first > budget_s:
        return {"median_ms": first * 1e3, "min_ms": first * 1e3, "repeats": 0}
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def fresh_step(fn, *args):
    """One call whose outputs are new buffers each time (the plain, un-donated call)."""
    def step():
        jax.block_until_ready(fn(*args))
    return step


def donated_step(fn, args, donate: int, *, feed=lambda out: out[0]):
    """One call of `fn` jitted with `args[donate]` donated; `feed(out)` is fed back into that slot.

    Feeding an output of the same shape back keeps the donated argument valid from call to call
    while the work per call stays the same, which is how the op runs inside a larger jitted model
    whose intermediates XLA reuses in place.
    """
    state = list(args)

    def step():
        out = fn(*state)
        state[donate] = feed(out)
        jax.block_until_ready(out)
    return step
