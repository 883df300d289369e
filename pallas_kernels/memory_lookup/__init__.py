"""`memory_lookup`: the weighted gather-sum of value rows behind product-key memories (an
embedding bag, as torch's `nn.EmbeddingBag(mode="sum", per_sample_weights=...)`).

    out[..., :] = sum_j weights[..., j] * values[indices[..., j], :]

Used by memzoo.memory_layers.ProductKeyMemory. The math lives in reference.py; xla.py and
pallas.py must equal it (tests/pallas_kernels/test_memory_lookup.py). Unlike the scans this op
carries no state, so it returns the output alone (no `(output, final_state)` pair).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch, _validation
from pallas_kernels.memory_lookup import pallas as _pallas
from pallas_kernels.memory_lookup import reference as _reference
from pallas_kernels.memory_lookup import xla as _xla
from pallas_kernels.memory_lookup.pallas import BlockSizes

__all__ = ["memory_lookup", "BlockSizes"]

_OP = "memory_lookup"


def memory_lookup(values, indices, weights, *, implementation: str = "auto"):
    """Weighted sum of k selected rows of a table, for every bag.

    Args:
      values: [num_rows, dim] (r d), real floating: the value table.
      indices: [..., k] integers in [0, num_rows): the rows of each bag; a row may repeat
        within a bag (its weights add up).
      weights: [..., k], real floating, the same shape as `indices`.
      implementation: "auto" | "pallas" | "xla" | "reference" (pallas_kernels._dispatch).

    Returns:
      out [..., dim] in the promoted dtype of values and weights, accumulated in float32 (float64
      for 64-bit inputs).

    Out-of-range indices: when `indices` is concrete (not traced), any index < 0 or >= num_rows
    raises a ValueError. Under `jit` / `vmap` / `grad` the indices cannot be inspected, and an
    out-of-range index is CLAMPED to [0, num_rows - 1] (as `jnp.take(..., mode="clip")`), in the
    forward and in the backward alike, so the gradient goes to the row that was read. No negative
    (Python-style) indexing.

    Gradients: d values is a scatter-add of weights * cotangent into the rows that were used
    (float32 accumulation; rows used twice get both contributions); d weights[..., j] is the
    j-th gathered row dotted with the cotangent. Not differentiable in `indices` (integers).

    >>> import jax.numpy as jnp
    >>> table = jnp.arange(6.0).reshape(3, 2)
    >>> memory_lookup(table, jnp.array([[0, 2]]), jnp.array([[1.0, 0.5]])).tolist()
    [[2.0, 3.5]]
    """
    _dispatch.check_implementation(implementation, _OP)
    _validation.check_array(_OP, "values", values, ndim=2)
    if _validation.is_complex(values.dtype):
        raise ValueError(f"{_OP}: `values` must be real floating, got {values.dtype}")
    num_rows, dim = values.shape
    if num_rows == 0:
        raise ValueError(f"{_OP}: `values` must have at least one row, got shape {values.shape}")
    if not hasattr(indices, "dtype") or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"{_OP}: `indices` must be an integer array [..., k], "
                         f"got {getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.ndim < 1:
        raise ValueError(f"{_OP}: `indices` must have shape [..., k] (rank >= 1), got a scalar")
    _validation.check_array(_OP, "weights", weights)
    if _validation.is_complex(weights.dtype):
        raise ValueError(f"{_OP}: `weights` must be real floating, got {weights.dtype}")
    if tuple(weights.shape) != tuple(indices.shape):
        raise ValueError(f"{_OP}: `weights` must have the shape of `indices` [..., k] = "
                         f"{tuple(indices.shape)}, got {tuple(weights.shape)}")
    if not isinstance(indices, jax.core.Tracer):
        host = np.asarray(indices)
        if host.size and (host.min() < 0 or host.max() >= num_rows):
            bad = host[(host < 0) | (host >= num_rows)].ravel()[0]
            raise ValueError(f"{_OP}: `indices` must lie in [0, num_rows) = [0, {num_rows}), "
                             f"got {int(bad)}")
    lead, k = indices.shape[:-1], indices.shape[-1]
    out_dtype = _validation.result_dtype(values.dtype, weights.dtype)
    n = int(np.prod(lead, dtype=np.int64))
    if n == 0 or k == 0 or dim == 0:
        return jnp.zeros((*lead, dim), out_dtype)
    # int32 indices (tables beyond 2^31 rows are not supported) clamped to the table: the
    # documented behaviour under jit, and what keeps every path's reads in bounds.
    if num_rows >= 2**31:
        raise ValueError(f"{_OP}: `values` may have at most 2^31 - 1 rows, got {num_rows}")
    idx = jnp.clip(indices.reshape(n, k), 0, num_rows - 1).astype(jnp.int32)
    w = weights.reshape(n, k)
    if implementation == "reference":
        # The specification, differentiated by JAX's autodiff: what the custom VJP is tested against.
        out = _reference.memory_lookup_reference(values, idx, w)
    else:
        out = _lookup(values, idx, w, implementation)
    return out.reshape(*lead, dim)


def _forward(values, idx, w, implementation):
    return _dispatch.dispatch(
        _OP, implementation, values, idx, w,
        reference=_reference.memory_lookup_reference, xla=_xla.memory_lookup_forward,
        pallas=_pallas.memory_lookup_forward,
        # Bags and the columns of the table split; the rows of the table (any bag may read any
        # row) and the k slots of a bag stay whole.
        partition=_dispatch.Partition(
            (("values", "r m"), ("indices", "n j"), ("weights", "n j")), "n m", whole="r j"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lookup(values, idx, w, implementation):
    return _forward(values, idx, w, implementation)


def _lookup_fwd(values, idx, w, implementation):
    # Residuals: the inputs only (the table is a parameter, kept anyway); the gathered rows
    # are re-read in the backward rather than stored ([n, k, dim] would dwarf the output).
    return _forward(values, idx, w, implementation), (values, idx, w)


def _lookup_bwd(implementation, residuals, g):
    values, idx, w = residuals
    # One backward for every implementation: XLA's scatter-add is what the Pallas kernels
    # would also need (a row-parallel scatter with duplicate rows); see pallas.py.
    dv, dw = _xla.memory_lookup_backward(values, idx, w, g)
    return dv, None, dw


_lookup.defvjp(_lookup_fwd, _lookup_bwd)
