"""The flash-attention kernels: JAX's own, not a copy. TPU: splash attention
(jax.experimental.pallas.ops.tpu.splash_attention, Mosaic), with its causal or local mask and
segment ids; GQA runs the multi-query kernel once per key/value head over that head's group of
query heads. GPU: Pallas' Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha),
causal with segment ids; key/value heads are repeated to the query heads, and a sliding window
takes the XLA path (the kernel has no local mask). Both kernels carry their own custom VJPs
(the backward recomputes the scores from the saved log-sum-exp), so the [T, T] scores never
exist in HBM, forward or backward.

Lengths are padded to whole blocks at the end: padded keys come after every real query, so the
causal mask hides them; padded queries (cut off again) see at least themselves.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels._chunks import round_up as _round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block: query and key/value rows per block (forward and backward), a cap: short
    sequences take one block of their (rounded-up) length."""

    block: int

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            # splash's own default tile; 128-row multiples are what its kernels accept.
            return cls(block=512)
        if target == "cuda":
            # 64 rows; halved for rows over GPU_WIDE_ROW_BYTES (_gpu).
            return cls(block=64)
        raise ValueError(f"flash_attention: unknown Pallas target {target!r}")


# A head row wider than this (float32 at d256: 1,024 bytes) takes 32-row blocks on GPU: at 64 rows
# the Triton kernel asked 262,400 bytes of shared memory on the H100 (232,448 there).
GPU_WIDE_ROW_BYTES = 512


def _pad_time(x, length, value=0):
    pad = length - x.shape[1]
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _tpu(q, k, v, segment_ids, *, window, scale, interpret, block_sizes):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    b, t, h, d = q.shape
    g = k.shape[2]
    bt = min(block_sizes.block, _round_up(t, 128))
    tp = _round_up(t, bt)
    shape = (tp, tp)
    one = (masks.CausalMask(shape) if window is None
           else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0))
    sizes = splash.BlockSizes(block_q=bt, block_kv=bt, block_kv_compute=bt, block_q_dkv=bt,
                              block_kv_dkv=bt, block_kv_dkv_compute=bt, block_q_dq=bt,
                              block_kv_dq=bt)
    heads = h // g
    make = splash.make_splash_mha if heads == 1 else splash.make_splash_mqa
    kernel = make(masks.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                  q_seq_shards=1, interpret=False if interpret is None else interpret)
    # Splash takes [heads, T, D] per example and does not scale the scores.
    qs = _pad_time((q * jnp.asarray(scale, q.dtype)), tp)
    qs = qs.reshape(b, tp, g, heads, d).transpose(0, 2, 3, 1, 4)     # [b, g, heads, T, d]
    ks, vs = (_pad_time(x, tp).transpose(0, 2, 1, 3) for x in (k, v))  # [b, g, T, d]
    seg = None
    if segment_ids is not None:
        ids = _pad_time(segment_ids.astype(jnp.int32), tp, value=-1)
        seg = splash.SegmentIds(q=ids, kv=ids)

    def per_kv_head(qh, kh, vh, ids):   # qh [heads, T, d], kh / vh [T, d]
        if heads == 1:
            return kernel(qh, kh[None], vh[None], segment_ids=ids)
        return kernel(qh, kh, vh, segment_ids=ids)

    # vmap adds the batch and key/value heads to the kernels' grids. The TPU interpreter does
    # not take a grid that vmap widened (its dimension semantics keep the kernel's own rank),
    # so under it the examples and heads run one after another (lax.map).
    batched = interpret is None or interpret is True
    over = (lambda f, *a: jax.vmap(f)(*a)) if batched else (lambda f, *a: jax.lax.map(
        lambda xs: f(*xs), a))

    def per_example(qe, ke, ve, ids):
        return over(lambda qh, kh, vh: per_kv_head(qh, kh, vh, ids), qe, ke, ve)

    if seg is None:
        o = over(lambda qe, ke, ve: per_example(qe, ke, ve, None), qs, ks, vs)
    else:
        o = over(lambda qe, ke, ve, iq, ik: per_example(qe, ke, ve, splash.SegmentIds(iq, ik)),
                 qs, ks, vs, seg.q, seg.kv)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)
    return o[:, :t].astype(q.dtype)


def _gpu(q, k, v, segment_ids, *, window, scale, interpret, block_sizes):
    if window is not None:
        # No local mask in the Triton kernel: the XLA path, as for the op's other limits.
        from pallas_kernels.flash_attention import xla as _xla
        return _xla.attention_xla(q, k, v, segment_ids, window=window, scale=scale)
    from jax.experimental.pallas import next_power_of_2
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    t, d = q.shape[1], q.shape[3]
    block = block_sizes.block
    if d * jnp.dtype(q.dtype).itemsize > GPU_WIDE_ROW_BYTES:
        block = min(block, 32)
    bt = min(block, next_power_of_2(t))
    tp = _round_up(t, bt)
    rep = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, rep, axis=2) if rep > 1 else x for x in (k, v))
    ids = None
    if segment_ids is not None:
        ids = _pad_time(segment_ids.astype(jnp.int32), tp, value=-1)
    sizes = gpu_attention.BlockSizes(block_q=bt, block_k=bt, block_q_dkv=bt, block_kv_dkv=bt,
                                     block_q_dq=bt, block_kv_dq=bt)
    o = gpu_attention.mha(_pad_time(q, tp), _pad_time(k, tp), _pad_time(v, tp), ids,
                          sm_scale=scale, causal=True, block_sizes=sizes,
                          interpret=bool(interpret))
    return o[:, :t]


def attention_forward(q, k, v, segment_ids, *, window, scale, target: str, interpret=None,
                      block_sizes: BlockSizes | None = None):
    """q [B, T, H, D], k / v [B, T, G, D], segment_ids [B, T] int or None -> [B, T, H, D]."""
    bs = block_sizes or BlockSizes.get_default(target)
    if target == "tpu":
        return _tpu(q, k, v, segment_ids, window=window, scale=scale, interpret=interpret,
                    block_sizes=bs)
    if target == "cuda":
        return _gpu(q, k, v, segment_ids, window=window, scale=scale, interpret=interpret,
                    block_sizes=bs)
    raise ValueError(f"flash_attention: unknown Pallas target {target!r}")
