"""memory_lookup entries: the product-key memory read (an embedding bag) against torch's
`nn.EmbeddingBag(mode="sum", per_sample_weights=...)` in the same invocation.

Shape (the issue's): 4096 bags x 32 rows x 1024 float32 from a 1 GiB table (262144 rows).
Modes:
  fwd      a plain jitted call (torch: under no_grad).
  fwd+bwd  gradients of sum(out * g) with respect to the table and the weights (torch: autograd
           backward, dense table gradient as ours: a custom VJP returns the table's shape).
Rows: ours (XLA path), `jnp.take` + einsum (the formulation the issue measured 7x slower), the
torch peer (.peers/torch, by subprocess). Throughput is bytes that must move (rows read, output
written; for fwd+bwd also the rows re-read, the cotangent read, the table gradient zero-filled
and the scattered rows read and written) held to the fresh read+write probe.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import _peers, _timing
from benchmarks.harness import Context, Row
from pallas_kernels import memory_lookup


FULL_SHAPE = (262144, 1024, 4096, 32)     # table rows, dim, bags, rows per bag
QUICK_SHAPE = (16384, 256, 512, 16)

_PEER_SCRIPT = r'''
import json, os, statistics, sys, time
import torch
torch.set_num_threads(os.cpu_count() or 1)
R, D, N, K, repeats, budget = map(float, sys.argv[1:7])
R, D, N, K, repeats = map(int, (R, D, N, K, repeats))
g = torch.Generator().manual_seed(0)
bag = torch.nn.EmbeddingBag(R, D, mode="sum")
idx = torch.randint(0, R, (N, K), generator=g)
w = torch.rand(N, K, generator=g)
cot = torch.randn(N, D, generator=g)

def fwd():
    with torch.no_grad():
        bag(idx, per_sample_weights=w)

def fwd_bwd():
    bag.weight.grad = None
    ww = w.clone().requires_grad_(True)
    (bag(idx, per_sample_weights=ww) * cot).sum().backward()

out = []
for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
    t0 = time.perf_counter(); fn(); first = time.perf_counter() - t0
    if first > budget:
        out.append({"mode": mode, "ms": first * 1e3, "repeats": 0}); continue
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    out.append({"mode": mode, "ms": statistics.median(ts), "repeats": repeats})
print(json.dumps(out))
'''


def make_inputs(rows, dim, bags, k):
    kv, ki, kw, kg = jax.random.split(jax.random.key(0), 4)
    values = jax.random.normal(kv, (rows, dim), jnp.float32)
    indices = jax.random.randint(ki, (bags, k), 0, rows, jnp.int32)
    weights = jax.random.uniform(kw, (bags, k), jnp.float32)
    cot = jax.random.normal(kg, (bags, dim), jnp.float32)
    return values, indices, weights, cot


def bytes_moved(rows, dim, bags, k, mode):
    fwd = 4.0 * (bags * k * dim + bags * dim + 2 * bags * k)
    if mode == "fwd":
        return fwd
    # re-read rows (d weights), read g, zero-fill the table gradient, scatter: read + write rows
    return fwd + 4.0 * (bags * k * dim + bags * dim + rows * dim + 2 * bags * k * dim)


def run_peer(ctx: Context, shape) -> list[dict]:
    return _peers.run_torch(ctx, _PEER_SCRIPT, [*shape, ctx.repeats, ctx.budget_s],
                            what="torch EmbeddingBag peer") or []


def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    rows_, dim, bags, k = shape
    shape_s = f"{bags} bags x {k} rows x {dim} from {rows_} rows ({rows_ * dim * 4 / 2**30:.2g} GiB)"
    values, indices, weights, cot = make_inputs(*shape)

    # Indices are arguments, as in a model: closed over, they would be a 512 KiB constant that
    # XLA folds through the gathers at compile time (minutes on this CPU).
    def ours(v, w, i):
        return memory_lookup(v, i, w, implementation="xla")

    def take_einsum(v, w, i):
        return jnp.einsum("nkd,nk->nd", jnp.take(v, i, axis=0), w)

    out = []
    for name, fn, role in (("memzoo xla", ours, "ours"),
                           ("jnp.take + einsum", take_einsum, "peer")):
        fns = {"fwd": jax.jit(fn),
               "fwd+bwd": jax.jit(jax.value_and_grad(
                   lambda v, w, i, fn=fn: jnp.sum(fn(v, w, i) * cot), argnums=(0, 1)))}
        for mode, f in fns.items():
            ctx.log(f"  memory_lookup {name} {mode}")
            ms = ctx.time(_timing.fresh_step(f, values, weights, indices))
            out.append(Row("memory_lookup", shape_s, "float32", name, mode, ms, role=role,
                           peer="take+einsum" if role == "peer" else "",
                           bytes_moved=bytes_moved(*shape, mode), ceiling="rw fresh",
                           note=ctx.last_note))
    del values
    if ctx.peers:
        ctx.log("  torch nn.EmbeddingBag (torch venv, subprocess)")
        for rec in run_peer(ctx, shape):
            note = "timed once: first call over the budget" if rec["repeats"] == 0 else ""
            out.append(Row("memory_lookup", shape_s, "float32",
                           'torch nn.EmbeddingBag(mode="sum", per_sample_weights)', rec["mode"],
                           rec["ms"], role="peer", peer="torch EmbeddingBag",
                           bytes_moved=bytes_moved(*shape, rec["mode"]), ceiling="rw fresh",
                           note=note))
    return out


if __name__ == "__main__":
    sys.exit("run through the harness: python -m benchmarks memory_lookup")
