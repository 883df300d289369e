"""Pallas kernels for `causal_conv1d`'s forward (the backward is autodiff of xla.py: the taps are
linear and store nothing per step).

* TPU (Mosaic): grid (batch, channel blocks, time blocks), time "arbitrary". A VMEM scratch of
  `halo + block_t` rows holds the last `halo` (W-1 rounded up to 8) inputs of the previous block
  in front of the current one, so every tap is one static, shifted slice of it; the first block's
  halo is the initial state. The last `halo` rows move to the front for the next block.
* GPU (Triton): grid (batch, channel blocks); each program walks all of time one row at a time
  over the initial state concatenated in front of x, W row loads per output row.

Segments arrive as `back` [B, T, 1] (xla.visible_history: how far token t may look back); tap i
(W-1-i steps back) is dropped where `back` is smaller.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._chunks import round_up as _round_up
from pallas_kernels.causal_conv1d.reference import apply_activation

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_t: time rows per TPU grid step (unused on GPU); block_c: channels per program."""

    block_t: int
    block_c: int

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            return cls(block_t=512, block_c=512)
        if target == "cuda":
            return cls(block_t=0, block_c=128)
        raise ValueError(f"causal_conv1d: unknown Pallas target {target!r}")


def _tpu_kernel(x_ref, back_ref, w_ref, bias_ref, state_ref, y_ref, ext, *, width, halo,
                activation):
    block_t = x_ref.shape[0]

    @pl.when(pl.program_id(2) == 0)
    def _():
        ext[0:halo, :] = state_ref[...].astype(F32)

    ext[halo:halo + block_t, :] = x_ref[...].astype(F32)
    back = back_ref[...]
    y = jnp.broadcast_to(bias_ref[...].astype(F32), (block_t, x_ref.shape[1]))
    for i in range(width):
        shift = width - 1 - i
        tap = ext[halo - shift:halo - shift + block_t, :] * w_ref[i:i + 1, :].astype(F32)
        if shift:
            tap = jnp.where(back >= shift, tap, 0.0)
        y = y + tap
    y_ref[...] = apply_activation(y, activation).astype(y_ref.dtype)
    ext[0:halo, :] = ext[block_t:block_t + halo, :]


def _gpu_kernel(ext_ref, back_ref, w_ref, bias_ref, y_ref, *, width, activation):
    weights = [w_ref[pl.ds(i, 1), :].astype(F32) for i in range(width)]
    bias = bias_ref[...].astype(F32)

    def row(t, carry):
        back = back_ref[pl.ds(t, 1), :]
        y = bias
        for i in range(width):
            shift = width - 1 - i
            tap = ext_ref[pl.ds(t + i, 1), :].astype(F32) * weights[i]
            if shift:
                tap = jnp.where(back >= shift, tap, 0.0)
            y = y + tap
        y_ref[pl.ds(t, 1), :] = apply_activation(y, activation).astype(y_ref.dtype)
        return carry

    jax.lax.fori_loop(0, y_ref.shape[0], row, 0)


def causal_conv1d_forward(x, weight, bias, state, back, *, activation, out_dtype, target: str,
                          interpret=None, block_sizes: BlockSizes | None = None):
    """As xla.causal_conv1d_forward (y only)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    batch, length, channels = x.shape
    width = weight.shape[0]
    bs = block_sizes or BlockSizes.get_default(target)
    if bias is None:
        bias = jnp.zeros((channels,), F32)
    if back is None:
        back = jnp.full((batch, length), width, jnp.int32)
    if target == "tpu":
        block_c = min(bs.block_c, _round_up(channels, 128))
        halo = _round_up(max(width - 1, 1), 8)
        # 16 rows: whole (16, 128) tiles also for 16-bit inputs.
        block_t = _round_up(min(max(bs.block_t, halo), _round_up(length, 16)), 16)
        padded_t = _round_up(length, block_t)
    else:
        block_c = min(bs.block_c, pl.next_power_of_2(channels))
        padded_t = length
    padded_c = _round_up(channels, block_c)
    dc, dt = padded_c - channels, padded_t - length
    pad = lambda v, widths: v if all(w == (0, 0) for w in widths) else jnp.pad(v, widths)
    w_p = pad(weight.astype(F32), [(0, 0), (0, dc)])
    bias_p = pad(bias.astype(F32), [(0, dc)])[None, :]
    back_p = pad(back.astype(jnp.int32), [(0, 0), (0, dt)])[..., None]
    out_shape = jax.ShapeDtypeStruct((batch, padded_t, padded_c), out_dtype)
    n_c = padded_c // block_c
    if target == "tpu":
        state_p = pad(state.astype(F32), [(0, 0), (halo - (width - 1), 0), (0, dc)])
        x_p = pad(x, [(0, 0), (0, dt), (0, dc)])
        rows = pl.BlockSpec((None, block_t, block_c), lambda b, c, t: (b, t, c))
        call = pl.pallas_call(
            functools.partial(_tpu_kernel, width=width, halo=halo, activation=activation),
            grid=(batch, n_c, padded_t // block_t), out_shape=out_shape,
            in_specs=[rows,
                      pl.BlockSpec((None, block_t, 1), lambda b, c, t: (b, t, 0)),
                      pl.BlockSpec((width, block_c), lambda b, c, t: (0, c)),
                      pl.BlockSpec((1, block_c), lambda b, c, t: (0, c)),
                      pl.BlockSpec((None, halo, block_c), lambda b, c, t: (b, 0, c))],
            out_specs=rows,
            scratch_shapes=[pltpu.VMEM((halo + block_t, block_c), F32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret if interpret is not None else False,
            name="memzoo_causal_conv1d")
        y = call(x_p, back_p, w_p, bias_p, state_p)
    elif target == "cuda":
        ext = pad(jnp.concatenate([state, x.astype(state.dtype)], axis=1),
                  [(0, 0), (0, 0), (0, dc)])
        call = pl.pallas_call(
            functools.partial(_gpu_kernel, width=width, activation=activation),
            grid=(batch, n_c), out_shape=out_shape,
            in_specs=[pl.BlockSpec((None, width - 1 + length, block_c), lambda b, c: (b, 0, c)),
                      pl.BlockSpec((None, length, 1), lambda b, c: (b, 0, 0)),
                      pl.BlockSpec((width, block_c), lambda b, c: (0, c)),
                      pl.BlockSpec((1, block_c), lambda b, c: (0, c))],
            out_specs=pl.BlockSpec((None, length, block_c), lambda b, c: (b, 0, c)),
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret if interpret is not None else False,
            name="memzoo_causal_conv1d")
        y = call(ext, back_p, w_p, bias_p)
    else:
        raise ValueError(f"causal_conv1d: unknown Pallas target {target!r}")
    return y[:, :length, :channels]
