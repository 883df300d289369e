"""Pallas forward kernels for `dplr_delta_rule`: one chunk body (xla.py's WY / UT form with
per-key-channel decays), two launches. The backward is xla.dplr_backward, from the chunk states
these kernels write (the same chunks, so the same states).

Each program owns one (batch * head, value block) pair and walks the chunks in order, carrying
the K x block_v state in float32. Value columns of the state evolve independently (the read
b^T S and the writes are per column), so splitting V over programs is exact; every program
rebuilds the chunk's pair matrices and triangular inverse for its own columns.

* TPU (Mosaic): grid (batch * heads, value blocks, chunks); the chunk axis is sequential
  ("arbitrary") and the state lives in a VMEM scratch between chunks.
* GPU (Triton): grid (batch * heads, value blocks); each program walks all chunks in a fori_loop
  with the state in registers.

Inside a chunk the four pair matrices (q.a, q.k, b.a, b.k, each decayed per key channel by
exp(G_i - G_j) <= 1) are built one query row at a time as [C, K] elementwise products reduced
over K (no [C, C, K] tensor, only 2-D values, exponents <= 0); they come out transposed, which
is what delta_rule's row substitution (T = (I + A)^-1 from A^T) and the transposed matmuls
take. The chunks are the op's (xla.effective_chunk), each padded at its end to the hardware's
tile (delta_rule.pallas.pallas_chunk) with zero rows whose decay is 1 and cumulative decay that
of the chunk's last token, which leave the state as it is.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.delta_rule.pallas import (_Layout, _dot, _dot_tn, _matmuls, _round_up,
                                              _substitute, pallas_chunk)
from pallas_kernels.dplr_delta_rule.xla import LOG_DECAY_FLOOR

F32 = jnp.float32

__all__ = ["BlockSizes", "GPU_FORWARD_MAX_KEY_DIM", "chunk_step", "dplr_forward", "pallas_chunk"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_v: value columns per program (the state tile is key_dim x block_v)."""

    block_v: int

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            return cls(block_v=128)     # one full vreg width of lanes
        if target == "cuda":
            return cls(block_v=64)
        raise ValueError(f"dplr_delta_rule: unknown Pallas target {target!r}")


# Key dims above this run the XLA forward on GPU (the same chunk states): the Triton body keeps
# seven [C, K] tiles and four [C, C] matrices live (tests/pallas_kernels/test_compile.py).
GPU_FORWARD_MAX_KEY_DIM = 128


def _masked_exp(x, mask):
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _pick(sel, x):
    """Row `sel` ([C, 1] one-hot mask) of x [C, D] as [1, D] (no dynamic slicing: Triton)."""
    return jnp.sum(jnp.where(sel, x, 0.0), axis=0, keepdims=True)


def chunk_step(q, k, a, b, v, gam, gam_ex, to_end, cnt, decay, s, *, scale, segmented):
    """One chunk of the DPLR delta rule (the kernels' one body).

    q, k, a, b [C, K]; v [C, Vb]; gam / gam_ex [C, K]: the cumulative log decay inside the
    chunk through / before each token; to_end [C, K]: after each token to the chunk's end;
    cnt [C, 1]: resets so far inside the chunk; decay [K, 1]: what multiplies the incoming state
    at the chunk's end (0 past a reset); s [K, Vb] the state entering the chunk.
    Returns (o [C, Vb], the state leaving the chunk).
    """
    c = q.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)

    def query_row(i, mats):
        qa_t, qk_t, ba_t, bk_t = mats
        sel = rows == i
        incl = rows <= i
        strict = rows < i
        if segmented:
            same = cnt == _pick(sel, cnt)
            incl = incl & same
            strict = strict & same
        qe = _pick(sel, q) * _masked_exp(_pick(sel, gam) - gam, incl)        # [C, K], row j
        be = _pick(sel, b) * _masked_exp(_pick(sel, gam_ex) - gam, strict)
        at = cols == i
        put = lambda x, y, m: jnp.where(at, jnp.sum(x * y, axis=1, keepdims=True), m)
        return put(qe, a, qa_t), put(qe, k, qk_t), put(be, a, ba_t), put(be, k, bk_t)

    zeros = jnp.zeros((c, c), F32)
    qa_t, qk_t, ba_t, bk_t = jax.lax.fori_loop(0, c, query_row, (zeros,) * 4)
    t = _substitute(-ba_t)                                   # (I - Aba)^-1
    qhat = scale * q * jnp.exp(gam)
    bhat = b * jnp.exp(gam_ex)
    dl = jnp.exp(to_end)
    if segmented:
        first = cnt == 0
        qhat = jnp.where(first, qhat, 0.0)
        bhat = jnp.where(first, bhat, 0.0)
        clast = _pick(rows == c - 1, cnt)
        dl = jnp.where(cnt == clast, dl, 0.0)
    u = _dot(t, _dot_tn(bk_t, v) + _dot(bhat, s))
    o = _dot(qhat, s) + scale * (_dot_tn(qa_t, u) + _dot_tn(qk_t, v))
    s_next = decay * s + _dot_tn(a * dl, u) + _dot_tn(k * dl, v)
    return o, s_next


_N_KEY = 7    # q, k, a, b, gam, gam_ex, to_end: [C, K] tiles


def _tpu_kernel(q_ref, k_ref, a_ref, b_ref, g_ref, ge_ref, te_ref, v_ref, c_ref, d_ref, h0_ref,
                o_ref, final_ref, states_ref, s_scr, *, body):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...]

    s = s_scr[...]
    states_ref[...] = s
    o, s_next = body(q_ref[...].astype(F32), k_ref[...].astype(F32), a_ref[...].astype(F32),
                     b_ref[...].astype(F32), v_ref[...].astype(F32), g_ref[...], ge_ref[...],
                     te_ref[...], c_ref[...], d_ref[...], s)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s_next

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = s_next


def _gpu_kernel(q_ref, k_ref, a_ref, b_ref, g_ref, ge_ref, te_ref, v_ref, c_ref, d_ref, h0_ref,
                o_ref, final_ref, states_ref, *, body, chunk, n_chunks, key_dim):
    def step(n, s):
        rows = pl.ds(n * chunk, chunk)
        keys = pl.ds(n * key_dim, key_dim)
        states_ref[keys, :] = s
        o, s_next = body(q_ref[rows, :].astype(F32), k_ref[rows, :].astype(F32),
                         a_ref[rows, :].astype(F32), b_ref[rows, :].astype(F32),
                         v_ref[rows, :].astype(F32), g_ref[rows, :], ge_ref[rows, :],
                         te_ref[rows, :], c_ref[rows, :], d_ref[keys, :], s)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return s_next

    final_ref[...] = jax.lax.fori_loop(0, n_chunks, step, h0_ref[...])


def _layout(q, v, *, chunk_size, target, block_sizes) -> _Layout:
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    op_chunk, chunk = pallas_chunk(length, chunk_size, target)
    n_chunks = -(-length // op_chunk)
    bs = block_sizes or BlockSizes.get_default(target)
    if target == "tpu":
        kd = key_dim
        block_v = min(bs.block_v, value_dim)
    elif target == "cuda":
        # Triton tiles are powers of two, and its matmuls need every side >= 16.
        kd = max(16, pl.next_power_of_2(key_dim))
        block_v = max(16, min(bs.block_v, pl.next_power_of_2(value_dim)))
    else:
        raise ValueError(f"dplr_delta_rule: unknown Pallas target {target!r}")
    vd = _round_up(value_dim, block_v)
    return _Layout(batch, length, heads, key_dim, value_dim, op_chunk, chunk, n_chunks,
                   n_chunks * chunk, kd, vd, block_v, (), (), ())


def _decays(lay: _Layout, w, reset):
    """gam, gam_ex, to_end [BH, padded T, kd], reset counts [BH, padded T, 1] and the chunks'
    state decays [BH, N, kd], all in the kernels' tiles. Padding rows have w = 0: their
    cumulative decay is the last token's, so no exponent a kernel forms is positive."""
    bh, n, c, kd = lay.bh, lay.n_chunks, lay.chunk, lay.kd
    w = lay.heads_first(jnp.maximum(w.astype(F32), LOG_DECAY_FLOOR), kd).reshape(bh, n, c, kd)
    gam = jnp.cumsum(w, axis=2)
    gam_ex = jnp.concatenate([jnp.zeros_like(gam[:, :, :1]), gam[:, :, :-1]], axis=2)
    suffix = jnp.cumsum(w[:, :, ::-1], axis=2)[:, :, ::-1]
    to_end = jnp.concatenate([suffix[:, :, 1:], jnp.zeros_like(suffix[:, :, :1])], axis=2)
    r = jnp.broadcast_to(reset.astype(F32)[:, None], (lay.batch, lay.heads, lay.length))
    counts = jnp.cumsum(lay.to_tiles(r.reshape(bh, lay.length, 1)).reshape(bh, n, c), axis=2)
    decay = jnp.where(counts[:, :, -1:] == 0, jnp.exp(suffix[:, :, 0]), 0.0)     # [BH, N, kd]
    flat = lambda x: x.reshape(bh, lay.padded_t, x.shape[-1])
    return flat(gam), flat(gam_ex), flat(to_end), counts.reshape(bh, lay.padded_t, 1), decay


def dplr_forward(q, k, v, a, b, w, h0, reset, *, scale, chunk_size, segmented, target: str,
                 interpret=None, block_sizes: BlockSizes | None = None):
    """(o [B,T,H,V], final state [B,H,K,V], states entering each chunk [B,H,N,K,V]).

    On GPU, key dims above GPU_FORWARD_MAX_KEY_DIM run the XLA forward (the same chunk states).
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    if target == "cuda" and q.shape[-1] > GPU_FORWARD_MAX_KEY_DIM:
        from pallas_kernels.dplr_delta_rule import xla as _xla
        return _xla.dplr_forward(q, k, v, a, b, w, h0, reset, scale=scale,
                                 chunk_size=chunk_size, segmented=segmented)
    if h0.dtype != F32:
        raise ValueError(f"dplr_delta_rule: the Pallas kernels accumulate in float32, "
                         f"got {h0.dtype}")
    lay = _layout(q, v, chunk_size=chunk_size, target=target, block_sizes=block_sizes)
    bh, n_v, chunk, n_chunks, padded_t = lay.bh, lay.n_v, lay.chunk, lay.n_chunks, lay.padded_t
    kd, vd, block_v = lay.kd, lay.vd, lay.block_v
    keyed = [lay.heads_first(x, kd) for x in (q, k, a, b)]
    gam, gam_ex, to_end, counts, decay = _decays(lay, w, reset)
    vt = lay.heads_first(v, vd)
    h0f = lay.state_in(h0)
    body = functools.partial(chunk_step, scale=scale, segmented=segmented)
    interpret = interpret if interpret is not None else False
    out_shape = [jax.ShapeDtypeStruct((bh, padded_t, vd), v.dtype),
                 jax.ShapeDtypeStruct((bh, kd, vd), F32)]

    if target == "tpu":
        seq_k = pl.BlockSpec((None, chunk, kd), lambda i, j, n: (i, n, 0))
        seq_v = pl.BlockSpec((None, chunk, block_v), lambda i, j, n: (i, n, j))
        col = pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, n, 0))
        dec = pl.BlockSpec((None, None, kd, 1), lambda i, j, n: (i, n, 0, 0))
        state = pl.BlockSpec((None, kd, block_v), lambda i, j, n: (i, 0, j))
        states_spec = pl.BlockSpec((None, None, kd, block_v), lambda i, j, n: (i, n, 0, j))
        call = pl.pallas_call(
            functools.partial(_tpu_kernel, body=body),
            grid=(bh, n_v, n_chunks),
            out_shape=out_shape + [jax.ShapeDtypeStruct((bh, n_chunks, kd, vd), F32)],
            in_specs=[seq_k] * _N_KEY + [seq_v, col, dec, state],
            out_specs=[seq_v, state, states_spec],
            scratch_shapes=[pltpu.VMEM((kd, block_v), F32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name="memzoo_dplr_delta_rule_fwd")
        dec_in = decay[..., None]
    else:
        seq_k = pl.BlockSpec((None, padded_t, kd), lambda i, j: (i, 0, 0))
        seq_v = pl.BlockSpec((None, padded_t, block_v), lambda i, j: (i, 0, j))
        col = pl.BlockSpec((None, padded_t, 1), lambda i, j: (i, 0, 0))
        dec = pl.BlockSpec((None, n_chunks * kd, 1), lambda i, j: (i, 0, 0))
        state = pl.BlockSpec((None, kd, block_v), lambda i, j: (i, 0, j))
        states_spec = pl.BlockSpec((None, n_chunks * kd, block_v), lambda i, j: (i, 0, j))
        call = pl.pallas_call(
            functools.partial(_gpu_kernel, body=body, chunk=chunk, n_chunks=n_chunks,
                              key_dim=kd),
            grid=(bh, n_v),
            out_shape=out_shape + [jax.ShapeDtypeStruct((bh, n_chunks * kd, vd), F32)],
            in_specs=[seq_k] * _N_KEY + [seq_v, col, dec, state],
            out_specs=[seq_v, state, states_spec],
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret, name="memzoo_dplr_delta_rule_fwd")
        dec_in = decay.reshape(bh, n_chunks * kd, 1)
    with _matmuls(target, interpret):
        o, final, states = call(*keyed, gam, gam_ex, to_end, vt, counts, dec_in, h0f)
    states = states.reshape(bh, n_chunks, kd, vd)
    o = lay.seq_out(o, lay.value_dim)
    final = final[:, :lay.key_dim, :lay.value_dim].reshape(h0.shape)
    states = states[:, :, :lay.key_dim, :lay.value_dim].reshape(
        lay.batch, lay.heads, n_chunks, lay.key_dim, lay.value_dim)
    return o, final, states
