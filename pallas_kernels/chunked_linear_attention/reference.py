"""The specification of `chunked_linear_attention`: one `lax.scan` over time, obviously correct.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        (S_{-1} = initial_state)
    o_t = S_t^T q_t                                  (q already carries the scale)

g_t is a log gate: a scalar per head (broadcast over the key dimension), a vector over keys, or
absent (g = 0). Where a new segment starts the state is reset: the gate is 0 there.
Gradients come from JAX's autodiff of this loop; the fast paths' custom VJPs are tested
against them.
"""
import jax
import jax.numpy as jnp


def reference(q, k, v, log_gate, h0, starts):
    """q, k [B,T,H,K]; v [B,T,H,V]; log_gate None, [B,T,H,1] or [B,T,H,K] (<= 0);
    h0 [B,H,K,V] in the accumulation dtype; starts None or [B,T] bool (True: the state is
    reset before step t).

    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] in h0's dtype).
    """
    acc = h0.dtype
    out_dtype = v.dtype

    def step(s, xs):
        q_t, k_t, v_t, g_t, start_t = xs            # [B,H,K], [B,H,K], [B,H,V], [B,H,Kg], [B]
        if g_t is not None:
            s = jnp.exp(g_t.astype(acc))[..., None] * s
        if start_t is not None:
            s = jnp.where(start_t[:, None, None, None], jnp.zeros_like(s), s)
        s = s + k_t.astype(acc)[..., :, None] * v_t.astype(acc)[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t.astype(acc), s)
        return s, o_t.astype(out_dtype)

    time_major = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    xs = tuple(map(time_major, (q, k, v, log_gate, starts)))
    s_final, o = jax.lax.scan(step, h0, xs)
    return jnp.swapaxes(o, 0, 1), s_final
