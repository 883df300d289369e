"""The XLA path of `memory_lookup` (the CPU default and the fallback everywhere).

Forward: a sum over the k slots of `w[:, j] * take(values, idx[:, j])`, written out (unrolled)
for up to UNROLL slots, so XLA fuses the k row gathers, the weighting and the sum into one loop
over [n, dim] that reads each selected row once and writes the output once. `take` followed by
an einsum instead materialises the [n, k, dim] gathered rows (512 MiB at 4096 x 32 x 1024 f32)
and ran 7x slower on the development CPU; a `fori_loop` over k, 2x slower (it re-reads and
rewrites the [n, dim] accumulator every slot). Bags with more than UNROLL slots run a fori_loop
over groups of UNROLL slots, each group fused as above.

Backward, with g = d out [n, dim], a fori_loop over the k slots:
  d weights[n, j] = <values[idx[n, j]], g[n]>: the same fused gather, reduced over dim.
  d values = scatter-add of w[n, j] g[n] into row idx[n, j], one scatter per slot, accumulated
    in float32 (duplicates within a bag, and across bags, add up; bfloat16 tables are summed in
    float32 and rounded once). Nothing [n, k, dim] is formed, and no one-hot matmul. The
    [rows, dim] gradient itself is dense (a custom VJP must return the table's shape): at a
    1 GiB table, zero-filling it is most of the backward's time on a CPU (page faults).
Indices reaching this module are in range (the public op checks or clamps them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _validation

# Slots per fused group. 32 covers the usual top-k of product-key memories in one fusion.
UNROLL = 32


def _groups(k: int):
    """(number of fori groups, slots per group, leftover slots fused after the loop)."""
    if k <= UNROLL:
        return 0, k, k
    return k // UNROLL, UNROLL, k % UNROLL


def _gather_sum(values, idx, w, start: int | jax.Array, count: int, acc_dtype, out):
    for j in range(count):
        col = start + j
        i = jax.lax.dynamic_index_in_dim(idx, col, axis=1, keepdims=False)
        wj = jax.lax.dynamic_index_in_dim(w, col, axis=1, keepdims=True)
        out = out + wj.astype(acc_dtype) * jnp.take(values, i, axis=0, mode="clip").astype(acc_dtype)
    return out


def memory_lookup_forward(values, indices, weights):
    """values [rows, dim], indices [n, k] int32 in range, weights [n, k] -> [n, dim]."""
    n, k = indices.shape
    out_dtype = jnp.result_type(values.dtype, weights.dtype)
    acc = _validation.accum_dtype(out_dtype)
    out = jnp.zeros((n, values.shape[1]), acc)
    loops, per, _ = _groups(k)
    if loops == 0:
        out = _gather_sum(values, indices, weights, 0, k, acc, out)
    else:
        out = jax.lax.fori_loop(
            0, loops, lambda g, o: _gather_sum(values, indices, weights, g * per, per, acc, o), out)
        out = _gather_sum(values, indices, weights, loops * per, k % per, acc, out)
    return out.astype(out_dtype)


def memory_lookup_backward(values, indices, weights, g):
    """(d values, d weights) for cotangent g [n, dim].

    A fori_loop over the k slots, not unrolled: each slot is one [n, dim] gather-reduce and one
    [n, dim] scatter-add into the carried (in-place) float32 table gradient, so compile time
    stays flat in k and nothing [n, k, dim] is formed."""
    n, k = indices.shape
    acc = _validation.accum_dtype(jnp.result_type(values.dtype, weights.dtype, g.dtype))
    g = g.astype(acc)

    def slot(j, carry):
        dv, dw = carry
        i = jax.lax.dynamic_index_in_dim(indices, j, axis=1, keepdims=False)
        wj = jax.lax.dynamic_index_in_dim(weights, j, axis=1, keepdims=True).astype(acc)
        rows = jnp.take(values, i, axis=0, mode="clip").astype(acc)
        dw = jax.lax.dynamic_update_index_in_dim(dw, jnp.sum(rows * g, axis=-1), j, axis=1)
        dv = dv.at[i].add(wj * g, mode="clip")
        return dv, dw

    dv, dw = jax.lax.fori_loop(0, k, slot, (jnp.zeros(values.shape, acc), jnp.zeros((n, k), acc)))
    return dv.astype(values.dtype), dw.astype(weights.dtype)
