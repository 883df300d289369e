"""Pallas kernels for `linear_scan`: one row-walking body, two launch shapes.

The scan is memory-bound, so both kernels stream the [batch, time, channels] arrays once, keep
the state in float32 registers and parallelise over (batch, channel blocks):

* TPU (Mosaic): grid (batch, channel blocks, time blocks); the time axis is sequential
  ("arbitrary") and the state lives in a VMEM scratch between time blocks. Inside a block the
  body walks groups of 8 rows (16 for 16-bit inputs): one aligned (8, block_d) load per operand
  is one vreg row-group, and the 8 dependent steps run on static slices of it.
* GPU (Triton): grid (batch, channel blocks); each program walks all of time one row at a time,
  a coalesced (1, block_d) load per operand and step. Triton has no cross-program scratch, and
  a GPU scan gets its parallelism from the channels.

The same driver runs the backward pass (the transposed scan, walked the other way), so the
forward and backward kernels share every line but the arithmetic of one step. Complex inputs
travel as real and imaginary planes (neither Mosaic nor Triton has complex types).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch
from pallas_kernels._chunks import round_up as _round_up

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_t: time rows per TPU grid step (unused on GPU, which walks all of time);
    block_d: channels per program."""

    block_t: int
    block_d: int

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            # 3 operands x 2 pipeline buffers x 256 x 512 x 4 B = 3 MiB of VMEM: far under the
            # scoped limit on every TPU generation, large enough to hide DMA latency.
            return cls(block_t=256, block_d=512)
        if target == "cuda":
            # 64 channels per program: 8 x 1024 / 64 = 128 programs at B8 D1024, about one per SM.
            return cls(block_t=0, block_d=64)
        raise ValueError(f"linear_scan: unknown Pallas target {target!r}")


# ---------------------------------------------------------------------------------------------
# The arithmetic of one time step, on planes: (x,) for real values, (re, im) for complex ones.


def _mul(x, y):
    if len(x) == 1:
        return (x[0] * y[0],)
    return (x[0] * y[0] - x[1] * y[1], x[0] * y[1] + x[1] * y[0])


def _add(x, y):
    return tuple(u + v for u, v in zip(x, y))


def _split(values, planes):
    return [tuple(values[i * planes:(i + 1) * planes]) for i in range(len(values) // planes)]


def forward_step(xs, h, planes):
    """xs = a_t planes + b_t planes; h_t = a_t h_{t-1} + b_t. Emits h_t."""
    a, b = _split(xs, planes)
    h = _add(_mul(a, h), b)
    return h, h


def backward_step(xs, g_next, planes):
    """xs = a_t, h_{t-1}, dh_t planes; g_t = dh_t + a_{t+1} g_{t+1}. Emits (da_t, db_t)."""
    a, h_prev, dh = _split(xs, planes)
    g = _add(dh, g_next)
    return _mul(g, h_prev) + g, _mul(a, g)


# ---------------------------------------------------------------------------------------------
# The driver: walk the rows of one block, `rows` at a time, carrying the state.


def _walk(step, in_refs, out_refs, carry, *, rows: int, reverse: bool):
    groups = in_refs[0].shape[0] // rows

    def body(i, carry):
        j = groups - 1 - i if reverse else i
        start = j * rows
        if rows > 1:
            start = pl.multiple_of(start, rows)
        window = pl.ds(start, rows)
        xs = [ref[window, :].astype(F32) for ref in in_refs]
        emitted = [[None] * rows for _ in out_refs]
        for r in (range(rows - 1, -1, -1) if reverse else range(rows)):
            ys, carry = step([x[r:r + 1] if rows > 1 else x for x in xs], carry)
            for k, y in enumerate(ys):
                emitted[k][r] = y
        for ref, ys in zip(out_refs, emitted):
            ref[window, :] = (jnp.concatenate(ys, axis=0) if rows > 1 else ys[0]).astype(ref.dtype)
        return carry

    return jax.lax.fori_loop(0, groups, body, tuple(carry))


def _tpu_kernel(*refs, step, n_in, n_out, planes, rows, reverse):
    ins, refs = refs[:n_in], refs[n_in:]
    init, refs = refs[:planes], refs[planes:]
    outs, refs = refs[:n_out], refs[n_out:]
    final, state = refs[:planes], refs[planes:]
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _():
        for s, h in zip(state, init):
            s[...] = h[...].astype(F32)

    carry = _walk(step, ins, outs, [s[...] for s in state], rows=rows, reverse=reverse)
    for s, c in zip(state, carry):
        s[...] = c

    @pl.when(t == pl.num_programs(2) - 1)
    def _():
        for f, c in zip(final, carry):
            f[...] = c.astype(f.dtype)


def _gpu_kernel(*refs, step, n_in, n_out, planes, reverse):
    ins, refs = refs[:n_in], refs[n_in:]
    init, refs = refs[:planes], refs[planes:]
    outs, final = refs[:n_out], refs[n_out:]
    carry = _walk(step, ins, outs, [h[...].astype(F32) for h in init], rows=1, reverse=reverse)
    for f, c in zip(final, carry):
        f[...] = c.astype(f.dtype)


def scan_call(step: Callable, inputs: Sequence[jax.Array], pad_values: Sequence[float],
              init: Sequence[jax.Array], out_dtypes: Sequence, *, planes: int, reverse: bool,
              target: str, interpret=None, block_sizes: BlockSizes | None = None):
    """Runs `step` along time over real [B, T, D] planes.

    Returns (outputs [B, T, D] with `out_dtypes`, final state planes [B, D] float32). Time is
    padded at the end with `pad_values` (chosen by the caller so that a padded step leaves the
    state unchanged), channels with zeros; both are cut off again here.
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    batch, length, width = inputs[0].shape
    bs = block_sizes or BlockSizes.get_default(target)
    n_in, n_out = len(inputs), len(out_dtypes)
    if target == "tpu":
        sublanes = 8 * max(1, 4 // min(x.dtype.itemsize for x in inputs))
        block_t = min(bs.block_t, _round_up(length, sublanes))
        block_t = _round_up(block_t, sublanes)
        block_d = min(bs.block_d, _round_up(width, 128))
        padded_t, padded_d = _round_up(length, block_t), _round_up(width, block_d)
    else:
        block_d = min(bs.block_d, pl.next_power_of_2(width))
        padded_t, padded_d = length, _round_up(width, block_d)

    def pad(x, value, widths):
        return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths, constant_values=value)

    inputs = [pad(x, v, [(0, 0), (0, padded_t - length), (0, padded_d - width)])
              for x, v in zip(inputs, pad_values)]
    # [B, 1, D]: the state enters and leaves as (1, block_d) tiles.
    init = [pad(h.astype(F32), 0, [(0, 0), (0, padded_d - width)])[:, None, :] for h in init]
    out_shape = ([jax.ShapeDtypeStruct((batch, padded_t, padded_d), d) for d in out_dtypes]
                 + [jax.ShapeDtypeStruct((batch, 1, padded_d), F32)] * planes)
    n_d = padded_d // block_d

    if target == "tpu":
        n_t = padded_t // block_t
        t_block = (lambda t: n_t - 1 - t) if reverse else (lambda t: t)
        seq = pl.BlockSpec((None, block_t, block_d), lambda b, d, t: (b, t_block(t), d))
        vec = pl.BlockSpec((None, 1, block_d), lambda b, d, t: (b, 0, d))
        kernel = functools.partial(_tpu_kernel, step=step, n_in=n_in, n_out=n_out, planes=planes,
                                   rows=sublanes, reverse=reverse)
        call = pl.pallas_call(
            kernel, grid=(batch, n_d, n_t), out_shape=out_shape,
            in_specs=[seq] * n_in + [vec] * planes,
            out_specs=[seq] * n_out + [vec] * planes,
            scratch_shapes=[pltpu.VMEM((1, block_d), F32)] * planes,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret if interpret is not None else False,
            name="memzoo_linear_scan")
    elif target == "cuda":
        seq = pl.BlockSpec((None, padded_t, block_d), lambda b, d: (b, 0, d))
        vec = pl.BlockSpec((None, 1, block_d), lambda b, d: (b, 0, d))
        kernel = functools.partial(_gpu_kernel, step=step, n_in=n_in, n_out=n_out, planes=planes,
                                   reverse=reverse)
        call = pl.pallas_call(
            kernel, grid=(batch, n_d), out_shape=out_shape,
            in_specs=[seq] * n_in + [vec] * planes,
            out_specs=[seq] * n_out + [vec] * planes,
            compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
            interpret=interpret if interpret is not None else False,
            name="memzoo_linear_scan")
    else:
        raise ValueError(f"linear_scan: unknown Pallas target {target!r}")

    results = call(*inputs, *init)
    outs = [y[:, :length, :width] for y in results[:n_out]]
    final = [h[:, 0, :width] for h in results[n_out:]]
    return outs, final


# ---------------------------------------------------------------------------------------------
# The two entry points the op's custom VJP calls.


def _planes(x):
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return [jnp.real(x), jnp.imag(x)]
    return [x]


def _join(planes, dtype):
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jax.lax.complex(planes[0], planes[1]).astype(dtype)
    return planes[0].astype(dtype)


# a = 1 as planes: (1,) real, (1, 0) complex.
_ONE = [1.0, 0.0]


def _plane_dtype(dtype):
    return jnp.real(jnp.zeros((), dtype)).dtype


def linear_scan_forward(a, b, h0, *, reverse: bool, target: str, interpret=None,
                        block_sizes: BlockSizes | None = None):
    if target == "cuda" and _dispatch.use_mosaic_gpu(interpret):
        from pallas_kernels.linear_scan import mosaic_gpu   # Hopper: TMA-pipelined walk
        if mosaic_gpu.supports(a, b, h0):
            return mosaic_gpu.linear_scan_forward(a, b, h0, reverse=reverse, interpret=interpret)
        interpret = _dispatch.triton_interpret(interpret)
    planes = 2 if jnp.issubdtype(b.dtype, jnp.complexfloating) else 1
    # Padded steps (a = 1, b = 0) leave the state unchanged, so the final state stays exact.
    outs, final = scan_call(
        functools.partial(forward_step, planes=planes), _planes(a) + _planes(b),
        _ONE[:planes] + [0.0] * planes, _planes(h0), [_plane_dtype(b.dtype)] * planes,
        planes=planes, reverse=reverse, target=target, interpret=interpret,
        block_sizes=block_sizes)
    return _join(outs, b.dtype), _join(final, h0.dtype)


def linear_scan_backward(a, h, h0, dh, dh_final, *, reverse: bool, target: str, interpret=None,
                         block_sizes: BlockSizes | None = None):
    if target == "cuda":
        interpret = _dispatch.triton_interpret(interpret)   # no Mosaic GPU backward
    planes = 2 if jnp.issubdtype(h.dtype, jnp.complexfloating) else 1
    h0 = h0.astype(h.dtype)
    if reverse:
        h_prev = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)
    else:
        h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    # The transposed scan walks the other way; padded steps (a = 1, dh = 0) keep g unchanged.
    outs, final = scan_call(
        functools.partial(backward_step, planes=planes),
        _planes(a) + _planes(h_prev) + _planes(dh), _ONE[:planes] + [0.0] * (2 * planes),
        _planes(dh_final), [_plane_dtype(a.dtype)] * planes + [_plane_dtype(dh.dtype)] * planes,
        planes=planes, reverse=not reverse, target=target, interpret=interpret,
        block_sizes=block_sizes)
    da = _join(outs[:planes], a.dtype)
    db = _join(outs[planes:], dh.dtype)
    return da, db, _join(final, dh_final.dtype)
