"""selective_scan and causal_conv1d entries: ours (XLA path) against mamba-ssm's
`selective_scan_ref` and a torch depthwise F.conv1d, and against the plain lax.scan
specification (reference.py).

Modes:
  fwd      a plain jitted call (torch: under no_grad).
  fwd+bwd  gradients of sum(y) with respect to every input (torch: autograd of y.sum()).
Peers run in the torch venv (.peers/torch) by subprocess, back to back in the same invocation.
Throughput: the nominal traffic of the scan (u, delta, z, y: 4 [B, T, C] arrays and B, C
[B, T, N] forward; about 14 [B, T, C] arrays forward and backward) held to the fresh read+write
ceiling. A memory row gives XLA's temp bytes for forward + backward at L = 16384
(`compile().memory_analysis()`), against what storing every step's state would take.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import _peers, _timing
from benchmarks.harness import Context, Row
from pallas_kernels import causal_conv1d, selective_scan

ROOT = _peers.ROOT

FULL_SCAN = (2, 2048, 1024, 16)    # B L D N: the Mamba-1 paper's benchmark shape on a CPU
QUICK_SCAN = (1, 256, 128, 16)
FULL_CONV = (2, 2048, 2048, 4)     # B L D W: Mamba-1.4B's conv (d_inner 2048, d_conv 4)
QUICK_CONV = (1, 256, 256, 4)
MEMORY_LENGTH = 16384
# selective_scan_ref's backward is quadratic in L: autograd of its per-step slice
# deltaA[:, :, i] writes a zero-filled [B, D, L, N] gradient for every step (quick run: 25 s at
# B1 D128 L256). At the full shape it would run for hours, so forward + backward against it is
# measured at this shape (ours at both).
PEER_BWD_SCAN = QUICK_SCAN

_PEER_SCRIPT = r'''
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import peers
torch.set_num_threads(os.cpu_count() or 1)
b, l, d, n, cb, cl, cd, cw, repeats, budget, scan_bwd = map(float, sys.argv[2:13])
b, l, d, n, cb, cl, cd, cw, repeats, scan_bwd = map(int, (b, l, d, n, cb, cl, cd, cw, repeats,
                                                          scan_bwd))
m = peers.mamba()
g = torch.Generator().manual_seed(0)
u = torch.randn(b, d, l, generator=g); delta = torch.randn(b, d, l, generator=g)
A = -torch.exp(torch.randn(d, n, generator=g)); B = torch.randn(b, n, l, generator=g)
C = torch.randn(b, n, l, generator=g); D = torch.randn(d, generator=g)
z = torch.randn(b, d, l, generator=g); db = torch.randn(d, generator=g)
x = torch.randn(cb, cd, cl, generator=g); w = torch.randn(cd, 1, cw, generator=g)
bias = torch.randn(cd, generator=g)
def scan(u, delta, A, B, C, D, z, db):
    return m.selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=db, delta_softplus=True)
def conv(x, w, bias):
    return torch.nn.functional.silu(torch.nn.functional.conv1d(x, w, bias, padding=cw - 1,
                                                               groups=cd)[..., :cl])
out = []
for op, fn, args in (("selective_scan", scan, (u, delta, A, B, C, D, z, db)),
                     ("causal_conv1d", conv, (x, w, bias))):
    def fwd():
        with torch.no_grad():
            fn(*args)
    ms, k = timed(fwd)
    out.append(dict(op=op, mode="fwd", ms=ms, repeats=k))
    if op == "selective_scan" and not scan_bwd:
        continue
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    def fwd_bwd():
        for a in leaves:
            a.grad = None
        fn(*leaves).sum().backward()
    ms, k = timed(fwd_bwd)
    out.append(dict(op=op, mode="fwd+bwd", ms=ms, repeats=k))
print(json.dumps(out))
'''


def scan_inputs(shape):
    batch, length, channels, state = shape
    k = jax.random.split(jax.random.key(0), 8)
    return (jax.random.normal(k[0], (batch, length, channels)),
            jax.random.normal(k[1], (batch, length, channels)),
            -jnp.exp(jax.random.normal(k[2], (channels, state))),
            jax.random.normal(k[3], (batch, length, state)),
            jax.random.normal(k[4], (batch, length, state)),
            jax.random.normal(k[5], (channels,)),
            jax.random.normal(k[6], (batch, length, channels)),
            jax.random.normal(k[7], (channels,)))


def scan_fn(implementation):
    def f(u, delta, A, B, C, D, z, db):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=db, delta_softplus=True,
                              implementation=implementation)[0]
    return f


def conv_inputs(shape):
    batch, length, channels, width = shape
    k = jax.random.split(jax.random.key(1), 3)
    return (jax.random.normal(k[0], (batch, length, channels)),
            jax.random.normal(k[1], (width, channels)), jax.random.normal(k[2], (channels,)))


def conv_fn(x, w, b):
    return causal_conv1d(x, w, bias=b, activation="silu", implementation="xla")[0]


def grad_of_sum(fn, n):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(n))))


def run_peers(ctx: Context, scan_shape, conv_shape, scan_bwd=True) -> dict:
    out = _peers.run_torch(ctx, _PEER_SCRIPT, [ROOT / ".peers", *scan_shape, *conv_shape,
                                               ctx.repeats, ctx.budget_s, int(scan_bwd)],
                           what="torch peers")
    return {(r["op"], r["mode"]): (r["ms"], r["repeats"]) for r in out or []}


def memory_row(shape) -> Row:
    batch, _, channels, state = shape
    length = MEMORY_LENGTH
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in scan_inputs((batch, 1, channels, state))]
    resize = lambda s: jax.ShapeDtypeStruct((s.shape[0], length) + s.shape[2:], s.dtype) \
        if len(s.shape) == 3 else s
    specs = [resize(s) if i in (0, 1, 3, 4, 6) else s for i, s in enumerate(specs)]
    f = grad_of_sum(scan_fn("xla"), 8)
    temp = f.lower(*specs).compile().memory_analysis().temp_size_in_bytes
    per_step = batch * length * channels * state * 4
    return Row("selective_scan", f"B{batch} D{channels} L{length} N{state}", "float32",
               "memzoo xla: XLA temp memory", "fwd+bwd", None,
               note=f"temp {temp / 2**20:.0f} MiB = {temp / (batch * length * channels * 4):.1f} "
                    f"x one [B, L, D] f32 array; every step's state would be "
                    f"{per_step / 2**20:.0f} MiB")


def run(ctx: Context) -> list[Row]:
    scan_shape = QUICK_SCAN if ctx.quick else FULL_SCAN
    conv_shape = QUICK_CONV if ctx.quick else FULL_CONV
    rows = []
    b, l, d, n = scan_shape
    scan_s = f"B{b} D{d} L{l} N{n}"
    elems = b * l * d

    def add(op, shape_s, name, short, mode, ms, nbytes, note=None):
        ours = short == "ours"
        rows.append(Row(op, shape_s, "float32", name, mode, ms, role="ours" if ours else "peer",
                        peer="" if ours else short, bytes_moved=nbytes, ceiling="rw fresh",
                        note=ctx.last_note if note is None else note))

    fwd_bytes = (4 * elems + 2 * b * l * n) * 4.0
    bwd_bytes = 14 * elems * 4.0
    args = scan_inputs(scan_shape)
    for name, short, impl in (("memzoo xla", "ours", "xla"),
                              ("lax.scan, discretisation fused (reference.py)", "lax.scan",
                               "reference")):
        ctx.log(f"  selective_scan {name}")
        add("selective_scan", scan_s, name, short, "fwd",
            ctx.time(_timing.fresh_step(jax.jit(scan_fn(impl)), *args)), fwd_bytes)
        add("selective_scan", scan_s, name, short, "fwd+bwd",
            ctx.time(_timing.fresh_step(grad_of_sum(scan_fn(impl), 8), *args)), bwd_bytes)

    cb, cl, cd, cw = conv_shape
    conv_s = f"B{cb} L{cl} D{cd} W{cw}"
    conv_elems = cb * cl * cd
    cargs = conv_inputs(conv_shape)
    ctx.log("  causal_conv1d memzoo xla")
    add("causal_conv1d", conv_s, "memzoo xla (silu)", "ours", "fwd",
        ctx.time(_timing.fresh_step(jax.jit(conv_fn), *cargs)), 2 * conv_elems * 4.0)
    add("causal_conv1d", conv_s, "memzoo xla (silu)", "ours", "fwd+bwd",
        ctx.time(_timing.fresh_step(grad_of_sum(conv_fn, 3), *cargs)), 4 * conv_elems * 4.0)

    small_bwd = not ctx.quick and PEER_BWD_SCAN != scan_shape
    if small_bwd:
        sb, sl, sd, sn = PEER_BWD_SCAN
        small_s = f"B{sb} D{sd} L{sl} N{sn}"
        ctx.log(f"  selective_scan memzoo xla fwd+bwd at {small_s}")
        add("selective_scan", small_s, "memzoo xla", "ours", "fwd+bwd",
            ctx.time(_timing.fresh_step(grad_of_sum(scan_fn("xla"), 8),
                                        *scan_inputs(PEER_BWD_SCAN))), 14 * sb * sl * sd * 4.0)

    if ctx.peers:
        ctx.log("  selective_scan / causal_conv1d torch peers (subprocess)")
        peer = run_peers(ctx, scan_shape, conv_shape, scan_bwd=not small_bwd)
        if small_bwd:
            ctx.log(f"  selective_scan_ref fwd+bwd at {small_s} (subprocess)")
            small = run_peers(ctx, PEER_BWD_SCAN, (1, 8, 8, cw))
            if ("selective_scan", "fwd+bwd") in small:
                ms, k = small[("selective_scan", "fwd+bwd")]
                add("selective_scan", small_s, "mamba_ssm selective_scan_ref", "torch",
                    "fwd+bwd", ms, 14 * sb * sl * sd * 4.0,
                    note="timed once: first call over budget" if k == 0 else "")
        for op, shape_s, name, nb in (
                ("selective_scan", scan_s, "mamba_ssm selective_scan_ref", (fwd_bytes, bwd_bytes)),
                ("causal_conv1d", conv_s, "torch F.conv1d depthwise + silu",
                 (2 * conv_elems * 4.0, 4 * conv_elems * 4.0))):
            for mode, nbytes in zip(("fwd", "fwd+bwd"), nb):
                ms, k = peer.get((op, mode), (None, None))
                if small_bwd and op == "selective_scan" and mode == "fwd+bwd":
                    continue   # measured at PEER_BWD_SCAN above
                note = ("unavailable" if ms is None else "timed once: first call over budget"
                        if k == 0 else "")
                add(op, shape_s, name, "torch", mode, ms, nbytes, note=note)
    if not ctx.quick:
        ctx.log(f"  selective_scan memory analysis at L={MEMORY_LENGTH}")
        rows.append(memory_row(scan_shape))
    rows.sort(key=lambda r: (r.op != "selective_scan", ["fwd", "fwd+bwd"].index(r.mode)))
    return rows


if __name__ == "__main__":
    sys.exit("run through the harness: python -m benchmarks selective_scan")
