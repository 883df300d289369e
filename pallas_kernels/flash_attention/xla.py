"""The XLA path: `jax.nn.dot_product_attention` (its causal and local-window masks, the segment
mask as an explicit [B, 1, T, T] mask), which materialises the [B, H, T, T] scores."""
from __future__ import annotations

import jax


def attention_xla(q, k, v, segment_ids, *, window, scale):
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0))
