"""The XLA path of `causal_conv1d`: W shifted multiply-adds over the whole sequence.

W is 2-4 in every model that uses this op, so the convolution is W fused elementwise passes
(XLA fuses them, the activation and the segment masks into one loop); no im2col, no
`conv_general_dilated` (whose depthwise CPU lowering is slower at these widths). Autodiff of this
function stores nothing per step (the taps are linear), so it needs no custom VJP.

Segments: `back[b, t]` is how many earlier positions token t may see (t minus the start of its
segment; unbounded in the first segment, whose history is the carried state). Tap i looks
W-1-i positions back and is dropped where that exceeds `back`.
"""
import jax
import jax.numpy as jnp

from pallas_kernels._chunks import segment_starts
from pallas_kernels.causal_conv1d.reference import apply_activation


def visible_history(segment_ids, width):
    """[B, T] int32: positions token t may look back (>= width-1 means all of its window)."""
    length = segment_ids.shape[1]
    t = jnp.arange(length, dtype=jnp.int32)[None, :]
    starts = segment_starts(segment_ids)
    # The first segment starts "before" the state, so its tokens see their whole window.
    first = -jnp.int32(width)
    start = jnp.maximum(jnp.where(starts, t, first), first)
    return t - jax.lax.cummax(start, axis=1)


def causal_conv1d_forward(x, weight, bias, state, back, *, activation, out_dtype):
    """x [B, T, C]; weight [W, C]; bias [C] or None; state [B, W-1, C] in the accumulation dtype;
    back [B, T] int32 or None (no segments). Returns y [B, T, C]."""
    acc = state.dtype
    width = weight.shape[0]
    length = x.shape[1]
    ext = jnp.concatenate([state, x.astype(acc)], axis=1)  # [B, W-1+T, C]
    w = weight.astype(acc)
    y = None
    for i in range(width):
        tap = ext[:, i:i + length] * w[i][None, None, :]
        if back is not None and i < width - 1:
            tap = jnp.where((back >= width - 1 - i)[..., None], tap, jnp.zeros_like(tap))
        y = tap if y is None else y + tap
    if bias is not None:
        y = y + bias.astype(acc)[None, None, :]
    return apply_activation(y, activation).astype(out_dtype)


def final_window(x, state, back):
    """The last W-1 inputs (state [B, W-1, C] in the accumulation dtype, then x), with entries
    that precede the last token's segment zeroed, so a continuation of that segment sees
    exactly what the whole sequence would."""
    width = state.shape[1] + 1
    final = jnp.concatenate([state, x.astype(state.dtype)], axis=1)[:, x.shape[1]:]
    if back is not None and width > 1:
        shift = jnp.arange(width - 2, -1, -1, dtype=jnp.int32)  # entry j is W-2-j back
        visible = back[:, -1:] >= shift[None, :]
        final = jnp.where(visible[..., None], final, jnp.zeros_like(final))
    return final
