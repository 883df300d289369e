"""Pallas kernels for `delta_rule`: one chunk body (the WY / UT form of xla.py), two launches.

Each program owns one (batch * head, value block) pair and walks the chunks in order, carrying
the K x block_v state in float32. Value columns of the state evolve independently (the write
u = beta (v - S^T k) is per column), so splitting V over programs is exact; every program
rebuilds the chunk's triangular inverse for its own columns.

* TPU (Mosaic): grid (batch * heads, value blocks, chunks); the chunk axis is sequential
  ("arbitrary") and the state lives in a VMEM scratch between chunks.
* GPU (Triton): grid (batch * heads, value blocks); each program walks all chunks in a fori_loop
  with the state in registers (Triton has no cross-program scratch).

Inside a chunk, T = (I + A)^-1 is built by forward substitution over the chunk's rows (a
fori_loop of rank-1 updates on a C x C value), then everything else is a handful of MXU / tensor
core matmuls. The kernels also write the state entering each chunk: the custom VJP's residual.
The backward runs on the XLA path (xla.delta_rule_backward), which rebuilds T, W, U~ from the
inputs and those states.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_v: value columns per program (the state tile is key_dim x block_v)."""

    block_v: int

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            # 128 lanes: one full vreg width; K x 128 x 4 B of state scratch per program.
            return cls(block_v=128)
        if target == "cuda":
            # 64 columns: at B4 H8 V128, 64 programs of a 64 x 64 state, about one per SM pair.
            return cls(block_v=64)
        raise ValueError(f"delta_rule: unknown Pallas target {target!r}")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=F32)


def _dot_nt(a, b):
    """a @ b.T"""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=F32)


def _dot_tn(a, b):
    """a.T @ b"""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=F32)


def chunk_step(q, k, v, bcol, brow, gcol, grow, ccol, crow, s, *, scale, gated, segmented):
    """One chunk of the delta rule (the kernels' one body).

    q, k [C, K]; v [C, Vb]; bcol/gcol/ccol [C, 1] and brow/grow/crow [1, C]: beta, the gates'
    cumulative sum inside the chunk and the count of resets inside the chunk, as columns and as
    rows (so no transposes are needed in the kernel); s [K, Vb] the state entering the chunk.
    Returns (o [C, Vb], the state leaving the chunk).
    """
    c = q.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    incl = row >= col
    upper = col > row
    if segmented:
        same = ccol == crow
        incl = incl & same
        upper = upper & same
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)
    is_last = lane == c - 1

    def at_last(x_row):                                        # [1, C] -> [1, 1] (no slicing:
        return jnp.sum(jnp.where(is_last, x_row, 0.0), axis=1, keepdims=True)   # Triton has none)

    glast = at_last(grow)
    if gated:
        gam = jnp.where(incl, jnp.exp(jnp.where(incl, gcol - grow, 0.0)), 0.0)
        # Gam^T on the strict upper part: exp(G_j - G_i) at [i, j] for i < j.
        gam_t = jnp.where(upper, jnp.exp(jnp.where(upper, grow - gcol, 0.0)), 0.0)
        gamma = jnp.exp(gcol)
        dlast = jnp.exp(glast - gcol)
        gl = jnp.exp(glast)
    else:
        gam = incl.astype(F32)
        gam_t = upper.astype(F32)
        gamma = jnp.ones_like(gcol)
        dlast = jnp.ones_like(gcol)
        gl = jnp.ones_like(glast)
    if segmented:
        clast = at_last(crow)
        gamma = jnp.where(ccol == 0, gamma, 0.0)
        dlast = jnp.where(ccol == clast, dlast, 0.0)
        gl = jnp.where(clast == 0, gl, 0.0)

    kk = _dot_nt(k, k)                                          # symmetric
    a_t = kk * gam_t * brow                                     # A^T: a_t[m, i] = A[i, m]

    # T = (I + A)^-1, row by row: T_i = e_i - sum_{m<i} A_im T_m (rows >= i of T are still 0).
    def substitute(i, t):
        a_i = jnp.sum(jnp.where(col == i, a_t, 0.0), axis=1, keepdims=True)   # [C, 1]: A_i,:
        new_row = jnp.where(lane == i, 1.0, 0.0) - jnp.sum(a_i * t, axis=0, keepdims=True)
        return jnp.where(row == i, new_row, t)

    t = jax.lax.fori_loop(0, c, substitute, jnp.zeros((c, c), F32))
    u = _dot(t, bcol * v) - _dot(_dot(t, (bcol * gamma) * k), s)
    o = scale * (_dot(gamma * q, s) + _dot(_dot_nt(q, k) * gam, u))
    s_next = gl * s + _dot_tn(dlast * k, u)
    return o, s_next


_N_SEQ = 3    # q, k, v: [C, .] blocks
_N_COL = 3    # beta, G, reset counts as columns
_N_ROW = 3    # ... as rows


def _tpu_kernel(q_ref, k_ref, v_ref, bc_ref, gc_ref, cc_ref, br_ref, gr_ref, cr_ref, h0_ref,
                o_ref, final_ref, states_ref, s_scr, *, body):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...]

    s = s_scr[...]
    states_ref[...] = s
    o, s_next = body(q_ref[...].astype(F32), k_ref[...].astype(F32), v_ref[...].astype(F32),
                     bc_ref[...], br_ref[...], gc_ref[...], gr_ref[...], cc_ref[...], cr_ref[...],
                     s)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s_next

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = s_next


def _gpu_kernel(q_ref, k_ref, v_ref, bc_ref, gc_ref, cc_ref, br_ref, gr_ref, cr_ref, h0_ref,
                o_ref, final_ref, states_ref, *, body, chunk, n_chunks, key_dim):
    def step(n, s):
        rows = pl.ds(n * chunk, chunk)
        one = pl.ds(n, 1)
        states_ref[pl.ds(n * key_dim, key_dim), :] = s
        o, s_next = body(q_ref[rows, :].astype(F32), k_ref[rows, :].astype(F32),
                         v_ref[rows, :].astype(F32), bc_ref[rows, :], br_ref[one, :],
                         gc_ref[rows, :], gr_ref[one, :], cc_ref[rows, :], cr_ref[one, :], s)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return s_next

    final_ref[...] = jax.lax.fori_loop(0, n_chunks, step, h0_ref[...])


def pallas_chunk(length: int, chunk_size: int, target: str) -> int:
    """The chunk the kernels run: the op's chunk (so chunk states match the XLA backward's),
    rounded up for the hardware only when the whole sequence is one chunk."""
    chunk = max(1, min(chunk_size, length))
    align = 8 if target == "tpu" else 16
    if chunk >= length:    # one chunk: padding it changes no chunk boundary
        return _round_up(chunk, align) if target == "tpu" else max(align, pl.next_power_of_2(chunk))
    ok = chunk % align == 0 if target == "tpu" else chunk >= align and chunk == pl.next_power_of_2(chunk)
    if not ok:
        raise ValueError(
            f"delta_rule: implementation='pallas' on {target} needs `chunk_size` "
            + ("a multiple of 8" if target == "tpu" else "a power of two >= 16")
            + f", got {chunk_size}")
    return chunk


def delta_rule_forward(q, k, v, beta, g, h0, reset, *, scale, chunk_size, gated, segmented,
                       target: str, interpret=None, block_sizes: BlockSizes | None = None):
    """(o [B,T,H,V], final state [B,H,K,V], states entering each chunk [B,H,N,K,V])."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    acc = h0.dtype
    if acc != F32:
        raise ValueError(f"delta_rule: the Pallas kernels accumulate in float32, got {acc}")
    chunk = pallas_chunk(length, chunk_size, target)
    n_chunks = -(-length // chunk)
    padded_t = n_chunks * chunk
    bs = block_sizes or BlockSizes.get_default(target)
    if target == "tpu":
        kd = key_dim
        block_v = min(bs.block_v, value_dim)
        vd = _round_up(value_dim, block_v)
    else:
        # Triton tiles are powers of two, and its matmuls need every side >= 16.
        kd = max(16, pl.next_power_of_2(key_dim))
        block_v = max(16, min(bs.block_v, pl.next_power_of_2(value_dim)))
        vd = _round_up(value_dim, block_v)
    n_v = vd // block_v
    bh = batch * heads

    def heads_first(x, width):
        """[B, T, H, D] -> [B*H, padded T, width], zero padded (a zero step leaves S as it is)."""
        x = jnp.transpose(x, (0, 2, 1, 3)).reshape(bh, length, x.shape[-1])
        return jnp.pad(x, [(0, 0), (0, padded_t - length), (0, width - x.shape[-1])])

    qf, kf = heads_first(q, kd), heads_first(k, kd)
    vf = heads_first(v, vd)
    # Per-token scalars, in chunk coordinates: G = cumulative log gate, counts = resets so far.
    bt = jnp.pad(jnp.transpose(beta, (0, 2, 1)).reshape(bh, length), [(0, 0), (0, padded_t - length)])
    gt = jnp.pad(jnp.transpose(g, (0, 2, 1)).reshape(bh, length), [(0, 0), (0, padded_t - length)])
    rt = jnp.pad(jnp.broadcast_to(reset.astype(F32)[:, None], (batch, heads, length)).reshape(bh, length),
                 [(0, 0), (0, padded_t - length)])
    gcum = jnp.cumsum(gt.reshape(bh, n_chunks, chunk), axis=-1)
    ccum = jnp.cumsum(rt.reshape(bh, n_chunks, chunk), axis=-1)
    brs = bt.reshape(bh, n_chunks, chunk)
    cols = [x.reshape(bh, padded_t, 1).astype(F32) for x in (brs, gcum, ccum)]
    h0f = jnp.pad(h0.reshape(bh, key_dim, value_dim),
                  [(0, 0), (0, kd - key_dim), (0, vd - value_dim)])
    body = functools.partial(chunk_step, scale=scale, gated=gated, segmented=segmented)
    interpret = interpret if interpret is not None else False

    if target == "tpu":
        rows = [x[:, :, None, :].astype(F32) for x in (brs, gcum, ccum)]     # [BH, N, 1, C]
        seq_k = pl.BlockSpec((None, chunk, kd), lambda b, j, n: (b, n, 0))
        seq_v = pl.BlockSpec((None, chunk, block_v), lambda b, j, n: (b, n, j))
        col = pl.BlockSpec((None, chunk, 1), lambda b, j, n: (b, n, 0))
        rowspec = pl.BlockSpec((None, None, 1, chunk), lambda b, j, n: (b, n, 0, 0))
        state = pl.BlockSpec((None, kd, block_v), lambda b, j, n: (b, 0, j))
        states_spec = pl.BlockSpec((None, None, kd, block_v), lambda b, j, n: (b, n, 0, j))
        out_shape = [jax.ShapeDtypeStruct((bh, padded_t, vd), v.dtype),
                     jax.ShapeDtypeStruct((bh, kd, vd), F32),
                     jax.ShapeDtypeStruct((bh, n_chunks, kd, vd), F32)]
        call = pl.pallas_call(
            functools.partial(_tpu_kernel, body=body),
            grid=(bh, n_v, n_chunks), out_shape=out_shape,
            in_specs=[seq_k, seq_k, seq_v] + [col] * _N_COL + [rowspec] * _N_ROW + [state],
            out_specs=[seq_v, state, states_spec],
            scratch_shapes=[pltpu.VMEM((kd, block_v), F32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name="memzoo_delta_rule_fwd")
        o, final, states = call(qf, kf, vf, *cols, *rows, h0f)
    elif target == "cuda":
        rows = [x.astype(F32) for x in (brs, gcum, ccum)]                   # [BH, N, C]
        seq_k = pl.BlockSpec((None, padded_t, kd), lambda b, j: (b, 0, 0))
        seq_v = pl.BlockSpec((None, padded_t, block_v), lambda b, j: (b, 0, j))
        col = pl.BlockSpec((None, padded_t, 1), lambda b, j: (b, 0, 0))
        rowspec = pl.BlockSpec((None, n_chunks, chunk), lambda b, j: (b, 0, 0))
        state = pl.BlockSpec((None, kd, block_v), lambda b, j: (b, 0, j))
        states_spec = pl.BlockSpec((None, n_chunks * kd, block_v), lambda b, j: (b, 0, j))
        out_shape = [jax.ShapeDtypeStruct((bh, padded_t, vd), v.dtype),
                     jax.ShapeDtypeStruct((bh, kd, vd), F32),
                     jax.ShapeDtypeStruct((bh, n_chunks * kd, vd), F32)]
        call = pl.pallas_call(
            functools.partial(_gpu_kernel, body=body, chunk=chunk, n_chunks=n_chunks,
                              key_dim=kd),
            grid=(bh, n_v), out_shape=out_shape,
            in_specs=[seq_k, seq_k, seq_v] + [col] * _N_COL + [rowspec] * _N_ROW + [state],
            out_specs=[seq_v, state, states_spec],
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret, name="memzoo_delta_rule_fwd")
        o, final, states = call(qf, kf, vf, *cols, *rows, h0f)
        states = states.reshape(bh, n_chunks, kd, vd)
    else:
        raise ValueError(f"delta_rule: unknown Pallas target {target!r}")

    o = o[:, :length, :value_dim].reshape(batch, heads, length, value_dim)
    o = jnp.transpose(o, (0, 2, 1, 3))
    final = final[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    states = states[:, :, :key_dim, :value_dim].reshape(batch, heads, n_chunks, key_dim, value_dim)
    return o, final, states
