"""rwkv6 entries: chunked_linear_attention with `bonus=` (RWKV-6's time mixing core) against
fla's naive PyTorch references of RWKV-6.

    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T,   o_t = scale (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t)

Per-key-channel log decays w = logsigmoid(N(4, 1)) (decays near 1), bonus u ~ N(0, 1) [H, K],
scale 1 (fla's naive chunked form has no scale argument).

Modes:
  fwd      a plain jitted call (torch: under no_grad).
  fwd+bwd  gradients of sum(o) with respect to q, k, v, w and u (torch: autograd backward of
           o.sum()).
Peers run in the torch venv (.peers/torch) by subprocess, back to back in the same invocation:
fla.ops.rwkv6.chunk_naive.naive_chunk_rwkv6 (chunk 64, as ours) and
fla.ops.rwkv6.recurrent_naive.naive_recurrent_rwkv6 (token by token).
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import _peers, _timing
from benchmarks.harness import Context, Row
from pallas_kernels import chunked_linear_attention

ROOT = _peers.ROOT

FULL_SHAPE = (2, 1024, 4, 64)      # B T H d (key dim = value dim = d)
QUICK_SHAPE = (1, 256, 2, 32)
CHUNK = 64

_PEER_SCRIPT = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import importlib
import torch
torch.set_num_threads(os.cpu_count() or 1)
B, T, H, D, chunk, repeats, budget = map(float, sys.argv[2:9])
B, T, H, D, chunk, repeats = map(int, (B, T, H, D, chunk, repeats))
chunked = importlib.import_module("fla.ops.rwkv6.chunk_naive")
recurrent = importlib.import_module("fla.ops.rwkv6.recurrent_naive")
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
w = torch.nn.functional.logsigmoid(torch.randn(B, H, T, D, generator=g) + 4)
u = torch.randn(H, D, generator=g)
inputs = (q, k, v, w, u)
calls = {
    "fla.rwkv6_chunk": lambda q, k, v, w, u: chunked.naive_chunk_rwkv6(
        q, k, v, w, u, chunk_size=chunk),
    "fla.rwkv6_recurrent": lambda q, k, v, w, u: recurrent.naive_recurrent_rwkv6(
        q, k, v, w, u, scale=1.0)[0],
}
out = []
for peer, fn in calls.items():
    def fwd():
        with torch.no_grad():
            fn(*inputs)
    ms, n = timed(fwd)
    out.append(dict(peer=peer, mode="fwd", ms=ms, repeats=n))
    args = [x.clone().requires_grad_(True) for x in inputs]
    def fwd_bwd():
        for a in args:
            a.grad = None
        fn(*args).sum().backward()
    try:
        ms, n = timed(fwd_bwd)
    except RuntimeError as e:     # a reference whose in-place writes autograd refuses
        out.append(dict(peer=peer, mode="fwd+bwd", ms=None, repeats=0, error=str(e)[:200]))
        continue
    out.append(dict(peer=peer, mode="fwd+bwd", ms=ms, repeats=n))
print(json.dumps(out))
'''


def make_inputs(batch, length, heads, dim):
    ks = jax.random.split(jax.random.key(0), 5)
    shape = (batch, length, heads, dim)
    q, k, v = (jax.random.normal(kk, shape) for kk in ks[:3])
    w = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 4)
    u = jax.random.normal(ks[4], (heads, dim))
    return q, k, v, w, u


def run_peers(ctx: Context, shape) -> list[dict]:
    batch, length, heads, dim = shape
    return _peers.run_torch(ctx, _PEER_SCRIPT, [ROOT / ".peers", batch, length, heads, dim, CHUNK,
                                                ctx.repeats, ctx.budget_s],
                            what="fla rwkv6 peers") or []


def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    batch, length, heads, dim = shape
    shape_s = f"B{batch} T{length} H{heads} d{dim}"
    inputs = make_inputs(*shape)
    op = "chunked_linear_attention bonus= (rwkv6)"

    def ours(q, k, v, w, u):
        return chunked_linear_attention(q, k, v, log_gate=w, bonus=u, scale=1.0,
                                        chunk_size=CHUNK, implementation="xla")[0]

    fns = {"fwd": jax.jit(ours),
           "fwd+bwd": jax.jit(jax.grad(lambda *x: jnp.sum(ours(*x)), argnums=tuple(range(5))))}
    rows = []
    for mode, fn in fns.items():
        ctx.log(f"  {op} memzoo xla {mode}")
        ms = ctx.time(_timing.fresh_step(fn, *inputs))
        rows.append(Row(op, shape_s, "float32", "memzoo xla", mode, ms, role="ours",
                        note=ctx.last_note))
    if ctx.peers:
        ctx.log("  rwkv6 fla naive references (torch venv, subprocess)")
        for rec in run_peers(ctx, shape):
            note = rec.get("error") or (
                "timed once: first call over the budget" if rec["repeats"] == 0 else "")
            rows.append(Row(op, shape_s, "float32", f"{rec['peer']} (torch)", rec["mode"],
                            rec["ms"], role="peer", peer=rec["peer"], note=note))
    return rows


if __name__ == "__main__":
    sys.exit("run through the harness: python -m benchmarks rwkv6")
