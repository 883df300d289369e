"""Argument checks shared by every op: a bad call fails here, naming the argument, before XLA.

Also the one rule for dtypes: results keep the inputs' (promoted) dtype; arithmetic and carried
state use at least float32 (complex64 for complex inputs), float64 when the inputs are float64.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_array(op: str, name: str, x, *, ndim: int | None = None, inexact: bool = True):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{op}: `{name}` must be an array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{op}: `{name}` must have rank {ndim}, got shape {tuple(x.shape)}")
    if inexact and not jnp.issubdtype(x.dtype, jnp.inexact):
        raise ValueError(
            f"{op}: `{name}` must have a floating or complex dtype, got {x.dtype}")


def check_shape(op: str, name: str, x, expected: Sequence[int], legend: str):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{op}: `{name}` must have shape {legend} = {tuple(expected)}, got {tuple(x.shape)}")


def check_integer(op: str, name: str, x, expected_shape: Sequence[int], legend: str):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{op}: `{name}` must be an integer array {legend}, "
                         f"got {getattr(x, 'dtype', type(x).__name__)}")
    check_shape(op, name, x, expected_shape, legend)


def result_dtype(*dtypes) -> np.dtype:
    return jnp.result_type(*dtypes)


def accum_dtype(dtype) -> np.dtype:
    """float32 for <=32-bit floats, complex64 for complex64, 64-bit kept as it is."""
    return jnp.promote_types(dtype, jnp.float32)


def is_complex(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.complexfloating)


def tree_shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)


# ---- the matrix-state ops' shared arguments (delta_rule, dplr_delta_rule) --------------------
def check_real(op: str, name: str, x) -> None:
    if is_complex(x.dtype):
        raise ValueError(f"{op}: `{name}` must be real floating, got {x.dtype}")


def check_values(op: str, v, batch: int, length: int, heads: int) -> None:
    """v [batch, time, heads, value_dim]: any value width, the rest like q's."""
    if v.shape[:3] != (batch, length, heads):
        raise ValueError(f"{op}: `v` must have shape [batch, time, heads, value_dim] = "
                         f"{(batch, length, heads)} + (value_dim,), got {tuple(v.shape)}")


def check_pallas_accumulation(op: str, implementation: str, acc) -> None:
    """implementation="pallas" runs kernels that accumulate in float32: 64-bit inputs refused."""
    if implementation == "pallas" and acc != jnp.float32:
        raise ValueError(f"{op}: implementation='pallas' runs the Pallas kernels, which "
                         f"accumulate in float32; these inputs accumulate in {jnp.dtype(acc).name} "
                         "(64-bit inputs take implementation='auto' or 'xla')")


def matrix_state_arguments(op: str, *, length: int, state_shape: Sequence[int], acc,
                           initial_state, scale, chunk_size, default_chunk_size: int,
                           segment_ids):
    """The chunked matrix-state ops' common keywords, checked and resolved: (h0 [batch, heads,
    key_dim, value_dim] in `acc` (zeros without initial_state), scale (a float, key_dim ** -0.5
    by default), chunk_size (an int), reset [batch, time] bool: where a segment starts)."""
    from pallas_kernels import _chunks   # the one home of "where the id changes"
    batch, _, key_dim, _ = state_shape
    if initial_state is None:
        h0 = jnp.zeros(tuple(state_shape), acc)
    else:
        check_array(op, "initial_state", initial_state, ndim=4)
        check_shape(op, "initial_state", initial_state, state_shape,
                    "[batch, heads, key_dim, value_dim]")
        check_real(op, "initial_state", initial_state)
        h0 = initial_state.astype(acc)
    if scale is None:
        scale = key_dim ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{op}: `scale` must be a Python float, got {type(scale).__name__}")
    if chunk_size is None:
        chunk_size = default_chunk_size
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: `chunk_size` must be a positive int, got {chunk_size!r}")
    if segment_ids is None:
        reset = jnp.zeros((batch, length), bool)
    else:
        check_integer(op, "segment_ids", segment_ids, (batch, length), "[batch, time]")
        reset = _chunks.segment_starts(segment_ids)
    return h0, float(scale), chunk_size, reset
