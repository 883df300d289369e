"""The specification of `delta_rule`: one `lax.scan` over time, obviously correct.

    S'_t = 0 if reset_t else exp(g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T
    o_t  = scale * S_t^T q_t

with S [K, V] per (batch, head). Gradients come from JAX's autodiff of this loop; the fast paths'
custom VJPs are tested against them.
"""
import jax
import jax.numpy as jnp


def delta_rule_reference(q, k, v, beta, g, h0, reset, *, scale: float):
    """q, k [B,T,H,K]; v [B,T,H,V]; beta, g [B,T,H]; h0 [B,H,K,V] in the accumulation dtype;
    reset [B,T] bool (True: the state is dropped before step t).

    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] in h0's dtype).
    """
    out_dtype = v.dtype
    acc = h0.dtype

    def step(s, xs):
        q_t, k_t, v_t, b_t, g_t, r_t = xs
        q_t, k_t, v_t, b_t, g_t = (x.astype(acc) for x in (q_t, k_t, v_t, b_t, g_t))
        s = jnp.exp(g_t)[..., None, None] * s
        s = jnp.where(r_t[:, None, None, None], jnp.zeros_like(s), s)
        predicted = jnp.einsum("bhkv,bhk->bhv", s, k_t)
        s = s + jnp.einsum("bhk,bhv->bhkv", k_t, b_t[..., None] * (v_t - predicted))
        o_t = scale * jnp.einsum("bhkv,bhk->bhv", s, q_t)
        return s, o_t.astype(out_dtype)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, beta, g, reset))
    s_final, o = jax.lax.scan(step, h0, xs)
    return jnp.swapaxes(o, 0, 1), s_final
