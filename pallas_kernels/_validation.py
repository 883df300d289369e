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
