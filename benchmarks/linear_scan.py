"""linear_scan entries: ours (XLA path) against associative_scan, lax.scan and recurrentgemma.

Modes, each compared only with peers measured the same way:
  fresh    a plain jitted call; h is a new buffer each call.
  donated  b donated (donate_argnums=1) and h fed back as the next b: how the scan runs inside a
           larger jitted model, where b is an intermediate XLA may overwrite.
  fwd+bwd  jax.grad of sum(h) with respect to a and b.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks import _timing
from benchmarks.harness import Context, Row
from pallas_kernels import linear_scan

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".peers" / "jax" / "bin" / "python"
PEER_SCRIPT = pathlib.Path(__file__).with_name("_peer_recurrentgemma.py")
# recurrentgemma ScanType name -> short name in the ratio column.
RG_PEERS = {"LINEAR_NATIVE": "rg.linear", "ASSOCIATIVE_NATIVE": "rg.assoc"}

FULL_SHAPE = (8, 4096, 1024)
QUICK_SHAPE = (2, 256, 128)


def make_inputs(shape, dtype=jnp.float32):
    """Decays in [0, 0.5]: feeding h back as b (donated mode) then grows values by at most 2x per
    call, far from overflow over any number of repeats, so no call runs on infs."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.uniform(ka, shape, dtype, 0.0, 0.5)
    b = jax.random.normal(kb, shape, dtype)
    return a, b


# The in-process peers: what one would write without memzoo.


def associative(a, b):
    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r
    _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
    return h, h[:, -1]


def lax_scan_time_major(a, b):
    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h
    last, hs = jax.lax.scan(step, jnp.zeros_like(b[:, 0]),
                            (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
    return jnp.swapaxes(hs, 0, 1), last


def ours_xla(a, b):
    return linear_scan(a, b, implementation="xla")


def grad_of_sum(fn):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b)[0]), argnums=(0, 1)))


IN_PROCESS = (("memzoo xla", "ours", ours_xla),
              ("jax.lax.associative_scan", "assoc", associative),
              ("lax.scan time-major", "lax.scan", lax_scan_time_major))


def run_recurrentgemma(ctx: Context, shape) -> dict:
    """{(ScanType name, mode): ms or None} from recurrentgemma, timed in the peers' venv."""
    blank = {(p, m): None for p in RG_PEERS for m in ("fresh", "donated", "fwd+bwd")}
    if not PEERS_PYTHON.exists():
        ctx.log(f"recurrentgemma peers not found at {PEERS_PYTHON}; build them with "
                f"`bash ../shared/peers/setup.sh .peers` from the repo root (columns read n/a)")
        return blank
    cmd = [str(PEERS_PYTHON), str(PEER_SCRIPT), "--shape", *map(str, shape),
           "--repeats", str(ctx.repeats), "--warmup", str(ctx.warmup), "--budget", str(ctx.budget_s)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    except subprocess.TimeoutExpired:
        ctx.log("recurrentgemma peer timed out; its columns read n/a")
        return blank
    if proc.returncode != 0:
        ctx.log(f"recurrentgemma peer failed (rc {proc.returncode}); its columns read n/a:\n"
                + proc.stderr[-2000:])
        return blank
    for rec in json.loads(proc.stdout.strip().splitlines()[-1]):
        blank[(rec["scan_type"], rec["mode"])] = rec["median_ms"], rec["repeats"]
    return blank


def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    batch, length, width = shape
    shape_s = f"B{batch} T{length} D{width}"
    elems = batch * length * width
    a, b = make_inputs(shape)
    rows = []

    def add(name, short, mode, ms, arrays, note=None):
        note = ctx.last_note if note is None else note
        is_ours = short == "ours"
        # fwd+bwd nominal traffic: forward reads a, b, writes h; backward reads a, h and the
        # cotangent, writes da and db: 8 arrays, held to the fresh ceiling since da, db are new.
        rows.append(Row("linear_scan", shape_s, "float32", name, mode, ms,
                        role="ours" if is_ours else "peer", peer="" if is_ours else short,
                        bytes_moved=arrays * elems * 4.0,
                        ceiling="rw donated" if mode == "donated" else "rw fresh", note=note))

    for name, short, fn in IN_PROCESS:
        ctx.log(f"  linear_scan {name}")
        fresh = jax.jit(fn)
        add(name, short, "fresh", ctx.time(_timing.fresh_step(fresh, a, b)), 3)
        donated = jax.jit(fn, donate_argnums=1)
        add(name, short, "donated",
            ctx.time(_timing.donated_step(donated, (a, jnp.copy(b)), 1)), 3)
        add(name, short, "fwd+bwd", ctx.time(_timing.fresh_step(grad_of_sum(fn), a, b)), 8)

    if ctx.peers:
        ctx.log("  linear_scan recurrentgemma (peers' venv, subprocess)")
        for (scan_type, mode), res in run_recurrentgemma(ctx, shape).items():
            ms, repeats = res or (None, None)
            note = ("unavailable" if ms is None else "timed once, compile included: first call "
                    f"over {ctx.budget_s:.0f} s" if repeats == 0 else "")
            add(f"recurrentgemma {scan_type}", RG_PEERS[scan_type], mode, ms,
                8 if mode == "fwd+bwd" else 3, note=note)
    rows.sort(key=lambda r: ["fresh", "donated", "fwd+bwd"].index(r.mode))
    return rows


if __name__ == "__main__":
    sys.exit("run through the harness: python -m benchmarks linear_scan")
