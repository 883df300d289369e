"""The specification of `selective_scan` (Mamba-1's S6 recurrence): one `lax.scan` over time.

    h_t = keep_t * exp(dt_t A) h_{t-1} + dt_t u_t B_t      (per channel c and state entry n)
    y_t = C_t . h_t                                         (summed over n)

`dt` is the discretisation step after bias and softplus; `keep_t` is 0 where a segment starts.
B and C come in groups, [B, T, G, N]: channel c reads group c // (channels / G). The D skip and
the z gate are elementwise and live in the public op. Gradients come from JAX's autodiff of this
loop (which stores every h_t: fine for a specification, not for training).
"""
import jax
import jax.numpy as jnp


def grouped(x, groups):
    """[..., C] -> [..., G, C/G]: channel c sits in group c // (C / G)."""
    return x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))


def selective_scan_reference(dt, u, b, c, a, h0, keep):
    """dt, u [B, T, C]; b, c [B, T, G, N]; a [C, N]; h0 [B, C, N]; keep [B, T] (1.0, or 0.0 where
    a segment starts); all in the accumulation dtype. Returns (y [B, T, C], h_T [B, C, N])."""
    batch, _, channels = u.shape
    groups, state = b.shape[2], b.shape[3]
    a_g = a.reshape(groups, channels // groups, state)

    def step(h, inputs):
        dt_t, u_t, b_t, c_t, keep_t = inputs  # [B, C], [B, C], [B, G, N], [B, G, N], [B]
        dt_g = grouped(dt_t, groups)[..., None]  # [B, G, C/G, 1]
        decay = jnp.exp(dt_g * a_g[None]) * keep_t[:, None, None, None]
        h = decay * h + dt_g * grouped(u_t, groups)[..., None] * b_t[:, :, None, :]
        y = jnp.sum(h * c_t[:, :, None, :], axis=-1)
        return h, y.reshape(batch, channels)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (dt, u, b, c, keep))
    h = h0.reshape(batch, groups, channels // groups, state)
    h_final, ys = jax.lax.scan(step, h, xs)
    return jnp.swapaxes(ys, 0, 1), h_final.reshape(batch, channels, state)
