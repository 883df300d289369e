"""The specification of causal softmax attention: every score materialised, in the promoted
accumulation dtype (float64 for float64 inputs). Slow and obviously right."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _validation


def allowed(length: int, window: int | None, segment_ids):
    """[B or 1, 1, T, T] bool: key j is visible to query i (j <= i, i - j < window, same id)."""
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    ok = j <= i
    if window is not None:
        ok = ok & (i - j < window)
    ok = ok[None, None]
    if segment_ids is not None:
        ok = ok & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return ok


def attention_reference(q, k, v, segment_ids, *, window, scale):
    """q [B, T, H, D], k and v [B, T, G, D] (G divides H) -> [B, T, H, D] in q's dtype."""
    acc = _validation.accum_dtype(q.dtype)
    rep = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, rep, axis=2).astype(acc) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(acc), k) * scale
    # The diagonal is always visible, so no row is all -inf.
    s = jnp.where(allowed(q.shape[1], window, segment_ids), s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    return o.astype(q.dtype)
