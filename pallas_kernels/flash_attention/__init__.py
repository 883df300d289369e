"""`flash_attention`: causal softmax attention that never holds the [T, T] scores, for the
`attention` mixer. (The Titans mixers' attention is local, a window or a segment, with persistent
keys open to every document: it runs block by block in memzoo/neural_memory/titans.py.)

    o_i = sum_{j in V(i)} softmax_j(scale * q_i . k_j) v_j,
    V(i) = {j <= i, i - j < window (if set), segment_ids_j == segment_ids_i (if given)}

Grouped-query attention: k and v carry G heads, G dividing q's H; query head h reads key/value
head h // (H / G). The math is reference.py; xla.py is `jax.nn.dot_product_attention`;
pallas.py runs JAX's shipped kernels (splash attention on TPU, Pallas' Triton flash attention
on GPU) with their own VJPs. Unlike the scans there is no state to carry: decoding keeps a KV
cache (memzoo.attention), so the op returns the output alone.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels import _dispatch, _validation
from pallas_kernels.flash_attention import pallas as _pallas
from pallas_kernels.flash_attention import reference as _reference
from pallas_kernels.flash_attention import xla as _xla
from pallas_kernels.flash_attention.pallas import BlockSizes

__all__ = ["flash_attention", "BlockSizes"]

_OP = "flash_attention"



def _partition(segmented: bool) -> _dispatch.Partition:
    """Batch and heads split (key/value heads with their query heads); time and head_dim stay
    whole."""
    return _dispatch.Partition(
        (("q", "b t h d"), ("k", "b t g d"), ("v", "b t g d"),
         ("segment_ids", "b t" if segmented else None)),
        "b t h d", whole="t d", tied=(("g", "h"),))


def flash_attention(q, k, v, *, segment_ids=None, window: int | None = None,
                    scale: float | None = None, implementation: str = "auto"):
    """Causal softmax attention, [batch, time, heads, head_dim] in and out.

    Args:
      q: [B, T, H, D] real floating.
      k, v: [B, T, G, D], the same dtype as q; G divides H (GQA; G = H: multi-head).
      segment_ids: [B, T] int or None: packed documents; a query sees only keys of its id.
      window: None (full causal) or an int >= 1: a query sees itself and the window - 1 keys
        before it.
      scale: the scores' factor; None: D ** -0.5.
      implementation: "auto" | "pallas" | "xla" | "reference" (pallas_kernels._dispatch).
        "auto": splash attention on TPU, the Triton kernel on a GPU (XLA there with a window),
        XLA elsewhere. 64-bit inputs run on XLA whatever is asked (the kernels are 32-bit).

    Returns:
      o [B, T, H, D] in q's dtype (scores and softmax in float32, float64 for 64-bit inputs).

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 3, 2, 4))
    >>> flash_attention(x, x, x).shape
    (1, 3, 2, 4)
    """
    _dispatch.check_implementation(implementation, _OP)
    _validation.check_array(_OP, "q", q, ndim=4)
    if _validation.is_complex(q.dtype):
        raise ValueError(f"{_OP}: `q` must be real floating, got {q.dtype}")
    b, t, h, d = q.shape
    _validation.check_array(_OP, "k", k, ndim=4)
    _validation.check_array(_OP, "v", v, ndim=4)
    g = k.shape[2]
    _validation.check_shape(_OP, "k", k, (b, t, g, d), "[batch, time, kv_heads, head_dim]")
    _validation.check_shape(_OP, "v", v, (b, t, g, d), "[batch, time, kv_heads, head_dim]")
    if g < 1 or h % g:
        raise ValueError(f"{_OP}: the key/value heads ({g}) must divide the query heads ({h})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_OP}: `k` and `v` must have q's dtype {q.dtype}, got {k.dtype} and "
                         f"{v.dtype}")
    if segment_ids is not None:
        _validation.check_integer(_OP, "segment_ids", segment_ids, (b, t), "[batch, time]")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or window < 1):
        raise ValueError(f"{_OP}: `window` must be None or an int >= 1, got {window!r}")
    if scale is None:
        scale = d ** -0.5
    elif not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"{_OP}: `scale` must be None or a number > 0, got {scale!r}")
    if t == 0:
        return jnp.zeros_like(q)
    options = dict(window=window, scale=float(scale))
    reference = functools.partial(_reference.attention_reference, **options)
    xla = functools.partial(_xla.attention_xla, **options)
    if implementation != "reference" and jnp.dtype(q.dtype).itemsize == 8:
        return xla(q, k, v, segment_ids)
    return _dispatch.dispatch(
        _OP, implementation, q, k, v, segment_ids, reference=reference, xla=xla,
        pallas=functools.partial(_pallas.attention_forward, **options), partition=_partition(segment_ids is not None),
        differentiable=True)
