"""delta_rule entries: ours (XLA chunked WY/UT path) against fla's naive PyTorch references, and
the sequence length where the delta rule overtakes causal softmax attention on this machine.

Modes:
  fwd      a plain jitted call (torch: under no_grad).
  fwd+bwd  gradients of sum(o) with respect to q, k, v, beta (and the log gate when gated)
           (torch: autograd backward of o.sum()).
Peers run in the torch venv (.peers/torch) by subprocess, back to back in the same invocation:
fla.ops.delta_rule.naive.delta_rule_chunkwise / delta_rule_recurrence and
fla.ops.gated_delta_rule.naive.naive_chunk_gated_delta_rule / naive_recurrent_gated_delta_rule.
Throughput is the nominal FLOP count of the chunked form held to the GEMM probe.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import _peers, _timing
from benchmarks.harness import Context, Row
from pallas_kernels import delta_rule

ROOT = _peers.ROOT

FULL_SHAPE = (4, 4096, 8, 64)      # B T H d (d = key dim = value dim)
QUICK_SHAPE = (1, 512, 2, 32)
CHUNK = 64
CROSSOVER_LENGTHS = (512, 1024, 2048, 4096, 8192)
QUICK_CROSSOVER_LENGTHS = (128, 256, 512)

_PEER_SCRIPT = r'''
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import peers
torch.set_num_threads(os.cpu_count() or 1)
B, T, H, D, chunk, repeats, budget, with_recurrent_bwd = map(float, sys.argv[2:10])
B, T, H, D, chunk, repeats = map(int, (B, T, H, D, chunk, repeats))
f = peers.fla()
g = torch.Generator().manual_seed(0)
q = torch.randn(B, T, H, D, generator=g)
k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
v = torch.randn(B, T, H, D, generator=g)
beta = torch.rand(B, T, H, generator=g)
lg = -torch.nn.functional.softplus(torch.randn(B, T, H, generator=g))
bhtd = lambda x: x.transpose(1, 2).contiguous()
calls = {
    ("delta_rule", "fla.chunk"): lambda q, k, v, b, lg: f.delta_rule.delta_rule_chunkwise(
        bhtd(q), bhtd(k), bhtd(v), b.transpose(1, 2).contiguous(), chunk_size=chunk)[0],
    ("delta_rule", "fla.recurrent"): lambda q, k, v, b, lg: f.delta_rule.delta_rule_recurrence(
        bhtd(q), bhtd(k), bhtd(v), b.transpose(1, 2).contiguous())[0],
    ("gated_delta_rule", "fla.chunk"): lambda q, k, v, b, lg:
        f.gated_delta_rule.naive_chunk_gated_delta_rule(q, k, v, lg, b, chunk_size=chunk)[0],
    ("gated_delta_rule", "fla.recurrent"): lambda q, k, v, b, lg:
        f.gated_delta_rule.naive_recurrent_gated_delta_rule(q, k, v, b, lg)[0],
}
out = []
for (op, peer), fn in calls.items():
    def fwd():
        with torch.no_grad():
            fn(q, k, v, beta, lg)
    ms, n = timed(fwd)
    out.append(dict(op=op, peer=peer, mode="fwd", ms=ms, repeats=n))
    if peer == "fla.recurrent" and not with_recurrent_bwd:
        continue
    args = [x.clone().requires_grad_(True) for x in (q, k, v, beta, lg)]
    def fwd_bwd():
        for a in args:
            a.grad = None
        fn(*args).sum().backward()
    ms, n = timed(fwd_bwd)
    out.append(dict(op=op, peer=peer, mode="fwd+bwd", ms=ms, repeats=n))
print(json.dumps(out))
'''


def make_inputs(batch, length, heads, dim):
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (batch, length, heads, dim))
    k = jax.random.normal(ks[1], (batch, length, heads, dim))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (batch, length, heads, dim))
    beta = jax.random.uniform(ks[3], (batch, length, heads))
    log_gate = -jax.nn.softplus(jax.random.normal(ks[4], (batch, length, heads)))
    return q, k, v, beta, log_gate


def chunked_flops(batch, length, heads, dim, chunk, mode):
    """Nominal FLOPs of the chunked form (key dim = value dim = dim): forward: K K^T, Q K^T,
    the unit-lower inverse, T Vb, T Kb, W S, Qg S, P U, Kd^T U; the backward recomputes the
    intra-chunk part and adds the transposed products (about 2.8x the forward)."""
    c, d = chunk, dim
    fwd = 2 * c * c * 5 * d + 6 * c * d * d + (2 / 3) * c ** 3
    bwd = 2 * c * c * 14 * d + 14 * c * d * d + (14 / 3) * c ** 3
    per_chunk = fwd if mode == "fwd" else fwd + bwd
    return batch * heads * (-(-length // c)) * per_chunk


def run_peers(ctx: Context, shape) -> list[dict]:
    batch, length, heads, dim = shape
    return _peers.run_torch(ctx, _PEER_SCRIPT, [ROOT / ".peers", batch, length, heads, dim, CHUNK,
                                                ctx.repeats, ctx.budget_s, int(ctx.quick)],
                            what="fla peers") or []


def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    batch, length, heads, dim = shape
    shape_s = f"B{batch} T{length} H{heads} d{dim}"
    q, k, v, beta, log_gate = make_inputs(*shape)
    rows = []
    for op, gated in (("delta_rule", False), ("gated_delta_rule", True)):
        def ours(q, k, v, beta, log_gate, gated=gated):
            return delta_rule(q, k, v, beta, log_gate=log_gate if gated else None,
                              chunk_size=CHUNK, implementation="xla")[0]

        argnums = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 3)
        fns = {"fwd": jax.jit(ours),
               "fwd+bwd": jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a)), argnums=argnums))}
        for mode, fn in fns.items():
            ctx.log(f"  {op} memzoo xla {mode}")
            ms = ctx.time(_timing.fresh_step(fn, q, k, v, beta, log_gate))
            rows.append(Row(op, shape_s, "float32", "memzoo xla", mode, ms, role="ours",
                            flops=chunked_flops(batch, length, heads, dim, CHUNK, mode),
                            ceiling="gemm", note=ctx.last_note))
    if ctx.peers:
        ctx.log("  delta_rule fla naive references (torch venv, subprocess)")
        for rec in run_peers(ctx, shape):
            note = ("timed once: first call over the budget" if rec["repeats"] == 0 else "")
            rows.append(Row(rec["op"], shape_s, "float32", f"{rec['peer']} (torch)", rec["mode"],
                            rec["ms"], role="peer", peer=rec["peer"], note=note))
    rows.extend(crossover_rows(ctx))
    return rows


def crossover_rows(ctx: Context) -> list[Row]:
    """Gated delta rule against causal softmax attention (jax.nn.dot_product_attention), forward,
    B1 H8 d64, over lengths: the first length where ours is faster is the crossover."""
    heads, dim = (2, 32) if ctx.quick else (8, 64)
    lengths = QUICK_CROSSOVER_LENGTHS if ctx.quick else CROSSOVER_LENGTHS
    rows = []
    attention = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    ours = jax.jit(lambda q, k, v, b, g: delta_rule(q, k, v, b, log_gate=g, chunk_size=CHUNK,
                                                    implementation="xla")[0])
    crossover = None
    for length in lengths:
        q, k, v, beta, log_gate = make_inputs(1, length, heads, dim)
        shape_s = f"B1 T{length} H{heads} d{dim}"
        ctx.log(f"  crossover T={length}")
        ms_ours = ctx.time(_timing.fresh_step(ours, q, k, v, beta, log_gate))
        note = ctx.last_note
        ms_att = ctx.time(_timing.fresh_step(attention, q, k, v))
        if crossover is None and ms_ours < ms_att:
            crossover = length
        rows.append(Row("gated_delta_rule vs attention", shape_s, "float32", "memzoo xla", "fwd",
                        ms_ours, role="ours", ceiling="gemm", note=note,
                        flops=chunked_flops(1, length, heads, dim, CHUNK, "fwd")))
        rows.append(Row("gated_delta_rule vs attention", shape_s, "float32",
                        "jax.nn.dot_product_attention causal", "fwd", ms_att, role="peer",
                        peer="attention", note=ctx.last_note,
                        flops=2 * 2 * heads * length * length * dim / 2))
    ctx.log(f"  delta rule overtakes causal softmax attention at T = {crossover} "
            f"(first length of {lengths} where it is faster)")
    if rows:
        rows[-2].note = (rows[-2].note + "; " if rows[-2].note else "") + \
            f"crossover T = {crossover}"
    return rows


if __name__ == "__main__":
    sys.exit("run through the harness: python -m benchmarks delta_rule")
