"""The Hopper (sm_90a) forward kernel of `linear_scan` in Pallas on Mosaic GPU.

    h_t = a_t h_{t-1} + b_t      (elementwise over channels; reverse=True walks t downwards)

One program (one warpgroup, 128 threads) per (batch, block of 128 channels): a thread owns one
channel, whose float32 state lives in a register for the whole walk. Time is the only
sequential axis, so the parallelism is batch x channels / 128 programs, as for the Triton
kernel; what Hopper adds is the memory path. `plgpu.emit_pipeline` streams chunks of
`rows(dtype)` time steps of a and b into shared memory by TMA, `STAGES` chunks in flight, so the
loads of later chunks overlap the dependent walk over this one:

    in  (TMA -> SMEM, pipelined): a, b [rows, 128] in their dtype (bf16 / f16 / f32)
    out (SMEM -> TMA): h [rows, 128] in b's dtype, from two buffers used in turn; a buffer is
        rewritten only once the copy that read it two chunks ago has finished
        (`wait_smem_to_gmem(1, wait_read_only=True)`)
    registers: the state h [128] float32 (one per thread), the initial and final state

A row of a chunk is one 128-element vector in the strided warpgroup layout (element c on
thread c), so the walk loads a_t, b_t from SMEM and stores h_t back with no shuffles. Time is
padded at the end (reverse: the walk meets the padding first) with a = 1, b = 0, which leaves
the state unchanged, and channels with zeros; both are cut off outside.

Segment resets arrive as a_t = 0 (the op's `__init__` cuts a before dispatch) and the
initial state as h0, so this kernel covers every real call; complex inputs (two planes with a
complex product) run the Triton kernel. The backward is the Triton / XLA transposed scan the
custom VJP already runs: it reads only a, h and h0, which this forward returns unchanged.

Written for GPU interpret mode as well (JAX 0.12.0.1): the outputs are copied out by hand,
not through emit_pipeline's predicated output stage, which the interpreter does not model.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch

F32 = jnp.float32
_OP = "linear_scan"
BLOCK_D = 128      # channels per program: one per thread of the warpgroup
TILE_BYTES = 16384  # one chunk of one operand: 64 time steps of bf16, 32 of f32
STAGES = 2         # chunks of a and b in flight: 96 KiB of SMEM with the two output buffers,
                   # so two programs fit on an SM
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def available() -> bool:
    """Whether the installed JAX has Pallas Mosaic GPU with what this kernel uses."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return False
    return all(hasattr(plgpu, n) for n in ("emit_pipeline", "kernel", "Layout", "SMEM"))


def interpret_params():
    """GPU interpret mode as the kernel tests ask: race detection on, uninitialised memory NaN."""
    return _dispatch.gpu_interpret_params()


def supports(a, b, h0) -> bool:
    """Whether this kernel computes the call (else the op runs the Triton kernel): real a, b of
    one 16- or 32-bit dtype (the op casts both to the promoted dtype) and a float32 state."""
    return (available() and a.dtype == b.dtype and any(b.dtype == d for d in DTYPES)
            and h0.dtype == F32)


def rows(dtype) -> int:
    """Time steps per pipelined chunk: one 16 KiB tile per operand."""
    return TILE_BYTES // (BLOCK_D * jnp.dtype(dtype).itemsize)


def _round_up(x, m):
    return -(-x // m) * m


def linear_scan_forward(a, b, h0, *, reverse: bool, interpret=None):
    """`pallas.linear_scan_forward` (target "cuda") on Mosaic GPU: (h [B, T, D] in b's dtype,
    final state [B, D] float32)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not supports(a, b, h0):
        raise ValueError(f"{_OP}: the Mosaic GPU kernel takes real a, b of one dtype in "
                         f"{[jnp.dtype(d).name for d in DTYPES]} and a float32 state, got "
                         f"a {a.dtype}, b {b.dtype}, initial_state {h0.dtype}")
    batch, length, width = b.shape
    padded_t, padded_d = _round_up(length, rows(b.dtype)), _round_up(width, BLOCK_D)
    pad_td = [(0, 0), (0, padded_t - length), (0, padded_d - width)]
    if padded_t != length or padded_d != width:
        # A padded step (a = 1, b = 0) leaves the state as it was.
        a = jnp.pad(a, pad_td, constant_values=1.0)
        b = jnp.pad(b, pad_td)
    h0 = jnp.pad(h0, [(0, 0), (0, padded_d - width)]) if padded_d != width else h0
    h, final = _call(a, b, h0, reverse, interpret, plgpu)
    return h[:, :length, :width], final[:, :width]


def _call(a, b, h0, reverse, interpret, plgpu):
    batch, padded_t, padded_d = b.shape
    dt = b.dtype
    nrows = rows(dt)
    n = padded_t // nrows
    row_layout = plgpu.Layout.WG_STRIDED((BLOCK_D,), vec_size=1)

    def kernel(a_ref, b_ref, h0_ref, h_ref, fin_ref):
        i, j = jax.lax.axis_index("b"), jax.lax.axis_index("d")
        cols = pl.ds(j * BLOCK_D, BLOCK_D)

        def load_state(smem, bar):
            plgpu.copy_gmem_to_smem(h0_ref.at[i, cols], smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            return plgpu.load(smem, layout=row_layout)

        h_init = pl.run_scoped(load_state, plgpu.SMEM((BLOCK_D,), F32),
                               plgpu.Barrier(num_barriers=1))

        def chunk_body(out_s, idx, a_s, b_s, h):
            step = idx[0]
            t = n - 1 - step if reverse else step
            slot = step % 2
            # The copy issued from this buffer two chunks ago must have read it.
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            o_s = out_s.at[slot]

            def row(r, h):
                rr = nrows - 1 - r if reverse else r
                a_t = plgpu.load(a_s.at[rr], layout=row_layout).astype(F32)
                b_t = plgpu.load(b_s.at[rr], layout=row_layout).astype(F32)
                h = a_t * h + b_t
                o_s[rr] = h.astype(dt)
                return h

            h = jax.lax.fori_loop(0, nrows, row, h)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, h_ref.at[i, pl.ds(t * nrows, nrows), cols])
            return h

        tile = plgpu.BlockSpec((nrows, BLOCK_D),
                               (lambda s: (n - 1 - s, 0)) if reverse else (lambda s: (s, 0)))

        def walk(out_s):
            last = plgpu.emit_pipeline(
                functools.partial(chunk_body, out_s), grid=(n,), in_specs=[tile, tile],
                max_concurrent_steps=STAGES, init_carry=h_init)(
                    a_ref.at[i, :, cols], b_ref.at[i, :, cols])
            plgpu.wait_smem_to_gmem(0)      # before the output buffers are released
            return last

        h_last = pl.run_scoped(walk, plgpu.SMEM((2, nrows, BLOCK_D), dt))

        def store_final(smem):
            smem[...] = h_last
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, fin_ref.at[i, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_final, plgpu.SMEM((BLOCK_D,), F32))

    out_type = (jax.ShapeDtypeStruct((batch, padded_t, padded_d), dt),
                jax.ShapeDtypeStruct((batch, padded_d), F32))
    call = plgpu.kernel(kernel, out_type=out_type, grid=(batch, padded_d // BLOCK_D),
                        grid_names=("b", "d"),
                        interpret=interpret if interpret is not None else False)
    return call(a, b, h0)
