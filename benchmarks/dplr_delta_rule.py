"""dplr_delta_rule entries: ours (XLA chunked WY/UT path) against fla's naive PyTorch references
of the generalised (diagonal-plus-low-rank) delta rule.

    S_t = diag(exp(w_t)) S_{t-1} + a_t (b_t^T S_{t-1}) + k_t v_t^T,   o_t = scale S_t^T q_t

Inputs are RWKV-7's kind (memzoo/linear_attention/kda.py): kappa unit-norm per head, a =
-eta kappa with eta in [0, 1], b = kappa, so the transition is a contraction; per-key-channel
log decays w = logsigmoid(N(4, 1)) (decays near 1, as trained layers have); unit-norm keys.
fla's `alpha` is contracted with the state, so it is our b and its `beta` our a.

Modes:
  fwd      a plain jitted call (torch: under no_grad).
  fwd+bwd  gradients of sum(o) with respect to q, k, v, a, b and w (torch: autograd backward
           of o.sum(), the references' own graph).
Peers run in the torch venv (.peers/torch) by subprocess, back to back in the same invocation:
fla.ops.generalized_delta_rule.dplr.naive.dplr_chunkwise (chunk 64, as ours) and
dplr_recurrence (token by token).
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import _peers, _timing
from benchmarks.harness import Context, Row
from pallas_kernels import dplr_delta_rule

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
naive = importlib.import_module("fla.ops.generalized_delta_rule.dplr.naive")
g = torch.Generator().manual_seed(0)
norm = lambda x: torch.nn.functional.normalize(x, dim=-1)
q = torch.randn(B, H, T, D, generator=g)
k = norm(torch.randn(B, H, T, D, generator=g))
v = torch.randn(B, H, T, D, generator=g)
kappa = norm(torch.randn(B, H, T, D, generator=g))
eta = torch.rand(B, H, T, 1, generator=g)
w = torch.nn.functional.logsigmoid(torch.randn(B, H, T, D, generator=g) + 4)
inputs = (q, k, v, kappa, -eta * kappa, w)     # fla's alpha = our b, its beta = our a
calls = {
    "fla.dplr_chunk": lambda q, k, v, al, be, w: naive.dplr_chunkwise(
        q, k, v, al, be, w, chunk_size=chunk)[0],
    "fla.dplr_recurrent": lambda q, k, v, al, be, w: naive.dplr_recurrence(
        q, k, v, al, be, w)[0],
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
    ks = jax.random.split(jax.random.key(0), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    shape = (batch, length, heads, dim)
    q = jax.random.normal(ks[0], shape)
    k = unit(jax.random.normal(ks[1], shape))
    v = jax.random.normal(ks[2], shape)
    kappa = unit(jax.random.normal(ks[3], shape))
    eta = jax.random.uniform(ks[4], (batch, length, heads, 1))
    w = jax.nn.log_sigmoid(jax.random.normal(ks[5], shape) + 4)
    return q, k, v, -eta * kappa, kappa, w


def run_peers(ctx: Context, shape) -> list[dict]:
    batch, length, heads, dim = shape
    return _peers.run_torch(ctx, _PEER_SCRIPT, [ROOT / ".peers", batch, length, heads, dim, CHUNK,
                                                ctx.repeats, ctx.budget_s],
                            what="fla dplr peers") or []


def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    batch, length, heads, dim = shape
    shape_s = f"B{batch} T{length} H{heads} d{dim}"
    inputs = make_inputs(*shape)
    op = "dplr_delta_rule"

    def ours(q, k, v, a, b, w):
        return dplr_delta_rule(q, k, v, a, b, log_decay=w, chunk_size=CHUNK,
                               implementation="xla")[0]

    fns = {"fwd": jax.jit(ours),
           "fwd+bwd": jax.jit(jax.grad(lambda *x: jnp.sum(ours(*x)), argnums=tuple(range(6))))}
    rows = []
    for mode, fn in fns.items():
        ctx.log(f"  {op} memzoo xla {mode}")
        ms = ctx.time(_timing.fresh_step(fn, *inputs))
        rows.append(Row(op, shape_s, "float32", "memzoo xla", mode, ms, role="ours",
                        note=ctx.last_note))
    if ctx.peers:
        ctx.log("  dplr_delta_rule fla naive references (torch venv, subprocess)")
        for rec in run_peers(ctx, shape):
            note = rec.get("error") or (
                "timed once: first call over the budget" if rec["repeats"] == 0 else "")
            rows.append(Row(op, shape_s, "float32", f"{rec['peer']} (torch)", rec["mode"],
                            rec["ms"], role="peer", peer=rec["peer"], note=note))
    return rows


if __name__ == "__main__":
    sys.exit("run through the harness: python -m benchmarks dplr_delta_rule")
