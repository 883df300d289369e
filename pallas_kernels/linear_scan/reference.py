"""The specification of `linear_scan`: one `lax.scan` over time, obviously correct.

    h_t = a_t * h_{t-1} + b_t            (reverse=False; h_{-1} = initial_state)
    h_t = a_t * h_{t+1} + b_t            (reverse=True;  h_{T}  = initial_state)

Gradients come from JAX's autodiff of this loop; the fast paths' custom VJPs are tested
against them.
"""
import jax
import jax.numpy as jnp


def linear_scan_reference(a, b, h0, *, reverse: bool):
    """a, b: [batch, time, channels]; h0: [batch, channels] in the accumulation dtype.

    Returns (h [batch, time, channels] in b's dtype, final state [batch, channels] in h0's dtype).
    """
    out_dtype = b.dtype

    def step(h, ab):
        a_t, b_t = ab
        h = a_t.astype(h.dtype) * h + b_t.astype(h.dtype)
        return h, h.astype(out_dtype)

    xs = (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1))
    h_final, hs = jax.lax.scan(step, h0, xs, reverse=reverse)
    return jnp.swapaxes(hs, 0, 1), h_final
