"""The specification of `memory_lookup`: gather the k rows of every bag, weight them, sum.

    out[..., :] = sum_j weights[..., j] * values[indices[..., j], :]

Pure jnp and obviously correct: it materialises the [..., k, dim] gathered rows, which is what
the fast paths avoid. Indices are taken as they are (the public op validates or clamps them
first), and autodiff of this function is what the custom VJP is tested against.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _validation


def memory_lookup_reference(values, indices, weights):
    """values [rows, dim], indices [n, k] (in range), weights [n, k] -> [n, dim]."""
    acc = _validation.accum_dtype(jnp.result_type(values.dtype, weights.dtype))
    rows = jnp.take(values, indices, axis=0).astype(acc)          # [n, k, dim]
    out = jnp.sum(rows * weights.astype(acc)[..., None], axis=-2)
    return out.astype(jnp.result_type(values.dtype, weights.dtype))
