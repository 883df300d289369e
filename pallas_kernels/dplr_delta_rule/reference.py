"""The specification of `dplr_delta_rule`: one `lax.scan` over time, obviously correct.

    S'_t = 0 if reset_t else S_{t-1}
    S_t  = diag(exp(w_t)) S'_t + a_t (b_t^T S'_t) + k_t v_t^T
    o_t  = scale * S_t^T q_t

with S [K, V] per (batch, head) and w the per-key-channel log decay. Gradients come from JAX's
autodiff of this loop; the fast paths' custom VJP is tested against them.
"""
import jax
import jax.numpy as jnp


def dplr_reference(q, k, v, a, b, w, h0, reset, *, scale: float):
    """q, k, a, b, w [B,T,H,K]; v [B,T,H,V]; h0 [B,H,K,V] in the accumulation dtype;
    reset [B,T] bool (True: the state is dropped before step t).

    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] in h0's dtype).
    """
    out_dtype = v.dtype
    acc = h0.dtype

    def step(s, xs):
        q_t, k_t, v_t, a_t, b_t, w_t, r_t = xs
        q_t, k_t, v_t, a_t, b_t, w_t = (x.astype(acc) for x in (q_t, k_t, v_t, a_t, b_t, w_t))
        s = jnp.where(r_t[:, None, None, None], jnp.zeros_like(s), s)
        read = jnp.einsum("bhk,bhkv->bhv", b_t, s)
        s = (jnp.exp(w_t)[..., None] * s + a_t[..., :, None] * read[..., None, :]
             + k_t[..., :, None] * v_t[..., None, :])
        o_t = scale * jnp.einsum("bhkv,bhk->bhv", s, q_t)
        return s, o_t.astype(out_dtype)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, a, b, w, reset))
    s_final, o = jax.lax.scan(step, h0, xs)
    return jnp.swapaxes(o, 0, 1), s_final
