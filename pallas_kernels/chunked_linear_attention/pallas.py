"""Pallas kernels for `chunked_linear_attention`: one chunk body per direction, walked by the
shared chunk launch (pallas_kernels._chunks.launch).

Each program owns one (batch * head, value block) pair and walks the chunks in order (the
backward: in reverse), carrying a key_dim x block_v state (the backward: its cotangent) in
float32. Value columns of the state evolve independently, so splitting V over programs is exact;
what sums over V (dq, dk, the gate gradients) is written per value block and summed outside.

The chunks are those of xla.py (`xla.chunk_geometry`), so the per-chunk start states the forward
writes have the XLA path's shape (platform_dependent needs every branch to agree). Each chunk is
padded at its end to the hardware's tile (a multiple of 8 or 16 rows on TPU, a power of two >= 16
on GPU) with zero q, k, v and the last token's cumulative gate and segment: such tokens change
neither the state nor any real output, so any `chunk_size` works on both targets.

The math is xla.py's: cumulative log gates b (inclusive prefix sums), to_end (suffix sums) and
the chunk's total come from `xla._cumulative` outside the kernels (clamped at xla.GATE_FLOOR),
and inside only differences <= 0 are exponentiated. A scalar gate's pair decays
exp(b_i - b_j) are one [C, C] tile; a vector gate's are walked one query row at a time (a
[C, K] tile per row), so no [C, C, K] tensor exists and no exponent is positive. The diagonal
of the intra-chunk scores carries a constant decay of 1 and is kept out of the gate gradient
(as in xla._pair_decay), so strong decays keep accurate, tiny gate gradients.

The backward (a custom VJP in __init__.py) reads the inputs and the chunk start states, carries
dS from the end, recomputes each chunk's scores, and writes dq, dk, dv and the cotangents of b,
to_end and the chunk totals; the gate gradient is then the VJP of `xla._cumulative` (reverse and
forward cumulative sums), outside the kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks
from pallas_kernels._chunks import dot as _dot, dot_nt as _dot_nt, dot_tn as _dot_tn
# mosaic_gpu.py cuts its tiles through these names of this module.
from pallas_kernels._chunks import Geometry as _Geometry, from_tiles as _from_tiles
from pallas_kernels._chunks import state_in as _state_in, to_tiles as _to_tiles
from pallas_kernels._dispatch import cuda_compute_capability, triton_interpret, use_mosaic_gpu
from pallas_kernels.chunked_linear_attention import xla as _xla

F32 = jnp.float32
_OP = "chunked_linear_attention"


class BlockSizes(_chunks.BlockSizes):
    __doc__ = _chunks.BlockSizes.__doc__
    op = _OP


# Key dims above this run the XLA path on GPU (the same chunks and chunk states): the Triton
# kernels ask 262,144 bytes of shared memory at K = 256 (H100 / H200: 232,448 per block).
GPU_MAX_KEY_DIM = 128
# Before Hopper (no wgmma: TF32x3 is three passes of warp-level mma.sync) the vector-gated
# backward kernel above this key dim took 37 s of CPU to compile for the A100 at d128 in
# bfloat16 (the H200: under 18 s for the whole fwd+bwd), over the 30 s a kernel may take:
# there that backward runs on the XLA path (delta_rule has the same rule for its backward).
GPU_PRE_HOPPER_VECTOR_BACKWARD_MAX_KEY_DIM = 64


def _scale(x, factor):
    return x if factor is None else x * factor


def _rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# The chunk bodies. Tiles: q, k [C, K]; v, do [C, Vb]; s, ds [K, Vb]; gate None or a dict with
# b, e (to_end) [C, Kg], brow [1, C] (scalar gates: b as a row) and total [Kg, 1];
# seg None or (counts [C, 1], counts [1, C]): resets since the chunk start, per token.


def _masks(c, seg):
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    m = dict(eye=row == col, strict=row > col, incl=row >= col, cid=None,
             from_start=None, to_end=None, keep=None)
    if seg is not None:
        ccol, crow = seg
        same = ccol == crow
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)
        # The last token's count as [1, 1], by a masked sum (Triton cannot slice values).
        clast = jnp.sum(jnp.where(lane == c - 1, crow, 0.0), axis=1, keepdims=True)
        m.update(strict=m["strict"] & same, incl=m["incl"] & same, cid=ccol,
                 from_start=(ccol == 0).astype(F32), to_end=(ccol == clast).astype(F32),
                 keep=(clast == 0).astype(F32))
    return m


def _factors(gate, m):
    """exp(b) (queries to the chunk start), exp(to_end) (keys to the chunk end), each [C, Kg]
    and 0 across a reset; the chunk's decay of the state [Kg, 1] (0 across a reset). None
    stands for 1."""
    eb, ee, dec = m["from_start"], m["to_end"], m["keep"]
    if gate is not None:
        eb = _scale(jnp.exp(gate["b"]), eb)
        ee = _scale(jnp.exp(gate["e"]), ee)
        dec = _scale(jnp.exp(gate["total"]), dec)
    return eb, ee, dec


def _pair_decay(gate, m):
    """Scalar gates: exp(b_i - b_j) on the strict lower triangle (same segment), else 0."""
    strict = m["strict"]
    return jnp.where(strict, jnp.exp(jnp.where(strict, gate["b"] - gate["brow"], 0.0)), 0.0)


def _vector_rows(q, k, b, m, dat=None):
    """Vector gates, one query row i at a time: A^T with at[j, i] = A_ij =
    sum_k q_ik k_jk exp(b_ik - b_jk) (j <= i, same segment), and, given dat = dA^T, the strict
    parts dq_s = (dA o P) k and dk_s = (dA o P)^T q, P_ijk = exp(b_ik - b_jk) for j < i."""
    c, kdim = q.shape
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    cid = m["cid"]

    def row(i, carry):
        sel = rows == i
        pick = lambda x: jnp.sum(jnp.where(sel, x, 0.0), axis=0, keepdims=True)   # [1, .]
        q_i = pick(q)
        before = rows < i
        if cid is not None:
            before = before & (cid == pick(cid))
        e = jnp.where(before, jnp.exp(jnp.where(before, pick(b) - b, 0.0)), 0.0)   # [C, K]
        at = jnp.where(cols == i, _rowsum(q_i * k * e), carry[0])
        if dat is None:
            return (at,)
        x = _rowsum(jnp.where(cols == i, dat, 0.0)) * e          # dA_ij P_ijk over j
        dq = jnp.where(sel, jnp.sum(x * k, axis=0, keepdims=True), carry[1])
        return at, dq, carry[2] + x * q_i

    zeros = jnp.zeros((c, kdim), F32)
    init = (jnp.zeros((c, c), F32),) + (() if dat is None else (zeros, zeros))
    at, *grads = jax.lax.fori_loop(0, c, row, init)
    # The rows wrote only j < i: the diagonal (decay exactly 1) is added once, here.
    return (at + jnp.where(m["eye"], _rowsum(q * k), 0.0), *grads)


def chunk_forward(q, k, v, s, gate, seg, *, vector):
    """One chunk: (o [C, Vb], the state leaving the chunk [K, Vb]) from the state entering it."""
    m = _masks(q.shape[0], seg)
    eb, ee, dec = _factors(gate, m)
    if vector:
        (at,) = _vector_rows(q, k, gate["b"], m)
        o = _dot_tn(at, v)
    else:
        a = _dot_nt(q, k)
        if gate is None:
            a = jnp.where(m["incl"], a, 0.0)
        else:
            a = a * _pair_decay(gate, m) + jnp.where(m["eye"], a, 0.0)
        o = _dot(a, v)
    o = o + _dot(_scale(q, eb), s)
    return o, _scale(s, dec) + _dot_tn(_scale(k, ee), v)


def chunk_backward(q, k, v, s, do, ds, gate, seg, *, vector):
    """One chunk's VJP given its start state s and the cotangent ds of its end state.

    Returns (dq, dk, dv, db, de, dtotal, ds_start): db, de [C, Kg] and dtotal [Kg, 1] are the
    cotangents of b, to_end and the chunk total (None without a gate)."""
    m = _masks(q.shape[0], seg)
    eb, ee, dec = _factors(gate, m)
    if vector:
        dat = _dot_nt(v, do)                               # dA^T: [j, i] = v_j . do_i
        at, dq_s, dk_s = _vector_rows(q, k, gate["b"], m, dat)
        ddiag = _rowsum(jnp.where(m["eye"], dat, 0.0))
        dv = _dot(at, do)
        dq, dk = dq_s + ddiag * k, dk_s + ddiag * q
        db = q * dq_s - k * dk_s
    else:
        a = _dot_nt(q, k)
        da = _dot_nt(do, v)
        if gate is None:
            a = jnp.where(m["incl"], a, 0.0)
            da = jnp.where(m["incl"], da, 0.0)
            dq, dk, db = _dot(da, k), _dot_tn(da, q), None
        else:
            p = _pair_decay(gate, m)
            ddiag = _rowsum(jnp.where(m["eye"], da, 0.0))
            a = a * p + jnp.where(m["eye"], a, 0.0)
            dap = da * p
            dq_s, dk_s = _dot(dap, k), _dot_tn(dap, q)
            dq, dk = dq_s + ddiag * k, dk_s + ddiag * q
            # b enters A only through b_i - b_j off the diagonal: +q.dq_s at i, -k.dk_s at j.
            db = _rowsum(q * dq_s - k * dk_s)
        dv = _dot_tn(a, do)
    qd, kd = _scale(q, eb), _scale(k, ee)
    dqd, dkd = _dot_nt(do, s), _dot_nt(v, ds)
    dq = dq + _scale(dqd, eb)
    dk = dk + _scale(dkd, ee)
    dv = dv + _dot(kd, ds)
    if eb is None:
        # q^T do with q itself as the transposed operand (no gate, no segments: qd is q) fails
        # in libtpu's v6e backend ("Using both transposed and non-transposed gain latches in the
        # same sequence", or a register-allocation RET_CHECK), beside q's other two products;
        # (do^T q)^T is the same product and compiles on every target.
        ds_start = _dot_tn(do, qd).T + _scale(ds, dec)
    else:
        ds_start = _dot_tn(qd, do) + _scale(ds, dec)
    if gate is None:
        return dq, dk, dv, None, None, None, ds_start
    reduce = (lambda x: x) if vector else _rowsum
    db = db + reduce(dqd * qd)
    de = reduce(dkd * kd)
    sds = _rowsum(s * ds)                                     # [K, 1]
    dtotal = dec * (sds if vector else jnp.sum(sds, axis=0, keepdims=True))
    return dq, dk, dv, db, de, dtotal, ds_start


# ---------------------------------------------------------------------------------------------
# Layout: [B, T, H, D] -> [B*H, N*Cp, width] (chunks padded at their ends) and back, in
# pallas_kernels._chunks.


def geometry(length, key_dim, value_dim, vector, chunk_size, target, dtypes,
             block_sizes: BlockSizes | None = None) -> _Geometry:
    chunk, _, _ = _xla.chunk_geometry(length, chunk_size, vector)
    bs = block_sizes or BlockSizes.get_default(target)
    # 8 rows a TPU sublane tile, 16 when a 16-bit operand packs two rows per sublane.
    sublanes = 16 if min(jnp.dtype(d).itemsize for d in dtypes) < 4 else 8
    return _chunks.geometry(_OP, length, key_dim, value_dim, chunk, target, bs.block_v,
                            sublanes=sublanes, kg=None if vector else 1)


def _operands(q, k, v, g, reset, geo, target):
    """The kernels' shared inputs: [(name, kind, width, array)], and the chunked gate."""
    batch, _, heads, _ = q.shape
    chunked = lambda x: _chunks.to_chunks(x, geo.chunk)
    ops = [("q", "seq", geo.kd, _to_tiles(chunked(q), geo, geo.kd)),
           ("k", "seq", geo.kd, _to_tiles(chunked(k), geo, geo.kd)),
           ("v", "seq", "v", _to_tiles(chunked(v), geo, geo.vd))]
    gc = None
    if g is not None:
        gc = chunked(g).astype(F32)
        b, to_end, total = _xla._cumulative(gc)
        # Edge padding: a padded row's cumulative gate is its chunk's last, so every exponent
        # it meets stays <= 0 (a zero there could overflow against strongly decayed rows).
        bt = _to_tiles(b, geo, geo.kg, edge=True)
        ops += [("b", "seq", geo.kg, bt),
                ("e", "seq", geo.kg, _to_tiles(to_end, geo, geo.kg, edge=True)),
                ("total", "total", geo.kg, _chunks.totals(total, geo, target))]
        if geo.kg == 1:
            ops.append(("brow", "row", geo.cp, _chunks.rows(bt, geo, target)))
    if reset is not None:
        # Segment starts since each chunk began: 0 where the state entering the chunk reaches.
        counts = _chunks.chunk_resets(reset, geo.chunk).astype(F32)
        counts = jnp.broadcast_to(counts[:, None, :, :, None], (batch, heads, geo.n, geo.chunk, 1))
        ct = _to_tiles(counts, geo, 1, edge=True)
        ops += [("c", "seq", 1, ct), ("crow", "row", geo.cp, _chunks.rows(ct, geo, target))]
    return ops, gc


def _chunk_args(t, names):
    gate = None
    if "b" in names:
        gate = {"b": t["b"], "e": t["e"], "total": t["total"]}
        if "brow" in names:
            gate["brow"] = t["brow"]
    seg = (t["c"], t["crow"]) if "c" in names else None
    return gate, seg


def _check_dtype(h0):
    if h0.dtype != F32:
        raise ValueError(f"{_OP}: the Pallas kernels accumulate in float32, got {h0.dtype} "
                         "(64-bit inputs take implementation='xla')")


def forward(q, k, v, g, h0, reset, *, chunk_size=None, target: str, interpret=None,
            block_sizes: BlockSizes | None = None):
    """`xla.forward_with_states` in Pallas: (o [B,T,H,V] in v's dtype, final state [B,H,K,V],
    the state entering every chunk [B,H,N,K,V])."""
    _check_dtype(h0)
    if target == "cuda" and use_mosaic_gpu(interpret):
        from pallas_kernels.chunked_linear_attention import mosaic_gpu   # imports this module
        if mosaic_gpu.supports(q, k, v, g, reset, chunk_size):
            return mosaic_gpu.forward(q, k, v, g, h0, reset, chunk_size=chunk_size,
                                      interpret=interpret)
        interpret = triton_interpret(interpret)
    if target == "cuda" and q.shape[-1] > GPU_MAX_KEY_DIM:
        return _xla.forward_with_states(q, k, v, g, h0, reset, chunk_size=chunk_size)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    vector = g is not None and g.shape[-1] > 1
    geo = geometry(length, key_dim, value_dim, vector, chunk_size, target,
                   (q.dtype, k.dtype, v.dtype), block_sizes)
    bh = batch * heads
    inputs, _ = _operands(q, k, v, g, reset, geo, target)
    names = [n for n, *_ in inputs]

    def chunk(t, s):
        gate, seg = _chunk_args(t, names)
        return chunk_forward(t["q"], t["k"], t["v"], s, gate, seg, vector=vector)

    o, final, states = _chunks.forward(
        chunk, inputs, _state_in(h0, geo), v.dtype, target=target, geo=geo, bh=bh,
        interpret=interpret, name="memzoo_chunked_linear_attention_fwd", op=_OP)
    o = _from_tiles(o, geo, (batch, length, heads, value_dim))
    final = _chunks.state_out(final, h0.shape)
    return o, final, _chunks.states_out(states, geo, (batch, heads, geo.n, key_dim, value_dim))


def backward(q, k, v, g, h0, reset, starts, do, dfinal, *, chunk_size=None, target: str,
             interpret=None, block_sizes: BlockSizes | None = None):
    """`xla.backward` in Pallas: (dq, dk, dv, dg, dh0) from the inputs and the chunk states."""
    _check_dtype(h0)
    if target == "cuda" and use_mosaic_gpu(interpret):
        from pallas_kernels.chunked_linear_attention import mosaic_gpu   # imports this module
        if mosaic_gpu.supports_backward(q, k, v, g, reset, do, chunk_size):
            return mosaic_gpu.backward(q, k, v, g, h0, reset, starts, do, dfinal,
                                       chunk_size=chunk_size, interpret=interpret)
    interpret = triton_interpret(interpret)
    vector = g is not None and g.shape[-1] > 1
    if target == "cuda" and (q.shape[-1] > GPU_MAX_KEY_DIM or (
            vector and q.shape[-1] > GPU_PRE_HOPPER_VECTOR_BACKWARD_MAX_KEY_DIM
            and (cuda_compute_capability() or 90) < 90)):
        return _xla.backward(q, k, v, g, h0, reset, starts, do, dfinal, chunk_size=chunk_size)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    geo = geometry(length, key_dim, value_dim, vector, chunk_size, target,
                   (q.dtype, k.dtype, v.dtype, do.dtype), block_sizes)
    bh = batch * heads
    inputs, gc = _operands(q, k, v, g, reset, geo, target)
    names = [n for n, *_ in inputs]
    inputs += [("starts", "state", "v", _chunks.states_in(starts.astype(F32), geo, target)),
               ("do", "seq", "v", _to_tiles(_chunks.to_chunks(do, geo.chunk), geo, geo.vd)),
               ("dfinal", "whole", "v", _state_in(dfinal.astype(F32), geo))]
    gated = g is not None

    def step(t, ds):
        gate, seg = _chunk_args(t, names)
        dq, dk, dv, db, de, dtotal, ds_start = chunk_backward(
            t["q"], t["k"], t["v"], t["starts"], t["do"], ds, gate, seg, vector=vector)
        t["dq"], t["dk"], t["dv"] = dq, dk, dv
        if gated:
            t["db"], t["de"], t["dtotal"] = db, de, dtotal
        return ds_start

    outputs = [("dq", "seq", geo.kd, F32, True), ("dk", "seq", geo.kd, F32, True),
               ("dv", "seq", "v", F32, False)]
    if gated:
        outputs += [("db", "seq", geo.kg, F32, True), ("de", "seq", geo.kg, F32, True),
                    ("dtotal", "total", geo.kg, F32, True)]
    outputs.append(("dh0", "whole", "v", F32, False))
    results = _chunks.launch(step, inputs, outputs, init="dfinal", finish="dh0", reverse=True,
                             target=target, geo=geo, bh=bh, interpret=interpret,
                             name="memzoo_chunked_linear_attention_bwd", op=_OP)
    shape_k = (batch, length, heads, key_dim)
    # What sums over V was written per value block.
    dq = _from_tiles(jnp.sum(results[0], axis=0), geo, shape_k)
    dk = _from_tiles(jnp.sum(results[1], axis=0), geo, shape_k)
    dv = _from_tiles(results[2], geo, v.shape)
    dh0 = _chunks.state_out(results[-1], h0.shape)
    dg = None
    if gated:
        kg = gc.shape[-1]
        tiles = lambda x: x.reshape(batch, heads, geo.n, geo.cp, geo.kg)[:, :, :, :geo.chunk, :kg]
        db, de = tiles(jnp.sum(results[3], axis=0)), tiles(jnp.sum(results[4], axis=0))
        dtotal = jnp.sum(results[5], axis=0).reshape(batch, heads, geo.n, geo.kg)[..., :kg]
        # The chain through the prefix / suffix sums (and the clamp) is xla.py's own.
        _, cumulative_vjp = jax.vjp(_xla._cumulative, gc)
        (dgc,) = cumulative_vjp((db, de, dtotal))
        dg = _chunks.from_chunks(dgc, length).astype(g.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dh0.astype(h0.dtype))
