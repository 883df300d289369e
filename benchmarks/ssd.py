"""Mamba-2's SSD entries: the state-space dual form as memzoo runs it (the scalar-gated
`chunked_linear_attention`, XLA chunked path) against the Mamba-2 paper's `ssd_minimal_discrete`
(mamba-ssm, torch) at B2 T4096 H8 P64 N64.

The mapping (one home for it: memzoo/ssm/mamba2.py does the same): queries are C, keys are B,
values are the dt-scaled inputs X, the log gate is dt * A (scalar per head) and scale is 1, so
S_t = exp(dt_t A) S_{t-1} + B_t x_t^T and y_t = S_t^T C_t, which is SSD's y without the D skip.
B and C are per head here (ngroups = heads) because `ssd_minimal_discrete` takes them so.

Modes:
  fwd      a plain jitted call (torch: under no_grad).
  fwd+bwd  gradients of sum(y) with respect to X, A, B, C (torch: autograd of y.sum()).
The peer runs in the torch venv (.peers/torch) by subprocess, back to back in the same
invocation, at the same chunk (block_len) as ours. Throughput: the chunked form's nominal FLOPs
held to the GEMM probe.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import _peers, _timing
from benchmarks.chunked_linear_attention import chunked_flops
from benchmarks.harness import Context, Row
from pallas_kernels import chunked_linear_attention

ROOT = _peers.ROOT

FULL_SHAPE = (2, 4096, 8, 64, 64)   # B T H P N
QUICK_SHAPE = (1, 512, 2, 32, 16)
CHUNK = 64

_PEER_SCRIPT = r'''
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import peers
torch.set_num_threads(os.cpu_count() or 1)
b, t, h, p, n, chunk, repeats, budget = map(float, sys.argv[2:10])
b, t, h, p, n, chunk, repeats = map(int, (b, t, h, p, n, chunk, repeats))
ssd = peers.mamba().ssd_minimal_discrete
g = torch.Generator().manual_seed(0)
x = torch.randn(b, t, h, p, generator=g)
dt = torch.nn.functional.softplus(torch.randn(b, t, h, generator=g) - 4)
a = -torch.exp(torch.randn(h, generator=g)) * dt
B = torch.randn(b, t, h, n, generator=g); C = torch.randn(b, t, h, n, generator=g)
out = []
def fwd():
    with torch.no_grad():
        ssd(x, a, B, C, chunk)
ms, r = timed(fwd)
out.append(dict(mode="fwd", ms=ms, repeats=r))
args = [v.clone().requires_grad_(True) for v in (x, a, B, C)]
def fwd_bwd():
    for v in args:
        v.grad = None
    ssd(*args, chunk)[0].sum().backward()
ms, r = timed(fwd_bwd)
out.append(dict(mode="fwd+bwd", ms=ms, repeats=r))
print(json.dumps(out))
'''


def make_inputs(batch, length, heads, head_dim, state):
    """dt from softplus(N(-4, 1)) (Mamba-2's dt range), A = -exp(N(0, 1)) per head."""
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (batch, length, heads, head_dim))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (batch, length, heads)) - 4)
    log_gate = -jnp.exp(jax.random.normal(ks[2], (heads,))) * dt
    b = jax.random.normal(ks[3], (batch, length, heads, state))
    c = jax.random.normal(ks[4], (batch, length, heads, state))
    return x, log_gate, b, c


def ssd(x, log_gate, b, c):
    return chunked_linear_attention(c, b, x, log_gate=log_gate, scale=1.0, chunk_size=CHUNK,
                                    implementation="xla")[0]


def run_peer(ctx: Context, shape) -> list[dict]:
    return _peers.run_torch(ctx, _PEER_SCRIPT, [ROOT / ".peers", *shape, CHUNK, ctx.repeats,
                                                ctx.budget_s],
                            what="ssd_minimal_discrete") or []


def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    batch, length, heads, head_dim, state = shape
    shape_s = f"B{batch} T{length} H{heads} P{head_dim} N{state}"
    args = make_inputs(*shape)
    # chunked_flops counts square heads (key dim = value dim); SSD's are N x P: use their mean.
    flops = lambda mode: chunked_flops(batch, length, heads, (head_dim + state) // 2, CHUNK, mode)
    rows = []
    fns = {"fwd": jax.jit(ssd),
           "fwd+bwd": jax.jit(jax.grad(lambda *a: jnp.sum(ssd(*a)), argnums=(0, 1, 2, 3)))}
    for mode, fn in fns.items():
        ctx.log(f"  ssd memzoo xla {mode}")
        ms = ctx.time(_timing.fresh_step(fn, *args))
        rows.append(Row("ssd (Mamba-2)", shape_s, "float32",
                        "memzoo chunked_linear_attention xla", mode, ms, role="ours",
                        flops=flops(mode), ceiling="gemm", note=ctx.last_note))
    if ctx.peers:
        ctx.log("  ssd_minimal_discrete (torch venv, subprocess)")
        for rec in run_peer(ctx, shape):
            note = "timed once: first call over the budget" if rec["repeats"] == 0 else ""
            rows.append(Row("ssd (Mamba-2)", shape_s, "float32",
                            "mamba_ssm ssd_minimal_discrete (torch)", rec["mode"], rec["ms"],
                            role="peer", peer="ssd_minimal", note=note))
    return rows


if __name__ == "__main__":
    sys.exit("run through the harness: python -m benchmarks ssd")
