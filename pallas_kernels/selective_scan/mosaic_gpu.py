"""The Hopper (sm_90a) forward kernel of `selective_scan` (Mamba-1 S6) in Pallas on Mosaic GPU.

    h_t[n] = exp(dt_t A[n]) keep_t h_{t-1}[n] + dt_t u_t B_t[n]      y_t = sum_n C_t[n] h_t[n]

per channel (D skip and the silu(z) gate are applied outside, in the op). One program (one
warpgroup) per (batch, block of 128 channels inside one group of B, C): a thread owns one
channel and keeps its N state entries (float32) in registers for the whole walk.
`plgpu.emit_pipeline` streams chunks of `ROWS` steps by TMA, 2 in flight:

    in  (TMA -> SMEM, pipelined): dt, u [ROWS, 128] in their dtype (bf16 / f16 / f32); the
        group's B, C [ROWS, N4] in theirs (N padded to 16 bytes: 4 entries of f32, 8 of a
        16-bit dtype, TMA's row granule); keep [ROWS] f32 (0 where a segment starts)
    out (SMEM -> TMA): y [ROWS, 128] from two buffers used in turn, as in linear_scan's kernel;
        the state at the start of every checkpoint segment (`xla.segment_length(N)` steps, a
        multiple of ROWS) [N4, 128], the layout `xla.selective_scan_backward` recomputes from
    registers: h [N] x 128 (one row of N per thread), A [N] x 128 (loaded once)

B_t[n], C_t[n] and keep_t are the same for every channel of the block: each thread reads them
as scalars from SMEM (a broadcast, no shuffles). Padded steps have dt = 0 (decay 1, no input),
padded channels and state entries zeros; all are cut off outside. Every tile is widened to
float32 as it leaves SMEM: the state, exp(dt A) and y are float32 whatever the tiles' dtype.

dt, u, B, C each in bf16, f16 or float32, N <= 64 and, for grouped B, C, 128-channel blocks
inside a group; other calls run the Triton kernel. The op forms dt in float32 and, where u, B
and C share one 16-bit dtype, hands them over in it (`tiles` in __init__.py; the float32 copies
the other paths use are exact widenings, which XLA folds away), halving their reads.
The backward is xla.py's, from the checkpoints this kernel writes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch
from pallas_kernels.selective_scan import xla as _xla

F32 = jnp.float32
BLOCK_C = 128      # channels per program: one per thread
ROWS = 32          # steps per chunk (16 KiB of f32 dt or u, 8 of 16-bit); divides every segment
MAX_STATE = 64     # state entries unrolled per step, all in registers
DTYPES = (jnp.bfloat16, jnp.float16, F32)


def available() -> bool:
    """Whether the installed JAX has Pallas Mosaic GPU with what this kernel uses."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return False
    return all(hasattr(plgpu, n) for n in ("emit_pipeline", "kernel", "Layout", "SMEM"))


def interpret_params():
    return _dispatch.gpu_interpret_params()


def supports(u, b, h0) -> bool:
    """Whether this kernel computes the call (else the op runs the Triton kernel)."""
    channels, groups, state = u.shape[2], b.shape[2], b.shape[3]
    return (available() and any(u.dtype == d for d in DTYPES)
            and any(b.dtype == d for d in DTYPES) and h0.dtype == F32
            and state <= MAX_STATE and (groups == 1 or (channels // groups) % BLOCK_C == 0))


def _round_up(x, m):
    return -(-x // m) * m


def selective_scan_forward(dt, u, b, c, a, h0, keep, *, interpret=None):
    """As `pallas.selective_scan_forward` (target "cuda"): (y, h_T, saved [B, S, N, C]), all
    float32; dt, u, B, C each in a dtype of DTYPES (C in B's), A, h0 and keep float32."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    names = [jnp.dtype(d).name for d in DTYPES]
    if not (supports(u, b, h0) and any(dt.dtype == d for d in DTYPES) and c.dtype == b.dtype):
        raise ValueError(f"selective_scan: the Mosaic GPU kernel takes dt, u, B, C in {names} "
                         f"(C in B's dtype), a float32 state, state <= {MAX_STATE} and groups "
                         f"of a multiple of {BLOCK_C} channels, got dt {dt.dtype}, u {u.dtype} "
                         f"{tuple(u.shape)}, B {b.dtype} {tuple(b.shape)}, C {c.dtype}, "
                         f"initial_state {h0.dtype}")
    a, keep = a.astype(F32), keep.astype(F32)
    batch, length, channels = u.shape
    groups, state = b.shape[2], b.shape[3]
    seg = _xla.segment_length(state)
    n_seg = -(-length // seg)
    padded_t = n_seg * seg
    padded_c = _round_up(channels, BLOCK_C)
    n4 = _round_up(state, 16 // jnp.dtype(b.dtype).itemsize)
    rows_pad = [(0, 0), (0, padded_t - length), (0, padded_c - channels)]
    dt_p = jnp.pad(dt, rows_pad)
    u_p = jnp.pad(u, rows_pad)
    # [B, G, T, N4]: a chunk of a group's B (C) is one contiguous TMA box.
    cols = lambda x: jnp.pad(jnp.transpose(x, (0, 2, 1, 3)),
                             [(0, 0), (0, 0), (0, padded_t - length), (0, n4 - state)])
    b_p, c_p = cols(b), cols(c)
    keep_p = jnp.pad(keep, [(0, 0), (0, padded_t - length)], constant_values=1.0)
    a_p = jnp.pad(a.T, [(0, n4 - state), (0, padded_c - channels)])
    h0_p = jnp.pad(jnp.swapaxes(h0, 1, 2), [(0, 0), (0, n4 - state), (0, padded_c - channels)])
    y, h_final, saved = _call(dt_p, u_p, b_p, c_p, keep_p, a_p, h0_p, state=state, seg=seg,
                              per_group=channels // groups, interpret=interpret, plgpu=plgpu)
    y = y[:, :length, :channels]
    h_final = jnp.swapaxes(h_final[:, :state, :channels], 1, 2)
    saved = saved[:, :, :state, :channels]
    return y, h_final, saved


def _call(dt, u, b, c, keep, a, h0, *, state, seg, per_group, interpret, plgpu):
    batch, padded_t, padded_c = u.shape
    n4 = b.shape[-1]
    n = padded_t // ROWS
    row = plgpu.Layout.WG_STRIDED((BLOCK_C,), vec_size=1)

    def kernel(dt_ref, u_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref, y_ref, fin_ref, sv_ref):
        i, j = jax.lax.axis_index("b"), jax.lax.axis_index("c")
        cols = pl.ds(j * BLOCK_C, BLOCK_C)
        g = (j * BLOCK_C) // per_group

        def load_params(a_s, h_s, bar):
            plgpu.copy_gmem_to_smem(a_ref.at[:, cols], a_s, bar.at[0])
            plgpu.copy_gmem_to_smem(h0_ref.at[i, :, cols], h_s, bar.at[1])
            plgpu.barrier_wait(bar.at[0])
            plgpu.barrier_wait(bar.at[1])
            return ([plgpu.load(a_s.at[k], layout=row) for k in range(state)],
                    [plgpu.load(h_s.at[k], layout=row) for k in range(state)])

        a_rows, h_init = pl.run_scoped(load_params, plgpu.SMEM((n4, BLOCK_C), F32),
                                       plgpu.SMEM((n4, BLOCK_C), F32),
                                       plgpu.Barrier(num_barriers=2))

        def chunk_body(out_s, ck_s, idx, dt_s, u_s, b_s, c_s, k_s, h):
            t = idx[0]
            # Every copy but the newest (the previous chunk's y) has read its buffer.
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)

            @pl.when((t * ROWS) % seg == 0)
            def _():
                for k in range(state):
                    ck_s[k] = h[k]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(ck_s, sv_ref.at[i, (t * ROWS) // seg, :, cols])

            o_s = out_s.at[t % 2]

            def step(r, h):
                d = plgpu.load(dt_s.at[r], layout=row).astype(F32)
                du = d * plgpu.load(u_s.at[r], layout=row).astype(F32)
                kp = k_s[r]
                y = None
                h = list(h)
                for k in range(state):
                    bk, ck = b_s[r, k].astype(F32), c_s[r, k].astype(F32)
                    h[k] = jnp.exp(d * a_rows[k]) * kp * h[k] + du * bk
                    y = h[k] * ck if y is None else y + h[k] * ck
                o_s[r] = y
                return h

            h = jax.lax.fori_loop(0, ROWS, step, list(h))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, y_ref.at[i, pl.ds(t * ROWS, ROWS), cols])
            return h

        rows_spec = plgpu.BlockSpec((ROWS, BLOCK_C), lambda t: (t, 0))
        col_spec = plgpu.BlockSpec((ROWS, n4), lambda t: (t, 0))
        keep_spec = plgpu.BlockSpec((ROWS,), lambda t: (t,))

        def walk(out_s, ck_s):
            last = plgpu.emit_pipeline(
                functools.partial(chunk_body, out_s, ck_s), grid=(n,),
                in_specs=[rows_spec, rows_spec, col_spec, col_spec, keep_spec],
                max_concurrent_steps=2, init_carry=h_init)(
                    dt_ref.at[i, :, cols], u_ref.at[i, :, cols], b_ref.at[i, g], c_ref.at[i, g],
                    keep_ref.at[i])
            plgpu.wait_smem_to_gmem(0)
            return last

        h_last = pl.run_scoped(walk, plgpu.SMEM((2, ROWS, BLOCK_C), F32),
                               plgpu.SMEM((n4, BLOCK_C), F32))

        def store_final(smem):
            for k in range(state):
                smem[k] = h_last[k]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, fin_ref.at[i, :, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_final, plgpu.SMEM((n4, BLOCK_C), F32))

    # Padded state rows (n >= N) of the outputs are never written; they are cut off outside.
    out_type = (jax.ShapeDtypeStruct((batch, padded_t, padded_c), F32),
                jax.ShapeDtypeStruct((batch, n4, padded_c), F32),
                jax.ShapeDtypeStruct((batch, padded_t // seg, n4, padded_c), F32))
    call = plgpu.kernel(kernel, out_type=out_type, grid=(batch, padded_c // BLOCK_C),
                        grid_names=("b", "c"),
                        interpret=interpret if interpret is not None else False)
    return call(dt, u, b, c, keep, a, h0)
