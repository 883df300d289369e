"""Pallas kernels for `memory_lookup`'s forward: the indices drive the row reads.

The op is a gather: each bag reads k rows of `dim` values scattered over a table far larger
than any on-chip memory, so both kernels leave the table in HBM and fetch only the selected
rows, accumulating in float32.

* TPU (Mosaic): the flattened indices and weights are scalar-prefetched into SMEM
  (`PrefetchScalarGridSpec`); the grid walks blocks of `block_b` bags. A grid step starts one
  row DMA (HBM -> a VMEM scratch of block_b * k rows) per selected row, all in flight at once,
  waits for them, then sums each bag's k rows scaled by its SMEM weights into a (block_b, dim)
  output tile. Calls are split so that at most `indices_per_call` indices sit in SMEM at a time.
* GPU (Triton): grid (bags, dim blocks); each program walks its bag's k slots, reading the
  index and weight as scalars and the row's (block_d,) slice with one coalesced load. k is
  padded to a power of two (Triton's block shapes) with weight 0 on row 0.

The backward runs on the XLA path (xla.memory_lookup_backward, a scatter-add): a Pallas
scatter would need the (row, bag) pairs sorted by row so duplicates meet in one program, which
XLA's scatter already does well on GPU and TPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._chunks import round_up as _round_up

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_b: bags per TPU grid step (a multiple of 8); indices_per_call: at most this many
    indices (and weights) are scalar-prefetched into TPU SMEM per pallas_call; block_d: values
    per GPU program (a power of two; the largest power of two dividing dim is used if smaller)."""

    block_b: int
    indices_per_call: int
    block_d: int

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            # 8 bags x 32 rows x 1024 x 4 B = 1 MiB of row scratch; 256 DMAs in flight per step.
            # 16384 indices + 16384 weights = 128 KiB of SMEM.
            return cls(block_b=8, indices_per_call=16384, block_d=0)
        if target == "cuda":
            # 256 floats = one 1 KiB coalesced load per row and program; 4096 x 4 programs at the
            # benchmark shape keep every SM busy.
            return cls(block_b=0, indices_per_call=0, block_d=256)
        raise ValueError(f"memory_lookup: unknown Pallas target {target!r}")


# ---------------------------------------------------------------------------------------------
# TPU


def _tpu_kernel(idx_ref, w_ref, v_hbm, o_ref, rows, acc_ref, sem, *, block_b: int, k: int,
                pack: int):
    base = pl.program_id(0) * (block_b * k)
    count = block_b * k

    # A 16-bit table packs `pack` = 2 rows into each 32-bit sublane, and Mosaic slices HBM and
    # VMEM only at whole packed rows: each DMA fetches the aligned group of `pack` rows holding
    # the wanted one (rows is [count, pack, dim], indexed on its untiled leading axis), and the
    # sum below keeps the wanted row of the group. pack = 1 for 32-bit tables.
    def copy(r):
        # lax.div/rem, not // and %: indices are in range (>= 0), and jnp's floor rounding
        # lowers through `sign`, which Mosaic lowers only when it knows the TPU generation.
        start = pl.multiple_of(jax.lax.div(idx_ref[base + r], pack) * pack, pack)
        return pltpu_module().make_async_copy(
            v_hbm.at[pl.ds(start, pack)], rows.at[r], sem.at[0])

    # Every row of the block in flight at once; then wait for each (same sizes, one semaphore).
    jax.lax.fori_loop(0, count, lambda r, c: (copy(r).start(), c)[1], 0)
    jax.lax.fori_loop(0, count, lambda r, c: (copy(r).wait(), c)[1], 0)

    member = jax.lax.broadcasted_iota(jnp.int32, (pack, rows.shape[2]), 0)

    def bag(b, carry):
        def slot(j, acc):
            r = b * k + j
            group = rows[r].astype(F32)
            if pack > 1:
                group = jnp.where(member == jax.lax.rem(idx_ref[base + r], pack), group, 0.0)
            return acc + w_ref[base + r] * jnp.sum(group, axis=0, keepdims=True)
        acc_ref[pl.ds(b, 1), :] = jax.lax.fori_loop(0, k, slot,
                                                     jnp.zeros((1, rows.shape[2]), F32))
        return carry

    # Bags are summed into a float32 tile (dynamic rows of a 32-bit array are fine), then the
    # block is stored whole: a dynamic row of a 16-bit output would be half a packed sublane.
    jax.lax.fori_loop(0, block_b, bag, 0)
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def pltpu_module():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu


def _tpu_call(values, idx, w, out_dtype, bs: BlockSizes, interpret):
    pltpu = pltpu_module()
    n, k = idx.shape
    dim = values.shape[1]
    block_b = bs.block_b
    pack = max(1, 4 // values.dtype.itemsize)
    if values.shape[0] % pack:
        # The last row's aligned group would run past the table: one padding row (a copy of
        # the table, only for odd row counts of a 16-bit table).
        values = jnp.pad(values, ((0, pack - values.shape[0] % pack), (0, 0)))
    kernel = functools.partial(_tpu_kernel, block_b=block_b, k=k, pack=pack)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(n // block_b,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((block_b, dim), lambda i, idx_ref, w_ref: (i, 0)),
        scratch_shapes=[pltpu.VMEM((block_b * k, pack, dim), values.dtype),
                        pltpu.VMEM((block_b, dim), F32),
                        pltpu.SemaphoreType.DMA((1,))])
    call = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((n, dim), out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret if interpret is not None else False, name="memzoo_memory_lookup")
    return call(idx.reshape(-1), w.reshape(-1).astype(F32), values)


# ---------------------------------------------------------------------------------------------
# GPU


def _gpu_kernel(idx_ref, w_ref, v_ref, o_ref, *, k: int, block_d: int):
    d0 = pl.program_id(1) * block_d

    def slot(j, acc):
        row = idx_ref[j]
        return acc + w_ref[j].astype(F32) * v_ref[row, pl.ds(d0, block_d)].astype(F32)

    acc = jax.lax.fori_loop(0, k, slot, jnp.zeros((block_d,), F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _gpu_call(values, idx, w, out_dtype, bs: BlockSizes, interpret):
    from jax.experimental.pallas import triton as pltriton
    n, k = idx.shape
    dim = values.shape[1]
    block_d = min(bs.block_d, dim & -dim)  # a power of two dividing dim
    k_pad = pl.next_power_of_2(k)
    if k_pad != k:
        # Padded slots read row 0 with weight 0: exact, and in bounds.
        idx = jnp.pad(idx, ((0, 0), (0, k_pad - k)))
        w = jnp.pad(w, ((0, 0), (0, k_pad - k)))
    kernel = functools.partial(_gpu_kernel, k=k, block_d=block_d)
    bag = pl.BlockSpec((None, k_pad), lambda b, d: (b, 0))
    call = pl.pallas_call(
        kernel, grid=(n, dim // block_d),
        in_specs=[bag, bag, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((None, block_d), lambda b, d: (b, d)),
        out_shape=jax.ShapeDtypeStruct((n, dim), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret if interpret is not None else False, name="memzoo_memory_lookup")
    return call(idx, w, values)


# ---------------------------------------------------------------------------------------------


def memory_lookup_forward(values, idx, w, *, target: str, interpret=None,
                          block_sizes: BlockSizes | None = None):
    """values [rows, dim], idx [n, k] int32 in range, w [n, k] -> [n, dim]."""
    bs = block_sizes or BlockSizes.get_default(target)
    out_dtype = jnp.result_type(values.dtype, w.dtype)
    n, k = idx.shape
    if target == "cuda":
        return _gpu_call(values, idx, w, out_dtype, bs, interpret)
    if target != "tpu":
        raise ValueError(f"memory_lookup: unknown Pallas target {target!r}")
    # Whole blocks of bags per call, at most indices_per_call indices each; padded bags read row
    # 0 with weight 0 and are cut off again.
    bags_per_call = max(bs.block_b, (bs.indices_per_call // max(k, 1)) // bs.block_b * bs.block_b)
    outs = []
    for start in range(0, n, bags_per_call):
        stop = min(n, start + bags_per_call)
        padded = _round_up(stop - start, bs.block_b)
        i_c = jnp.pad(idx[start:stop], ((0, padded - (stop - start)), (0, 0)))
        w_c = jnp.pad(w[start:stop], ((0, padded - (stop - start)), (0, 0)))
        outs.append(_tpu_call(values, i_c, w_c, out_dtype, bs, interpret)[:stop - start])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
