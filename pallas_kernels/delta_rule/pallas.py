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

The chunks are the op's (xla.effective_chunk, so the chunk states match the XLA path's); each is
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

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._dispatch import cuda_compute_capability

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


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# The matmul algorithm of the kernel bodies, read when they are traced (`_matmuls`). Full float32
# (HIGHEST) everywhere except compiled Triton, where HIGHEST means IEEE float32 dots that
# Triton expands into scalar FMA loops: tens of thousands of instructions per chunk body, minutes
# of compile time (202 s for the gated backward at head dim 64 on an H100), no tensor cores. There
# the dots are three TF32 tensor-core products with the rounding errors fed back (TF32x3), about
# float32 accuracy. Interpreters run on the host's XLA, which takes HIGHEST.
_PRECISION = contextvars.ContextVar("memzoo_delta_rule_precision", default=_HIGHEST)


@contextlib.contextmanager
def _matmuls(target: str, interpret):
    precision = (jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if target == "cuda" and not interpret
                 else _HIGHEST)
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


def _dot_nt(a, b):
    """a @ b.T"""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


def _dot_tn(a, b):
    """a.T @ b"""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


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


def pallas_chunk(length: int, chunk_size: int, target: str) -> tuple[int, int]:
    """(chunk, rows): the op's chunk (xla.effective_chunk, so the chunk states the forward writes
    are those the XLA backward expects) and the rows of the kernels' chunk tile, the chunk padded
    at its end for the hardware: a multiple of 8 on TPU, a power of two >= 16 on GPU (Triton).
    Any chunk_size works; zero rows (beta = 0, k = 0, g = 0) leave the state as it is."""
    chunk = max(1, min(chunk_size, length))
    rows = _round_up(chunk, 8) if target == "tpu" else max(16, pl.next_power_of_2(chunk))
    return chunk, rows


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The kernels' common layout: [B*H, padded T, padded width] sequences (each of the op's
    chunks padded at its end to `chunk` rows), per-token scalars in chunk coordinates as columns
    [B*H, padded T, 1] and rows, and the padded sizes."""
    batch: int
    length: int
    heads: int
    key_dim: int
    value_dim: int
    op_chunk: int       # the op's chunk (tokens per chunk)
    chunk: int          # rows of the kernels' chunk tile (op_chunk padded for the hardware)
    n_chunks: int
    padded_t: int
    kd: int
    vd: int
    block_v: int
    seq: tuple          # q, k, v
    cols: tuple         # beta, G, reset counts as [BH, padded T, 1]
    rows: tuple         # the same as [BH, N, 1, C] (TPU) or [BH, N, C] (GPU)

    @property
    def bh(self):
        return self.batch * self.heads

    @property
    def n_v(self):
        return self.vd // self.block_v

    def to_tiles(self, x):
        """[B*H, T, D] -> [B*H, padded T, D]: every chunk zero padded at its end (a zero step
        leaves S as it is)."""
        n, c = self.n_chunks, self.op_chunk
        x = jnp.pad(x, [(0, 0), (0, n * c - self.length), (0, 0)])
        x = x.reshape(self.bh, n, c, x.shape[-1])
        x = jnp.pad(x, [(0, 0), (0, 0), (0, self.chunk - c), (0, 0)])
        return x.reshape(self.bh, self.padded_t, x.shape[-1])

    def from_tiles(self, x):
        """[B*H, padded T, D] -> [B*H, T, D], the chunks' padding rows dropped."""
        x = x.reshape(self.bh, self.n_chunks, self.chunk, x.shape[-1])[:, :, :self.op_chunk]
        return x.reshape(self.bh, self.n_chunks * self.op_chunk, x.shape[-1])[:, :self.length]

    def heads_first(self, x, width):
        """[B, T, H, D] -> [B*H, padded T, width], zero padded."""
        x = jnp.transpose(x, (0, 2, 1, 3)).reshape(self.bh, self.length, x.shape[-1])
        return jnp.pad(self.to_tiles(x), [(0, 0), (0, 0), (0, width - x.shape[-1])])

    def state_in(self, x):
        """[B, H, K, V] (or [B, H, N, K, V]) -> padded [B*H, (N,) kd, vd]."""
        x = x.reshape((self.bh,) + x.shape[2:])
        pads = [(0, 0)] * (x.ndim - 2) + [(0, self.kd - self.key_dim), (0, self.vd - self.value_dim)]
        return jnp.pad(x, pads)

    def seq_out(self, x, width):
        """[B*H, padded T, padded width] -> [B, T, H, width]."""
        x = self.from_tiles(x[..., :width]).reshape(self.batch, self.heads, self.length, width)
        return jnp.transpose(x, (0, 2, 1, 3))

    def scalar_out(self, x):
        """[B*H, padded T] -> [B, T, H]."""
        x = self.from_tiles(x[..., None]).reshape(self.batch, self.heads, self.length)
        return jnp.transpose(x, (0, 2, 1))


def _layout(q, k, v, beta, g, reset, *, chunk_size, target, block_sizes) -> _Layout:
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    op_chunk, chunk = pallas_chunk(length, chunk_size, target)
    n_chunks = -(-length // op_chunk)
    padded_t = n_chunks * chunk
    bs = block_sizes or BlockSizes.get_default(target)
    if target == "tpu":
        kd = key_dim
        block_v = min(bs.block_v, value_dim)
        vd = _round_up(value_dim, block_v)
    elif target == "cuda":
        # Triton tiles are powers of two, and its matmuls need every side >= 16.
        kd = max(16, pl.next_power_of_2(key_dim))
        block_v = max(16, min(bs.block_v, pl.next_power_of_2(value_dim)))
        vd = _round_up(value_dim, block_v)
    else:
        raise ValueError(f"delta_rule: unknown Pallas target {target!r}")
    bh = batch * heads
    base = _Layout(batch, length, heads, key_dim, value_dim, op_chunk, chunk, n_chunks, padded_t,
                   kd, vd, block_v, (), (), ())
    seq = (base.heads_first(q, kd), base.heads_first(k, kd), base.heads_first(v, vd))
    pad_t = lambda x: base.to_tiles(x[..., None])[..., 0]
    # Per-token scalars, in chunk coordinates: G = cumulative log gate, counts = resets so far.
    bt = pad_t(jnp.transpose(beta, (0, 2, 1)).reshape(bh, length))
    gt = pad_t(jnp.transpose(g, (0, 2, 1)).reshape(bh, length))
    rt = pad_t(jnp.broadcast_to(reset.astype(F32)[:, None], (batch, heads, length)).reshape(bh, length))
    gcum = jnp.cumsum(gt.reshape(bh, n_chunks, chunk), axis=-1)
    ccum = jnp.cumsum(rt.reshape(bh, n_chunks, chunk), axis=-1)
    brs = bt.reshape(bh, n_chunks, chunk)
    scalars = [x.astype(F32) for x in (brs, gcum, ccum)]
    cols = tuple(x.reshape(bh, padded_t, 1) for x in scalars)
    rows = tuple(x[:, :, None, :] if target == "tpu" else x for x in scalars)
    return dataclasses.replace(base, seq=seq, cols=cols, rows=rows)


def delta_rule_forward(q, k, v, beta, g, h0, reset, *, scale, chunk_size, gated, segmented,
                       target: str, interpret=None, block_sizes: BlockSizes | None = None):
    """(o [B,T,H,V], final state [B,H,K,V], states entering each chunk [B,H,N,K,V]).

    On GPU, key dims above GPU_FORWARD_MAX_KEY_DIM run the XLA forward (the same chunk states):
    the Triton forward would ask 262,144 bytes of shared memory at K = 256.
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    if target == "cuda" and q.shape[-1] > GPU_FORWARD_MAX_KEY_DIM:
        from pallas_kernels.delta_rule import xla as _xla
        return _xla.delta_rule_forward(q, k, v, beta, g, h0, reset, scale=scale,
                                       chunk_size=chunk_size, gated=gated, segmented=segmented)

    acc = h0.dtype
    if acc != F32:
        raise ValueError(f"delta_rule: the Pallas kernels accumulate in float32, got {acc}")
    lay = _layout(q, k, v, beta, g, reset, chunk_size=chunk_size, target=target,
                  block_sizes=block_sizes)
    bh, n_v, chunk, n_chunks, padded_t = lay.bh, lay.n_v, lay.chunk, lay.n_chunks, lay.padded_t
    kd, vd, block_v = lay.kd, lay.vd, lay.block_v
    h0f = lay.state_in(h0)
    body = functools.partial(chunk_step, scale=scale, gated=gated, segmented=segmented)
    interpret = interpret if interpret is not None else False

    if target == "tpu":
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
        with _matmuls(target, interpret):
            o, final, states = call(*lay.seq, *lay.cols, *lay.rows, h0f)
    else:
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
        with _matmuls(target, interpret):
            o, final, states = call(*lay.seq, *lay.cols, *lay.rows, h0f)
        states = states.reshape(bh, n_chunks, kd, vd)

    o = lay.seq_out(o, lay.value_dim)
    final = final[:, :lay.key_dim, :lay.value_dim].reshape(h0.shape)
    states = states[:, :, :lay.key_dim, :lay.value_dim].reshape(
        lay.batch, lay.heads, n_chunks, lay.key_dim, lay.value_dim)
    return o, final, states


# ---------------------------------------------------------------------------------------------
# Backward: the chunks in reverse, carrying dS; each program owns one value block, so the
# cotangents of q, k, beta and the gates come out per value block and are summed after.

def _tpu_bwd_kernel(q_ref, k_ref, v_ref, bc_ref, gc_ref, cc_ref, br_ref, gr_ref, cr_ref, s_ref,
                    do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dbc_ref, dgc_ref, dbr_ref, dgr_ref,
                    dh0_ref, ds_scr, *, body):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dfinal_ref[...]

    dq, dk, dv, dbc, dbr, dgc, dgr, ds = body(
        q_ref[...].astype(F32), k_ref[...].astype(F32), v_ref[...].astype(F32), bc_ref[...],
        br_ref[...], gc_ref[...], gr_ref[...], cc_ref[...], cr_ref[...], s_ref[...],
        do_ref[...].astype(F32), ds_scr[...])
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv
    dbc_ref[...] = dbc
    dgc_ref[...] = dgc
    dbr_ref[...] = dbr
    dgr_ref[...] = dgr
    ds_scr[...] = ds

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = ds


def _gpu_bwd_kernel(q_ref, k_ref, v_ref, bc_ref, gc_ref, cc_ref, br_ref, gr_ref, cr_ref, s_ref,
                    do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dbc_ref, dgc_ref, dbr_ref,
                    dgr_ref, dh0_ref, *, body, chunk, n_chunks, key_dim):
    def step(i, ds_next):
        n = n_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        one = pl.ds(n, 1)
        dq, dk, dv, dbc, dbr, dgc, dgr, ds = body(
            q_ref[rows, :].astype(F32), k_ref[rows, :].astype(F32), v_ref[rows, :].astype(F32),
            bc_ref[rows, :], br_ref[one, :], gc_ref[rows, :], gr_ref[one, :], cc_ref[rows, :],
            cr_ref[one, :], s_ref[pl.ds(n * key_dim, key_dim), :], do_ref[rows, :].astype(F32),
            ds_next)
        dq_ref[rows, :] = dq
        dk_ref[rows, :] = dk
        dv_ref[rows, :] = dv
        dbc_ref[rows, :] = dbc
        dgc_ref[rows, :] = dgc
        dbr_ref[one, :] = dbr
        dgr_ref[one, :] = dgr
        return ds

    dh0_ref[...] = jax.lax.fori_loop(0, n_chunks, step, dfinal_ref[...])


def delta_rule_backward(q, k, v, beta, g, h0, reset, states, do, dfinal, *, scale, chunk_size,
                        gated, segmented, target: str, interpret=None,
                        block_sizes: BlockSizes | None = None):
    """Cotangents (dq, dk, dv, dbeta, dg, dh0) from the forward kernels' chunk states: the
    same chunk geometry, so `states` [B,H,N,K,V] are the states entering the kernels' chunks.

    On GPU, key dims above GPU_BACKWARD_MAX_KEY_DIM take the XLA backward (the same chunks, so
    the same states): the Triton backward body keeps too many [C, K] and [C, C] tiles in shared
    memory for one SM (327,680 bytes asked at K = 128 against the H100's 232,448), whatever
    the value block. So do GPUs before Hopper (GPU_BACKWARD_MIN_COMPUTE_CAPABILITY).
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    if target == "cuda" and (q.shape[-1] > GPU_BACKWARD_MAX_KEY_DIM
                             or not gpu_backward_kernel_fits(cuda_compute_capability())):
        from pallas_kernels.delta_rule import xla as _xla
        return _xla.delta_rule_backward(q, k, v, beta, g, h0, reset, states, do, dfinal,
                                        scale=scale, chunk_size=chunk_size, gated=gated,
                                        segmented=segmented)

    lay = _layout(q, k, v, beta, g, reset, chunk_size=chunk_size, target=target,
                  block_sizes=block_sizes)
    bh, n_v, chunk, n_chunks, padded_t = lay.bh, lay.n_v, lay.chunk, lay.n_chunks, lay.padded_t
    kd, vd, block_v = lay.kd, lay.vd, lay.block_v
    if states.shape[2] != n_chunks:
        raise ValueError(f"delta_rule: {states.shape[2]} chunk states for {n_chunks} chunks")
    sf = lay.state_in(states.astype(F32))                     # [BH, N, kd, vd]
    dof = lay.heads_first(do, vd)
    dfin = lay.state_in(dfinal.astype(F32))
    body = functools.partial(chunk_step_vjp, scale=scale, gated=gated, segmented=segmented)
    interpret = interpret if interpret is not None else False
    per_block = lambda *shape: jax.ShapeDtypeStruct((n_v, bh) + shape, F32)
    out_shape = [per_block(padded_t, kd), per_block(padded_t, kd),
                 jax.ShapeDtypeStruct((bh, padded_t, vd), F32),
                 per_block(padded_t, 1), per_block(padded_t, 1)]

    if target == "tpu":
        last = n_chunks - 1
        seq_k = pl.BlockSpec((None, chunk, kd), lambda b, j, n: (b, last - n, 0))
        seq_v = pl.BlockSpec((None, chunk, block_v), lambda b, j, n: (b, last - n, j))
        col = pl.BlockSpec((None, chunk, 1), lambda b, j, n: (b, last - n, 0))
        rowspec = pl.BlockSpec((None, None, 1, chunk), lambda b, j, n: (b, last - n, 0, 0))
        states_spec = pl.BlockSpec((None, None, kd, block_v), lambda b, j, n: (b, last - n, 0, j))
        state = pl.BlockSpec((None, kd, block_v), lambda b, j, n: (b, 0, j))
        blk_k = pl.BlockSpec((None, None, chunk, kd), lambda b, j, n: (j, b, last - n, 0))
        blk_col = pl.BlockSpec((None, None, chunk, 1), lambda b, j, n: (j, b, last - n, 0))
        blk_row = pl.BlockSpec((None, None, None, 1, chunk),
                               lambda b, j, n: (j, b, last - n, 0, 0))
        out_shape += [per_block(n_chunks, 1, chunk), per_block(n_chunks, 1, chunk),
                      jax.ShapeDtypeStruct((bh, kd, vd), F32)]
        call = pl.pallas_call(
            functools.partial(_tpu_bwd_kernel, body=body),
            grid=(bh, n_v, n_chunks), out_shape=out_shape,
            in_specs=[seq_k, seq_k, seq_v] + [col] * _N_COL + [rowspec] * _N_ROW
            + [states_spec, seq_v, state],
            out_specs=[blk_k, blk_k, seq_v, blk_col, blk_col, blk_row, blk_row, state],
            scratch_shapes=[pltpu.VMEM((kd, block_v), F32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name="memzoo_delta_rule_bwd")
        sf_in = sf
    else:
        seq_k = pl.BlockSpec((None, padded_t, kd), lambda b, j: (b, 0, 0))
        seq_v = pl.BlockSpec((None, padded_t, block_v), lambda b, j: (b, 0, j))
        col = pl.BlockSpec((None, padded_t, 1), lambda b, j: (b, 0, 0))
        rowspec = pl.BlockSpec((None, n_chunks, chunk), lambda b, j: (b, 0, 0))
        states_spec = pl.BlockSpec((None, n_chunks * kd, block_v), lambda b, j: (b, 0, j))
        state = pl.BlockSpec((None, kd, block_v), lambda b, j: (b, 0, j))
        blk_k = pl.BlockSpec((None, None, padded_t, kd), lambda b, j: (j, b, 0, 0))
        blk_col = pl.BlockSpec((None, None, padded_t, 1), lambda b, j: (j, b, 0, 0))
        blk_row = pl.BlockSpec((None, None, n_chunks, chunk), lambda b, j: (j, b, 0, 0))
        out_shape += [per_block(n_chunks, chunk), per_block(n_chunks, chunk),
                      jax.ShapeDtypeStruct((bh, kd, vd), F32)]
        call = pl.pallas_call(
            functools.partial(_gpu_bwd_kernel, body=body, chunk=chunk, n_chunks=n_chunks,
                              key_dim=kd),
            grid=(bh, n_v), out_shape=out_shape,
            in_specs=[seq_k, seq_k, seq_v] + [col] * _N_COL + [rowspec] * _N_ROW
            + [states_spec, seq_v, state],
            out_specs=[blk_k, blk_k, seq_v, blk_col, blk_col, blk_row, blk_row, state],
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret, name="memzoo_delta_rule_bwd")
        sf_in = sf.reshape(bh, n_chunks * kd, vd)
    with _matmuls(target, interpret):
        dq, dk, dv, dbc, dgc, dbr, dgr, dh0 = call(*lay.seq, *lay.cols, *lay.rows, sf_in, dof,
                                                   dfin)

    # Sum over value blocks; beta and G got cotangents as columns and as rows.
    dq, dk, dbc, dgc = (jnp.sum(x, axis=0) for x in (dq, dk, dbc, dgc))
    dbr, dgr = (jnp.sum(x, axis=0).reshape(bh, padded_t) for x in (dbr, dgr))
    dbeta = dbc[..., 0] + dbr
    d_cum = (dgc[..., 0] + dgr).reshape(bh, n_chunks, chunk)
    # G is a cumulative sum of g inside each chunk: dg is the reverse cumulative sum of dG.
    dg = jnp.flip(jnp.cumsum(jnp.flip(d_cum, -1), axis=-1), -1).reshape(bh, padded_t)
    if not gated:
        dg = jnp.zeros_like(dg)
    dh0 = dh0[:, :lay.key_dim, :lay.value_dim].reshape(h0.shape)
    return (lay.seq_out(dq, lay.key_dim).astype(q.dtype),
            lay.seq_out(dk, lay.key_dim).astype(k.dtype),
            lay.seq_out(dv, lay.value_dim).astype(v.dtype),
            lay.scalar_out(dbeta).astype(beta.dtype), lay.scalar_out(dg).astype(g.dtype),
            dh0.astype(h0.dtype))
