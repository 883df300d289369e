"""chunked_linear_attention entries: ours (XLA chunked path) against fla's naive PyTorch
references, and the sequence length where it overtakes causal softmax attention on this machine.

Modes:
  fwd      a plain jitted call (torch: under no_grad).
  fwd+bwd  gradients of sum(o) with respect to q, k, v (and the log gate when gated)
           (torch: autograd backward of o.sum()).
Peers run in the torch venv (.peers/torch) by subprocess, back to back in the same invocation:
no gate: fla.ops.linear_attn.naive.naive_chunk_linear_attn; scalar gate:
fla.ops.simple_gla.naive.naive_chunk_simple_gla; vector gate: fla.ops.gla.naive.naive_recurrent_gla
(fla 0.6.0 has no naive chunked GLA). Throughput: the chunked form's nominal FLOPs against the
GEMM probe.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import _peers, _timing
from benchmarks.harness import Context, Row
from pallas_kernels import chunked_linear_attention

ROOT = _peers.ROOT

FULL_SHAPE = (4, 4096, 8, 64)      # B T H d (key dim = value dim = d)
QUICK_SHAPE = (1, 512, 2, 32)
CHUNK = 64
GATES = ("none", "scalar", "vector")
CROSSOVER_LENGTHS = (512, 1024, 2048, 4096, 8192)
QUICK_CROSSOVER_LENGTHS = (128, 256, 512)

_PEER_SCRIPT = r'''
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import peers
torch.set_num_threads(os.cpu_count() or 1)
B, T, H, D, chunk, repeats, budget = map(float, sys.argv[2:9])
B, T, H, D, chunk, repeats = map(int, (B, T, H, D, chunk, repeats))
f = peers.fla()
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
gs = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g) + 4)
gv = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, generator=g) + 4)
calls = {
    ("none", "fla.linear_attn"): (lambda q, k, v, g: f.linear_attn.naive_chunk_linear_attn(q, k, v)[0], None),
    ("scalar", "fla.simple_gla"): (lambda q, k, v, g: f.simple_gla.naive_chunk_simple_gla(
        q, k, v, g, chunk_size=chunk)[0], gs),
    ("vector", "fla.gla"): (lambda q, k, v, g: f.gla.naive_recurrent_gla(q, k, v, g)[0], gv),
}
out = []
for (gate, peer), (fn, lg) in calls.items():
    def fwd():
        with torch.no_grad():
            fn(q, k, v, lg)
    ms, n = timed(fwd)
    out.append(dict(gate=gate, peer=peer, mode="fwd", ms=ms, repeats=n))
    args = [x.clone().requires_grad_(True) for x in (q, k, v)]
    lga = None if lg is None else lg.clone().requires_grad_(True)
    def fwd_bwd():
        for a in args + ([lga] if lga is not None else []):
            a.grad = None
        fn(*args, lga).sum().backward()
    ms, n = timed(fwd_bwd)
    out.append(dict(gate=gate, peer=peer, mode="fwd+bwd", ms=ms, repeats=n))
print(json.dumps(out))
'''


def make_inputs(batch, length, heads, dim):
    """Decays exp(log_gate) mostly near 1 (logsigmoid(N(4, 1))), as trained gated layers have."""
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(kk, (batch, length, heads, dim)) for kk in ks[:3])
    gates = {"none": None,
             "scalar": jax.nn.log_sigmoid(jax.random.normal(ks[3], (batch, length, heads)) + 4),
             "vector": jax.nn.log_sigmoid(jax.random.normal(ks[4], (batch, length, heads, dim)) + 4)}
    return q, k, v, gates


def chunked_flops(batch, length, heads, dim, chunk, mode):
    """Nominal FLOPs of the chunked form: Q K^T and A V inside chunks (2 C^2 d each), the chunk
    states K^T V and the carried-state reads Q S (2 C d^2 each), per chunk; the backward
    recomputes the forward's products and runs about twice as many again (~3x forward)."""
    per_chunk = 4 * chunk * chunk * dim + 4 * chunk * dim * dim
    return batch * heads * (-(-length // chunk)) * per_chunk * (1 if mode == "fwd" else 4)


def run_peers(ctx: Context, shape) -> list[dict]:
    batch, length, heads, dim = shape
    return _peers.run_torch(ctx, _PEER_SCRIPT, [ROOT / ".peers", batch, length, heads, dim, CHUNK,
                                                ctx.repeats, ctx.budget_s],
                            what="fla peers") or []


def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    batch, length, heads, dim = shape
    shape_s = f"B{batch} T{length} H{heads} d{dim}"
    q, k, v, gates = make_inputs(*shape)
    rows = []
    for gate in GATES:
        op = f"chunked_linear_attention gate={gate}"
        log_gate = gates[gate]

        def ours(q, k, v, g):
            return chunked_linear_attention(q, k, v, log_gate=g, chunk_size=CHUNK,
                                            implementation="xla")[0]

        argnums = (0, 1, 2) if log_gate is None else (0, 1, 2, 3)
        fns = {"fwd": jax.jit(ours),
               "fwd+bwd": jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a)), argnums=argnums))}
        for mode, fn in fns.items():
            ctx.log(f"  {op} memzoo xla {mode}")
            ms = ctx.time(_timing.fresh_step(fn, q, k, v, log_gate))
            rows.append(Row(op, shape_s, "float32", "memzoo xla", mode, ms, role="ours",
                            flops=chunked_flops(batch, length, heads, dim, CHUNK, mode),
                            ceiling="gemm", note=ctx.last_note))
    rows.extend(matmul_floor_rows(ctx, shape))
    if ctx.peers:
        ctx.log("  chunked_linear_attention fla naive references (torch venv, subprocess)")
        for rec in run_peers(ctx, shape):
            note = "timed once: first call over the budget" if rec["repeats"] == 0 else ""
            rows.append(Row(f"chunked_linear_attention gate={rec['gate']}", shape_s, "float32",
                            f"{rec['peer']} (torch)", rec["mode"], rec["ms"], role="peer",
                            peer=rec["peer"], note=note))
    rows.extend(crossover_rows(ctx))
    return rows


def matmul_floor_rows(ctx: Context, shape) -> list[Row]:
    """The four batched products of the chunked forward alone (Q K^T, A V, Q S, K^T V per chunk),
    on operands already in chunk layout, each in whichever of the two operand layouts this XLA
    runs faster: a floor under any XLA implementation of the chunked form at this chunk size,
    so the best ratio to a peer that XLA could reach is peer / floor."""
    batch, length, heads, dim = shape
    if dim != CHUNK:
        return []    # the three forms below are the same product only for square blocks
    n = batch * heads * (length // CHUNK)
    ks = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(ks[0], (n, CHUNK, dim))
    y = jax.random.normal(ks[1], (n, CHUNK, dim))
    # All four products are [n, 64, 64] x [n, 64, 64] -> [n, 64, 64] when CHUNK == dim; the
    # contraction runs over a minor (A B^T, "nik,njk") or a major (A^T B, "nki,nkj") dimension.
    forms = {"minor": "nik,njk->nij", "major": "nki,nkj->nij", "plain": "nij,njk->nik"}
    best, best_form = None, None
    for name, spec in forms.items():
        ctx.log(f"  batched {CHUNK}x{dim} products, {name} contraction")
        fn = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
        ms = ctx.time(_timing.fresh_step(fn, x, y))
        if best is None or ms < best:
            best, best_form = ms, spec
    shape_s = f"B{batch} T{length} H{heads} d{dim}"
    note = (f"4 x the fastest batched {n} x {CHUNK}x{dim} product ({best_form}, {best:.1f} ms "
            f"each); no gates, layout copies or state scan: a floor, not a path")
    return [Row(f"chunked_linear_attention gate={gate}", shape_s, "float32",
                "floor: XLA batched matmuls alone", "fwd", 4 * best, role="ours",
                flops=chunked_flops(batch, length, heads, dim, CHUNK, "fwd"), ceiling="gemm",
                note=note) for gate in ("none", "scalar")]


def crossover_rows(ctx: Context) -> list[Row]:
    """Scalar-gated linear attention against causal softmax attention
    (jax.nn.dot_product_attention), forward, B1 H8 d64, over lengths."""
    heads, dim = (2, 32) if ctx.quick else (8, 64)
    lengths = QUICK_CROSSOVER_LENGTHS if ctx.quick else CROSSOVER_LENGTHS
    rows = []
    attention = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    ours = jax.jit(lambda q, k, v, g: chunked_linear_attention(
        q, k, v, log_gate=g, chunk_size=CHUNK, implementation="xla")[0])
    crossover = None
    for length in lengths:
        q, k, v, gates = make_inputs(1, length, heads, dim)
        shape_s = f"B1 T{length} H{heads} d{dim}"
        ctx.log(f"  crossover T={length}")
        ms_ours = ctx.time(_timing.fresh_step(ours, q, k, v, gates["scalar"]))
        note = ctx.last_note
        ms_att = ctx.time(_timing.fresh_step(attention, q, k, v))
        if crossover is None and ms_ours < ms_att:
            crossover = length
        rows.append(Row("chunked_linear_attention vs attention", shape_s, "float32", "memzoo xla",
                        "fwd", ms_ours, role="ours", ceiling="gemm", note=note,
                        flops=chunked_flops(1, length, heads, dim, CHUNK, "fwd")))
        rows.append(Row("chunked_linear_attention vs attention", shape_s, "float32",
                        "jax.nn.dot_product_attention causal", "fwd", ms_att, role="peer",
                        peer="attention", note=ctx.last_note,
                        flops=2 * 2 * heads * length * length * dim / 2))
    ctx.log(f"  chunked linear attention overtakes causal softmax attention at T = {crossover} "
            f"(first length of {lengths} where it is faster)")
    if rows:
        rows[-2].note = (rows[-2].note + "; " if rows[-2].note else "") + f"crossover T = {crossover}"
    return rows


if __name__ == "__main__":
    sys.exit("run through the harness: python -m benchmarks chunked_linear_attention")
