"""Shape aliases used across memzoo, one place for the dimension letters.

jaxtyping is not a dependency, so these are plain `jax.Array` aliases: the name carries the
shape, and modules check shapes at their boundary (memzoo.layers.check_input).

Dimension letters:
  b  batch                 t  time (sequence length)
  d  model width           n  state size (per channel, S4D) or total state (HiPPO, S5)
  h  heads                 k  key dim
  v  value dim             c  channels (scan width: whatever is flattened into one axis)
  f  hidden (MLP) width    l  kernel length (convolution lag)
"""
from __future__ import annotations

import jax
import numpy as np

Array = jax.Array

BTD = Array
"""[b, t, d]: a sequence of model-width activations, a mixer's input and output."""

BD = Array
"""[b, d]: one time step of model-width activations (`step` input and output)."""

BTC = Array
"""[b, t, c]: a scan's operands (linear_scan's a, b and h)."""

BC = Array
"""[b, c]: a scan's carried state."""

DN = Array
"""[d, n]: per-channel state parameters (S4D's A, B, C)."""

DL = Array
"""[d, l]: per-channel convolution kernels."""

NN = np.ndarray
"""[n, n]: a dense state matrix (HiPPO's A), float64 numpy at construction."""

N1 = np.ndarray
"""[n, 1]: a dense input matrix (HiPPO's B), float64 numpy at construction."""

Shape = tuple[int, ...]
LogicalAxes = tuple[str | None, ...]
"""Logical axis names of a parameter, e.g. ("embed", "mlp"); a mesh rule table maps them."""
