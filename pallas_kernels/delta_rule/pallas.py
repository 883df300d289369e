"""Pallas kernels for `delta_rule`: one chunk body (the WY / UT form of xla.py) per direction,
walked by the shared chunk launch (pallas_kernels._chunks.launch).

Each program owns one (batch * head, value block) pair and walks the chunks in order, carrying
the K x block_v state in float32. Value columns of the state evolve independently (the write
u = beta (v - S^T k) is per column), so splitting V over programs is exact; every program
rebuilds the chunk's triangular inverse for its own columns.

Inside a chunk, T = (I + A)^-1 is built by forward substitution over the chunk's rows (a
fori_loop of rank-1 updates on a C x C value), then everything else is a handful of MXU / tensor
core matmuls. The kernels also write the state entering each chunk: the custom VJP's residual.

The chunks are the op's (_chunks.effective_chunk, so the chunk states match the XLA path's); each is
padded at its end to the hardware's tile (a multiple of 8 rows on TPU, a power of two >= 16 on
GPU) with zero rows (beta = k = g = 0), which leave the state as it is, so any chunk_size runs.

The backward kernels walk the chunks in reverse with dS in VMEM (TPU) or registers (GPU). Their
body is the VJP of the forward's own chunk algebra (`chunk_step_vjp`: jax.vjp traced inside the
kernel), except through the row substitution, whose cotangent is done by hand as three
matmuls. It rebuilds T from the inputs and the stored state, as xla.delta_rule_backward does.
Each program owns one value block, so dq, dk, dbeta and dg come out per block and are summed in
XLA after the call.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks
from pallas_kernels._chunks import dot as _dot, dot_nt as _dot_nt, dot_tn as _dot_tn
from pallas_kernels._dispatch import cuda_compute_capability, triton_interpret, use_mosaic_gpu

F32 = jnp.float32
_OP = "delta_rule"


class BlockSizes(_chunks.BlockSizes):
    __doc__ = _chunks.BlockSizes.__doc__
    op = _OP


# The largest key dims whose GPU kernels fit in one SM's shared memory, found by compiling for
# the A100, H100 and H200 (benchmarks/compile.py; TF32x3 matmuls, chunk 64, value blocks of 64):
# forward 131,072 bytes at K = 128, 262,144 asked at K = 256; backward 163,840 at K = 64 (under
# the A100's 166,912), 245,760 or more asked at K = 128 (the H100 allows 232,448). Smaller value
# blocks barely help: the [C, K] and [C, C] tiles dominate. Above them the XLA path runs that
# pass, from and to the same chunk states.
GPU_FORWARD_MAX_KEY_DIM = 128
GPU_BACKWARD_MAX_KEY_DIM = 64
# The GPU backward kernel needs Hopper (compute capability 9.0) or newer. Before it there is no
# wgmma: each TF32x3 chunk matmul is three passes of warp-level mma.sync, the backward body's ~25
# of them about 4,400 mma.sync per warp, and the kernel alone took 48 s of CPU to compile for the
# A100 (TF32 single pass: 4 s, but ~1e-3 gradients; BF16x3 14 s, BF16x6 42 s; 8 or 16 warps
# 41 / 38 s) against 9 s for the H100: over the 30 s a kernel may take. There the backward runs
# on the XLA path, from the forward kernel's chunk states (what "auto" picks on CUDA anyway).
GPU_BACKWARD_MIN_COMPUTE_CAPABILITY = 90


def gpu_backward_kernel_fits(compute_capability: int | None) -> bool:
    """Whether the Triton backward kernel is built for this GPU (None: not known, as when lowering
    for "cuda" on a CPU host with no mesh; JAX's Triton lowering then assumes Hopper too)."""
    return compute_capability is None or compute_capability >= GPU_BACKWARD_MIN_COMPUTE_CAPABILITY


def _chunk_masks(c, ccol, crow, segmented):
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    incl = row >= col
    upper = col > row
    if segmented:
        same = ccol == crow
        incl = incl & same
        upper = upper & same
    return row, col, incl, upper


def _at_last(x_row):
    """[1, C] -> [1, 1], the last entry (no slicing: Triton has none)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, x_row.shape, 1)
    return jnp.sum(jnp.where(lane == x_row.shape[1] - 1, x_row, 0.0), axis=1, keepdims=True)


def _a_transposed(k, brow, gcol, grow, ccol, crow, *, gated, segmented):
    """A^T, a_t[m, i] = A[i, m] = beta_i (k_i . k_m) exp(G_i - G_m) for m < i (same segment)."""
    _, _, _, upper = _chunk_masks(k.shape[0], ccol, crow, segmented)
    if gated:
        # Gam^T on the strict upper part: exp(G_j - G_i) at [i, j] for i < j.
        gam_t = jnp.where(upper, jnp.exp(jnp.where(upper, grow - gcol, 0.0)), 0.0)
    else:
        gam_t = upper.astype(F32)
    return _dot_nt(k, k) * gam_t * brow


def _substitute(a_t):
    """T = (I + A)^-1 row by row: T_i = e_i - sum_{m<i} A_im T_m (rows >= i of T still 0)."""
    c = a_t.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)

    def step(i, t):
        a_i = jnp.sum(jnp.where(col == i, a_t, 0.0), axis=1, keepdims=True)   # [C, 1]: A_i,:
        new_row = jnp.where(lane == i, 1.0, 0.0) - jnp.sum(a_i * t, axis=0, keepdims=True)
        return jnp.where(row == i, new_row, t)

    return jax.lax.fori_loop(0, c, step, jnp.zeros((c, c), F32))


def _finish(q, k, v, bcol, gcol, grow, s, t, ccol, crow, *, scale, gated, segmented):
    """(o, state leaving the chunk) from T = (I + A)^-1 and the rest of the chunk's inputs."""
    c = q.shape[0]
    row, col, incl, _ = _chunk_masks(c, ccol, crow, segmented)
    glast = _at_last(grow)
    if gated:
        # The diagonal of Gam and the last token's exp(G_last - G_last) are the constant 1, not
        # exp(0): differentiated (the backward kernel), exp(x - x) adds and subtracts the same
        # O(1) term, and its rounding would swamp a gate gradient that strong decays make tiny.
        strict = incl & (row != col)
        gam = jnp.where(strict, jnp.exp(jnp.where(strict, gcol - grow, 0.0)),
                        jnp.where(incl, 1.0, 0.0))
        gamma = jnp.exp(gcol)
        last = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
        dlast = jnp.where(last, 1.0, jnp.exp(jnp.where(last, 0.0, glast - gcol)))
        gl = jnp.exp(glast)
    else:
        gam = incl.astype(F32)
        gamma = jnp.ones_like(gcol)
        dlast = jnp.ones_like(gcol)
        gl = jnp.ones_like(glast)
    if segmented:
        clast = _at_last(crow)
        gamma = jnp.where(ccol == 0, gamma, 0.0)
        dlast = jnp.where(ccol == clast, dlast, 0.0)
        gl = jnp.where(clast == 0, gl, 0.0)
    u = _dot(t, bcol * v) - _dot(_dot(t, (bcol * gamma) * k), s)
    o = scale * (_dot(gamma * q, s) + _dot(_dot_nt(q, k) * gam, u))
    s_next = gl * s + _dot_tn(dlast * k, u)
    return o, s_next


def chunk_step(q, k, v, bcol, brow, gcol, grow, ccol, crow, s, *, scale, gated, segmented):
    """One chunk of the delta rule (the forward kernels' one body).

    q, k [C, K]; v [C, Vb]; bcol/gcol/ccol [C, 1] and brow/grow/crow [1, C]: beta, the gates'
    cumulative sum inside the chunk and the count of resets inside the chunk, as columns and as
    rows (so no transposes are needed in the kernel); s [K, Vb] the state entering the chunk.
    Returns (o [C, Vb], the state leaving the chunk).
    """
    t = _substitute(_a_transposed(k, brow, gcol, grow, ccol, crow, gated=gated,
                                  segmented=segmented))
    return _finish(q, k, v, bcol, gcol, grow, s, t, ccol, crow, scale=scale, gated=gated,
                   segmented=segmented)


def chunk_step_vjp(q, k, v, bcol, brow, gcol, grow, ccol, crow, s, do, ds_next, *, scale,
                   gated, segmented):
    """The backward kernels' one body: the cotangents of `chunk_step`'s inputs
    (dq, dk, dv, dbcol, dbrow, dgcol, dgrow, ds) given those of its outputs (do, ds_next).

    Autodiff of the chunk's own matmul algebra, except through the row substitution (a loop
    whose reverse would keep C copies of T): with T = (I + A)^-1, dA = -T^T dT T^T, so
    d(A^T) = -T dT^T T, three matmuls.
    """
    static = dict(gated=gated, segmented=segmented)
    a_t, a_vjp = jax.vjp(lambda k, brow, gcol, grow: _a_transposed(k, brow, gcol, grow, ccol,
                                                                   crow, **static),
                         k, brow, gcol, grow)
    t = _substitute(a_t)
    _, rest_vjp = jax.vjp(lambda q, k, v, bcol, gcol, grow, s, t: _finish(
        q, k, v, bcol, gcol, grow, s, t, ccol, crow, scale=scale, **static),
        q, k, v, bcol, gcol, grow, s, t)
    dq, dk, dv, dbcol, dgcol, dgrow, ds, dt = rest_vjp((do, ds_next))
    da_t = -_dot(_dot_nt(t, dt), t)
    dk_a, dbrow, dgcol_a, dgrow_a = a_vjp(da_t)
    return dq, dk + dk_a, dv, dbcol, dbrow, dgcol + dgcol_a, dgrow + dgrow_a, ds


def pallas_chunk(length: int, chunk_size: int, target: str) -> tuple[int, int]:
    """(chunk, rows): the op's chunk (_chunks.effective_chunk, so the chunk states the forward
    writes are those the XLA backward expects) and the rows of the kernels' chunk tile, the chunk
    padded at its end for the hardware: a multiple of 8 on TPU, a power of two >= 16 on GPU
    (Triton). Any chunk_size works; zero rows (beta = 0, k = 0, g = 0) leave the state as it is."""
    chunk = _chunks.effective_chunk(length, chunk_size)
    return chunk, _chunks.tile_rows(chunk, target)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The delta-rule family's [B, T, H, ...] operands in the chunk launch's tiles
    (pallas_kernels._chunks): `geo` is the tile geometry of the op's chunks."""
    batch: int
    length: int
    heads: int
    key_dim: int
    value_dim: int
    geo: _chunks.Geometry

    @property
    def bh(self):
        return self.batch * self.heads

    def seq(self, x, width):
        """[B, T, H, D] -> [B*H, N*Cp, width], every chunk zero padded at its end (a zero step
        leaves S as it is)."""
        return _chunks.to_tiles(_chunks.to_chunks(x, self.geo.chunk), self.geo, width)

    def scalar(self, x):
        """[B, T, H] -> [B*H, N, Cp], zero padded."""
        return self.seq(x[..., None], 1).reshape(self.bh, self.geo.n, self.geo.cp)

    def counts(self, reset):
        """Segment starts since each chunk began, [B*H, N, Cp] float32 (padding rows: the
        chunk's last count)."""
        counts = _chunks.chunk_resets(reset, self.geo.chunk).astype(F32)       # [B, N, C]
        counts = jnp.broadcast_to(counts[:, None, :, :, None],
                                  (self.batch, self.heads) + counts.shape[1:] + (1,))
        return _chunks.to_tiles(counts, self.geo, 1, edge=True).reshape(
            self.bh, self.geo.n, self.geo.cp)

    def seq_out(self, x, width):
        """[B*H, N*Cp, padded width] -> [B, T, H, width]."""
        return _chunks.from_tiles(x, self.geo, (self.batch, self.length, self.heads, width))

    def scalar_out(self, x):
        """[B*H, N*Cp] -> [B, T, H]."""
        return self.seq_out(x[..., None], 1)[..., 0]

    def state_out(self, x):
        return _chunks.state_out(x, (self.batch, self.heads, self.key_dim, self.value_dim))

    def states_out(self, x):
        return _chunks.states_out(x, self.geo, (self.batch, self.heads, self.geo.n, self.key_dim,
                                                self.value_dim))


def layout(op, q, v, *, chunk_size, target, block_sizes, kg=1) -> Layout:
    """The tiles of the op's chunks of q [B, T, H, K] and v [B, T, H, V]."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    chunk = _chunks.effective_chunk(length, chunk_size)
    geo = _chunks.geometry(op, length, key_dim, value_dim, chunk, target, block_sizes.block_v,
                           kg=kg)
    return Layout(batch, length, heads, key_dim, value_dim, geo)


def _operands(lay, q, k, v, beta, g, reset, target):
    """The kernels' inputs: [(name, kind, width, array)]. Per-token scalars in chunk coordinates,
    as columns [C, 1] and rows [1, C]: beta, G (the cumulative log gate inside the chunk; a
    padding row's is the chunk's last) and the segment starts since the chunk began."""
    geo = lay.geo
    bt = lay.scalar(beta.astype(F32))
    gcum = jnp.cumsum(lay.scalar(g.astype(F32)), axis=-1)
    scalars = (("b", bt), ("g", gcum), ("c", lay.counts(reset)))
    return ([("q", "seq", geo.kd, lay.seq(q, geo.kd)), ("k", "seq", geo.kd, lay.seq(k, geo.kd)),
             ("v", "seq", "v", lay.seq(v, geo.vd))]
            + [(n + "col", "seq", 1, x.reshape(lay.bh, geo.n * geo.cp, 1)) for n, x in scalars]
            + [(n + "row", "row", geo.cp, x[:, :, None, :] if target == "tpu" else x)
               for n, x in scalars])


def _chunk_inputs(t):
    """chunk_step's inputs, in its order, from the launch's tiles."""
    return (t["q"], t["k"], t["v"], t["bcol"], t["brow"], t["gcol"], t["grow"], t["ccol"],
            t["crow"])


def delta_rule_forward(q, k, v, beta, g, h0, reset, *, scale, chunk_size, gated, segmented,
                       target: str, interpret=None, block_sizes: BlockSizes | None = None):
    """(o [B,T,H,V], final state [B,H,K,V], states entering each chunk [B,H,N,K,V]).

    On GPU, key dims above GPU_FORWARD_MAX_KEY_DIM run the XLA forward (the same chunk states):
    the Triton forward would ask 262,144 bytes of shared memory at K = 256.
    """
    if target == "cuda" and use_mosaic_gpu(interpret):
        from pallas_kernels.delta_rule import mosaic_gpu
        if mosaic_gpu.supports(q, k, v, h0, chunk_size):
            return mosaic_gpu.forward(q, k, v, beta, g, h0, reset, scale=scale,
                                      chunk_size=chunk_size, gated=gated, segmented=segmented,
                                      interpret=interpret)
        interpret = triton_interpret(interpret)
    if target == "cuda" and q.shape[-1] > GPU_FORWARD_MAX_KEY_DIM:
        from pallas_kernels.delta_rule import xla as _xla
        return _xla.delta_rule_forward(q, k, v, beta, g, h0, reset, scale=scale,
                                       chunk_size=chunk_size, gated=gated, segmented=segmented)

    acc = h0.dtype
    if acc != F32:
        raise ValueError(f"delta_rule: the Pallas kernels accumulate in float32, got {acc}")
    lay = layout(_OP, q, v, chunk_size=chunk_size, target=target,
                 block_sizes=block_sizes or BlockSizes.get_default(target))
    body = functools.partial(chunk_step, scale=scale, gated=gated, segmented=segmented)
    o, final, states = _chunks.forward(
        lambda t, s: body(*_chunk_inputs(t), s), _operands(lay, q, k, v, beta, g, reset, target),
        _chunks.state_in(h0, lay.geo), v.dtype, target=target, geo=lay.geo, bh=lay.bh,
        interpret=interpret, name="memzoo_delta_rule_fwd", op=_OP)
    return lay.seq_out(o, lay.value_dim), lay.state_out(final), lay.states_out(states)


# ---------------------------------------------------------------------------------------------
# Backward: the chunks in reverse, carrying dS; each program owns one value block, so the
# cotangents of q, k, beta and the gates come out per value block and are summed after.


def delta_rule_backward(q, k, v, beta, g, h0, reset, states, do, dfinal, *, scale, chunk_size,
                        gated, segmented, target: str, interpret=None,
                        block_sizes: BlockSizes | None = None):
    """Cotangents (dq, dk, dv, dbeta, dg, dh0) from the forward kernels' chunk states: the
    same chunk geometry, so `states` [B,H,N,K,V] are the states entering the kernels' chunks.

    On GPU, key dims above GPU_BACKWARD_MAX_KEY_DIM take the XLA backward (the same chunks, so
    the same states): the Triton backward body keeps too many [C, K] and [C, C] tiles in shared
    memory for one SM (327,680 bytes asked at K = 128 against the H100's 232,448), whatever
    the value block. So do GPUs before Hopper (GPU_BACKWARD_MIN_COMPUTE_CAPABILITY).
    Where the Mosaic GPU forward ran (the same `supports` predicate), the XLA backward runs
    with its reverse scan over chunks as the Mosaic GPU kernel (`mosaic_gpu.reverse_scan`).
    """
    if target == "cuda" and use_mosaic_gpu(interpret):
        from pallas_kernels.delta_rule import mosaic_gpu
        from pallas_kernels.delta_rule import xla as _xla
        # The forward's predicate: the chunk states then come from the Mosaic forward's chunks.
        if mosaic_gpu.supports(q, k, v, h0, chunk_size):
            scan = functools.partial(mosaic_gpu.reverse_scan, dtype=k.dtype, split_kd=gated,
                                     interpret=interpret)
            # XLA's GPU float32 matmuls may run in TF32: the batched work keeps float32.
            with jax.default_matmul_precision("highest"):
                return _xla.delta_rule_backward(q, k, v, beta, g, h0, reset, states, do, dfinal,
                                                scale=scale, chunk_size=chunk_size, gated=gated,
                                                segmented=segmented, reverse_scan=scan)
    interpret = triton_interpret(interpret)
    if target == "cuda" and (q.shape[-1] > GPU_BACKWARD_MAX_KEY_DIM
                             or not gpu_backward_kernel_fits(cuda_compute_capability())):
        from pallas_kernels.delta_rule import xla as _xla
        return _xla.delta_rule_backward(q, k, v, beta, g, h0, reset, states, do, dfinal,
                                        scale=scale, chunk_size=chunk_size, gated=gated,
                                        segmented=segmented)

    lay = layout(_OP, q, v, chunk_size=chunk_size, target=target,
                 block_sizes=block_sizes or BlockSizes.get_default(target))
    geo = lay.geo
    if states.shape[2] != geo.n:
        raise ValueError(f"delta_rule: {states.shape[2]} chunk states for {geo.n} chunks")
    inputs = _operands(lay, q, k, v, beta, g, reset, target)
    inputs += [("states", "state", "v", _chunks.states_in(states.astype(F32), geo, target)),
               ("do", "seq", "v", lay.seq(do, geo.vd)),
               ("dfinal", "whole", "v", _chunks.state_in(dfinal.astype(F32), geo))]
    body = functools.partial(chunk_step_vjp, scale=scale, gated=gated, segmented=segmented)

    def step(t, ds_next):
        dq, dk, dv, dbc, dbr, dgc, dgr, ds = body(*_chunk_inputs(t), t["states"], t["do"],
                                                  ds_next)
        t["dq"], t["dk"], t["dv"] = dq, dk, dv
        t["dbc"], t["dgc"], t["dbr"], t["dgr"] = dbc, dgc, dbr, dgr
        return ds

    outputs = [("dq", "seq", geo.kd, F32, True), ("dk", "seq", geo.kd, F32, True),
               ("dv", "seq", "v", F32, False), ("dbc", "seq", 1, F32, True),
               ("dgc", "seq", 1, F32, True), ("dbr", "row", geo.cp, F32, True),
               ("dgr", "row", geo.cp, F32, True), ("dh0", "whole", "v", F32, False)]
    dq, dk, dv, dbc, dgc, dbr, dgr, dh0 = _chunks.launch(
        step, inputs, outputs, init="dfinal", finish="dh0", reverse=True, target=target,
        geo=geo, bh=lay.bh, interpret=interpret, name="memzoo_delta_rule_bwd", op=_OP)

    # Sum over value blocks; beta and G got cotangents as columns and as rows.
    padded_t = geo.n * geo.cp
    dq, dk, dbc, dgc = (jnp.sum(x, axis=0) for x in (dq, dk, dbc, dgc))
    dbr, dgr = (jnp.sum(x, axis=0).reshape(lay.bh, padded_t) for x in (dbr, dgr))
    dbeta = dbc[..., 0] + dbr
    d_cum = (dgc[..., 0] + dgr).reshape(lay.bh, geo.n, geo.cp)
    # G is a cumulative sum of g inside each chunk: dg is the reverse cumulative sum of dG.
    dg = jnp.flip(jnp.cumsum(jnp.flip(d_cum, -1), axis=-1), -1).reshape(lay.bh, padded_t)
    if not gated:
        dg = jnp.zeros_like(dg)
    return (lay.seq_out(dq, lay.key_dim).astype(q.dtype),
            lay.seq_out(dk, lay.key_dim).astype(k.dtype),
            lay.seq_out(dv, lay.value_dim).astype(v.dtype),
            lay.scalar_out(dbeta).astype(beta.dtype), lay.scalar_out(dg).astype(g.dtype),
            lay.state_out(dh0).astype(h0.dtype))
