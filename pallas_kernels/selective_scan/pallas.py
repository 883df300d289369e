"""Pallas kernels for `selective_scan`'s forward: the state never leaves the chip.

Both kernels keep the state [N, block_c] (channels on the lanes, as in xla.py) in registers /
VMEM, parallelise over (batch, channel blocks) and walk time, forming exp(dt_t A) and
dt_t u_t B_t one step at a time. They also write the state at the start of every segment of
`xla.segment_length(N)` steps: the checkpoints the backward (xla.selective_scan_backward)
recomputes from, so the residuals are the same whichever implementation ran the forward.

B, C (and the segment mask keep) arrive transposed, [B, G, N, T] (time on the lanes):

* TPU (Mosaic): grid (batch, channel blocks, time blocks), time "arbitrary", the state in a VMEM
  scratch between time blocks. The body walks aligned windows of 8 rows of dt, u, y; the 8
  columns of B, C, keep a window needs come out of one small one-hot matmul on the MXU (exact
  at HIGHEST precision), which avoids dynamic lane slicing.
* GPU (Triton): grid (batch, channel blocks); each program walks all of time one row at a time,
  loading a (1, block_c) row of dt, u and an (N, 1) column of B, C.

A channel block never straddles two groups of B, C: block_c divides C / G (ops.py's callers fall
back to the XLA path when no block size fits, see `supported`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._chunks import round_up as _round_up
from pallas_kernels.selective_scan import xla as _xla

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_t: time rows per TPU grid step (rounded up to a multiple of the checkpoint segment;
    unused on GPU, which walks all of time); block_c: channels per program."""

    block_t: int
    block_c: int

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            # dt, u, y tiles of 256 x 512 x 4 B, double-buffered: 3 MiB of VMEM, and a state of
            # N x 512 floats (32 KiB at N = 16).
            return cls(block_t=256, block_c=512)
        if target == "cuda":
            # B2 D1024: 2 x 1024 / 32 = 64 programs; the state, 16 x 32 floats, stays in registers.
            return cls(block_t=0, block_c=32)
        raise ValueError(f"selective_scan: unknown Pallas target {target!r}")


# The TPU kernel's [N, block_c] tiles (state, A, the unrolled steps' temporaries, and the
# checkpoints of a time block) grow with the state size N: at N = 256 and 512 channels they
# overflow the 16 MiB of scoped VMEM (v5e: "CompileTimeScopedVmemOom"). Channel blocks are cut
# to keep N x block_c at the default's 16 x 512 floats, never below one 128-lane tile (so from
# N = 64 on, blocks of 128 channels).
_TPU_STATE_TILE = 16 * 512


def tpu_channel_cap(state: int) -> int:
    """The largest TPU channel block for state size N (a multiple of 128)."""
    return max(128, _TPU_STATE_TILE // _round_up(state, 8) // 128 * 128)


def _channel_block(target, channels, groups, block_c):
    """The channel block for this call, or None when no block fits the target's tiling."""
    per_group = channels // groups
    if target == "tpu":
        if groups == 1:
            return min(block_c, _round_up(channels, 128))
        for bc in range(min(block_c, per_group), 127, -1):
            if bc % 128 == 0 and per_group % bc == 0:
                return bc
        return None
    bc = min(block_c, pl.next_power_of_2(channels))
    if groups > 1:
        while per_group % bc:
            bc //= 2
    return bc


def supported(target, channels, groups, block_sizes=None) -> bool:
    bs = block_sizes or BlockSizes.get_default(target)
    return _channel_block(target, channels, groups, bs.block_c) is not None


def _step(h, a_t, dt_row, u_row, b_col, c_col, keep):
    """One step on the [N, block_c] state: rows are (1, block_c), columns (N, 1), keep (1, 1)."""
    h = jnp.exp(dt_row * a_t) * keep * h + (dt_row * u_row) * b_col
    return h, jnp.sum(h * c_col, axis=0, keepdims=True)


def _tpu_kernel(dt_ref, u_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref,
                y_ref, hT_ref, saved_ref, state, *, seg):
    t_blk = pl.program_id(2)

    @pl.when(t_blk == 0)
    def _():
        state[...] = h0_ref[...].astype(F32)

    a_t = a_ref[...]
    b_all, c_all, k_all = b_ref[...], c_ref[...], keep_ref[...]
    block_t = dt_ref.shape[0]
    rows = 8

    def window(i, h):
        start = pl.multiple_of(i * rows, rows)
        dt8 = dt_ref[pl.ds(start, rows), :]
        u8 = u_ref[pl.ds(start, rows), :]
        # One-hot [block_t, 8]: column j picks time start + j out of the lane axis.
        pick = (jax.lax.broadcasted_iota(jnp.int32, (block_t, rows), 0)
                == start + jax.lax.broadcasted_iota(jnp.int32, (block_t, rows), 1)).astype(F32)
        dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST,
                                preferred_element_type=F32)
        b8, c8, k8 = dot(b_all, pick), dot(c_all, pick), dot(k_all, pick)
        ys = []
        for j in range(rows):
            h, y = _step(h, a_t, dt8[j:j + 1], u8[j:j + 1], b8[:, j:j + 1], c8[:, j:j + 1],
                         k8[:, j:j + 1])
            ys.append(y)
        y_ref[pl.ds(start, rows), :] = jnp.concatenate(ys, axis=0).astype(y_ref.dtype)
        return h

    per_seg = seg // rows

    def segment(s, h):
        saved_ref[s] = h
        return jax.lax.fori_loop(s * per_seg, (s + 1) * per_seg, window, h)

    h = jax.lax.fori_loop(0, block_t // seg, segment, state[...])
    state[...] = h

    @pl.when(t_blk == pl.num_programs(2) - 1)
    def _():
        hT_ref[...] = h


def _gpu_kernel(dt_ref, u_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref,
                y_ref, hT_ref, saved_ref, *, seg):
    a_t = a_ref[...]

    def step(t, h):
        h, y = _step(h, a_t, dt_ref[pl.ds(t, 1), :], u_ref[pl.ds(t, 1), :],
                     b_ref[:, pl.ds(t, 1)], c_ref[:, pl.ds(t, 1)], keep_ref[:, pl.ds(t, 1)])
        y_ref[pl.ds(t, 1), :] = y.astype(y_ref.dtype)
        return h

    def segment(s, h):
        saved_ref[s] = h
        return jax.lax.fori_loop(s * seg, (s + 1) * seg, step, h)

    n_seg = saved_ref.shape[0]
    hT_ref[...] = jax.lax.fori_loop(0, n_seg, segment, h0_ref[...].astype(F32))


def selective_scan_forward(dt, u, b, c, a, h0, keep, *, target: str, interpret=None,
                           block_sizes: BlockSizes | None = None):
    """As xla.selective_scan_forward(..., save_states=True): (y, h_T, saved [B, S, N, C])."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    batch, length, channels = u.shape
    groups, state = b.shape[2], b.shape[3]
    seg = _xla.segment_length(state)
    n_seg = -(-length // seg)
    bs = block_sizes or BlockSizes.get_default(target)
    block_c = bs.block_c
    if target == "tpu":
        block_c = min(block_c, tpu_channel_cap(state))
    bc = _channel_block(target, channels, groups, block_c)
    if bc is None:
        raise ValueError(f"selective_scan: no {target} channel block divides {channels // groups} "
                         "channels per group")
    if target == "tpu":
        state_p = _round_up(state, 8)
        # A whole number of checkpoint segments, and of 128 lanes (time is the lane axis of
        # B, C and keep).
        unit = math.lcm(seg, 128)
        block_t = min(_round_up(max(bs.block_t, seg), unit), _round_up(length, unit))
        padded_t = _round_up(length, block_t)
    else:
        state_p = pl.next_power_of_2(state)
        padded_t = n_seg * seg
    padded_c = _round_up(channels, bc) if groups == 1 else channels

    def pad(x, widths):
        return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)

    # Padded steps have dt = 0 (decay 1, no input), padded state entries have B = C = 0.
    dt_p = pad(dt.astype(F32), [(0, 0), (0, padded_t - length), (0, padded_c - channels)])
    u_p = pad(u.astype(F32), [(0, 0), (0, padded_t - length), (0, padded_c - channels)])
    lanes = lambda x: pad(jnp.transpose(x.astype(F32), (0, 2, 3, 1)),
                          [(0, 0), (0, 0), (0, state_p - state), (0, padded_t - length)])
    b_p, c_p = lanes(b), lanes(c)
    keep_p = jnp.pad(keep.astype(F32), [(0, 0), (0, padded_t - length)],
                     constant_values=1.0)[:, None, :]
    a_p = pad(a.T.astype(F32), [(0, state_p - state), (0, padded_c - channels)])
    h0_p = pad(jnp.swapaxes(h0, 1, 2).astype(F32),
               [(0, 0), (0, state_p - state), (0, padded_c - channels)])
    n_c = padded_c // bc
    per_group = channels // groups
    group_of = (lambda d: 0) if groups == 1 else (lambda d: (d * bc) // per_group)
    n_saved = padded_t // seg
    out_shape = [jax.ShapeDtypeStruct((batch, padded_t, padded_c), F32),
                 jax.ShapeDtypeStruct((batch, state_p, padded_c), F32),
                 jax.ShapeDtypeStruct((batch, n_saved, state_p, padded_c), F32)]

    if target == "tpu":
        n_t = padded_t // block_t
        rows = pl.BlockSpec((None, block_t, bc), lambda i, d, t: (i, t, d))
        cols = pl.BlockSpec((None, None, state_p, block_t), lambda i, d, t: (i, group_of(d), 0, t))
        keep_spec = pl.BlockSpec((None, 1, block_t), lambda i, d, t: (i, 0, t))
        a_spec = pl.BlockSpec((state_p, bc), lambda i, d, t: (0, d))
        st = pl.BlockSpec((None, state_p, bc), lambda i, d, t: (i, 0, d))
        saved_spec = pl.BlockSpec((None, block_t // seg, state_p, bc), lambda i, d, t: (i, t, 0, d))
        call = pl.pallas_call(
            functools.partial(_tpu_kernel, seg=seg), grid=(batch, n_c, n_t), out_shape=out_shape,
            in_specs=[rows, rows, cols, cols, keep_spec, a_spec, st],
            out_specs=[rows, st, saved_spec],
            scratch_shapes=[pltpu.VMEM((state_p, bc), F32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret if interpret is not None else False,
            name="memzoo_selective_scan")
    elif target == "cuda":
        rows = pl.BlockSpec((None, padded_t, bc), lambda i, d: (i, 0, d))
        cols = pl.BlockSpec((None, None, state_p, padded_t), lambda i, d: (i, group_of(d), 0, 0))
        keep_spec = pl.BlockSpec((None, 1, padded_t), lambda i, d: (i, 0, 0))
        a_spec = pl.BlockSpec((state_p, bc), lambda i, d: (0, d))
        st = pl.BlockSpec((None, state_p, bc), lambda i, d: (i, 0, d))
        saved_spec = pl.BlockSpec((None, n_saved, state_p, bc), lambda i, d: (i, 0, 0, d))
        call = pl.pallas_call(
            functools.partial(_gpu_kernel, seg=seg), grid=(batch, n_c), out_shape=out_shape,
            in_specs=[rows, rows, cols, cols, keep_spec, a_spec, st],
            out_specs=[rows, st, saved_spec],
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret if interpret is not None else False,
            name="memzoo_selective_scan")
    else:
        raise ValueError(f"selective_scan: unknown Pallas target {target!r}")

    y, h_final, saved = call(dt_p, u_p, b_p, c_p, keep_p, a_p, h0_p)
    y = y[:, :length, :channels].astype(u.dtype)
    h_final = jnp.swapaxes(h_final[:, :state, :channels], 1, 2).astype(h0.dtype)
    saved = saved[:, :n_seg, :state, :channels].astype(h0.dtype)
    return y, h_final, saved
