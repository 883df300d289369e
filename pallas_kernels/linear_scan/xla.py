"""The XLA path of `linear_scan`: the CPU default and the fallback everywhere.

A `fori_loop` over time that reads step t with a dynamic slice of the [batch, time, channels]
array and writes h_t in place into the buffer that held b (b_t is read before h_t overwrites it).
Measured on the 2-core development CPU (B8 T4096 D1024 f32), this shape of loop beats
`lax.scan` over transposed inputs by 2x (no transposes, no stacked output copy), beats unrolled or
chunked variants (XLA fuses their bodies worse), and when b's buffer is donated or is an
intermediate inside a larger jit, it allocates nothing of size T: page faults on fresh 128 MiB
outputs otherwise cost more than the scan itself. See benchmarks/RESULTS.md.
"""
import jax
import jax.numpy as jnp


def _time_index(i, length, reverse):
    return length - 1 - i if reverse else i


def _row(x, t):
    return jax.lax.dynamic_index_in_dim(x, t, axis=1, keepdims=False)


def linear_scan_forward(a, b, h0, *, reverse: bool):
    """a, b: [batch, time, channels], same dtype; h0: [batch, channels] in the accumulation dtype."""
    length = b.shape[1]
    acc = h0.dtype

    def body(i, carry):
        h, out = carry
        t = _time_index(i, length, reverse)
        h = _row(a, t).astype(acc) * h + _row(out, t).astype(acc)
        out = jax.lax.dynamic_update_index_in_dim(out, h.astype(out.dtype), t, axis=1)
        return h, out

    h_final, out = jax.lax.fori_loop(0, length, body, (h0, b))
    return out, h_final


def linear_scan_backward(a, h, h0, dh, dh_final, *, reverse: bool):
    """The transpose of the forward scan, fused into one pass against the direction of the scan.

    With g_t the total cotangent of h_t: g_t = dh_t + a_{t+1} g_{t+1} (g seeded by dh_final),
    db_t = g_t, da_t = g_t * h_{t-1} (h0 at the first step), dh0 = a_0 g_0. No conjugation:
    JAX's VJPs are transposes, also for complex inputs. "Next/previous" flip with `reverse`.
    """
    length = h.shape[1]
    acc = h0.dtype
    # db gets its own buffer rather than dh's: with dh_t read from the buffer being written,
    # XLA's fusions re-read the old row after the in-place write and so copied the whole
    # [B, T, D] buffer every step (quadratic in T; measured 125 s at B8 T4096 D1024).
    da, db = jnp.zeros_like(a), jnp.zeros_like(dh)

    def body(i, carry):
        carry_g, db, da = carry
        # Walk against the forward direction: the last forward step first.
        t = _time_index(i, length, not reverse)
        g = _row(dh, t).astype(acc) + carry_g
        prev_t = t + 1 if reverse else t - 1
        in_range = (prev_t >= 0) & (prev_t < length)
        h_prev = jnp.where(in_range, _row(h, jnp.clip(prev_t, 0, length - 1)).astype(acc), h0)
        db = jax.lax.dynamic_update_index_in_dim(db, g.astype(db.dtype), t, axis=1)
        da = jax.lax.dynamic_update_index_in_dim(da, (g * h_prev).astype(da.dtype), t, axis=1)
        return _row(a, t).astype(acc) * g, db, da

    dh0, db, da = jax.lax.fori_loop(0, length, body, (dh_final.astype(acc), db, da))
    return da, db, dh0
