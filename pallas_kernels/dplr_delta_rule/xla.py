"""The XLA path of `dplr_delta_rule`: the chunked WY / UT form with per-key-channel decays (the
CPU default), its backward, and the token-by-token form for decoding and very short sequences.

Per chunk of C tokens with incoming state S (K x V), per key channel G_i = sum_{t<=i} w_t inside
the chunk and G^-_i = G_{i-1} (G^-_0 = 0). With u_i = b_i^T S'_{i-1} (the low-rank read, a row
of V values), unrolling the recurrence inside the chunk gives

    S_i = exp(G_i) * S + sum_{j<=i} exp(G_i - G_j) * (a_j u_j^T + k_j v_j^T)
    u_i = (b_i exp(G^-_i))^T S + sum_{j<i} (Aba_ij u_j + Abk_ij v_j^T)

    Aba_ij = sum_c b_ic a_jc exp(G^-_ic - G_jc),   Abk_ij likewise with k_j      (j < i)
    Aqa_ij = sum_c q_ic a_jc exp(G_ic - G_jc),     Aqk_ij likewise with k_j      (j <= i)

so, with T = (I - Aba)^-1 (unit lower triangular; delta_rule.xla.unit_lower_inverse):

    U  = U~ + W S,     U~ = T Abk V,     W = T diag(exp(G^-)) B
    O  = scale * (diag(exp(G)) Q S + Aqa U + Aqk V)
    S' = exp(G_last) * S + (exp(G_last - G) * A)^T U + (exp(G_last - G) * K)^T V

Every exponent is <= 0, and none is a difference of two cumulative sums (over a chunk of
strong decays those reach hundreds, and their difference would lose the precision of the nearby
pairs, and of the decays' gradients): `pair_scores` sums the decays between i and j directly,
per sub-chunk of 16 tokens (the sub x sub diagonal blocks elementwise; across sub-chunks a
query factor and a key factor, as chunked_linear_attention's vector gates). The b pairs are
taken as q-like pairs one row up (b_{i+1} against a_j under exp(G_i - G_j)), so their nearest
pair's decay is the constant 1 of the diagonal. Segment resets are masks: token j
reaches token i only if no reset lies in (j, i]; the incoming state reaches token i only if no
reset lies in [0, i].

The state-free part of each chunk (T, W, U~, the pair matrices: `_pieces`) is batched over all
chunks; only `_step` (a handful of [C, K] x [K, V] products) is sequential. The backward takes
jax.vjp of both: the pieces once, batched, recomputed from the inputs; the step per chunk in a
reverse scan from the stored states entering each chunk.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.delta_rule.xla import _chunk_resets, _from_chunks, _to_chunks
from pallas_kernels.delta_rule.xla import effective_chunk, unit_lower_inverse
from pallas_kernels.dplr_delta_rule.reference import dplr_reference

__all__ = ["dplr_forward", "dplr_backward", "effective_chunk", "LOG_DECAY_FLOOR",
           "RECURRENT_MAX_LENGTH"]

# Sequences up to this length (and no longer than the chunk) run token by token: decoding steps
# should not pay for the chunk's C x C matrices and triangular inverse.
RECURRENT_MAX_LENGTH = 16
# Log decays are clamped here in the chunked forms (as chunked_linear_attention does): exp(-30)
# ~ 1e-13 is below float32's resolution of anything carried, while cumulative sums inside a
# chunk stay small enough that their differences keep their precision.
LOG_DECAY_FLOOR = -30.0
SUB_CHUNK = 16


def _masked_exp(x, mask):
    """exp(x) where mask, else 0, exponentiating x only where it is meant to be (<= 0); the
    masked-out entries get a zero gradient, never inf * 0."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _reverse_exclusive_cumsum(x, axis):
    """sum_{t > i} x_t along `axis`, by shifting a reverse cumulative sum (no subtraction)."""
    rc = jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)
    rest = jax.lax.slice_in_dim(rc, 1, x.shape[axis], axis=axis)
    return jnp.concatenate([rest, jnp.zeros_like(jax.lax.slice_in_dim(rc, 0, 1, axis=axis))],
                           axis=axis)


def pair_scores(x, y, w, *, sub: int):
    """[..., C, C]: M_ij = sum_c x_ic y_jc exp(sum_{j < t <= i} w_tc) for j <= i (the diagonal's
    decay exactly 1), 0 above; x, y, w [..., C, K], w <= 0 per-token log decays.

    No exponent is a difference of two cumulative sums: over a chunk of strong decays those
    reach hundreds, and their difference would lose the precision of the nearby pairs that
    matter (and of the decays' gradients). Each exponent is a sum of same-signed terms: inside
    a sub-chunk, a masked running sum; across sub-chunks, the query's sum from its sub-chunk's
    start, the whole sub-chunks between, and the key's sum to its sub-chunk's end, the
    query and key factors exponentiated separately (both exponents <= 0)."""
    *lead, c, kd = x.shape
    x, y, w = (z.reshape(-1, c, kd) for z in (x, y, w))
    n = x.shape[0]
    ns = c // sub
    xs, ys, ws = (z.reshape(n, ns, sub, kd) for z in (x, y, w))
    head = jnp.cumsum(ws, axis=2)                       # sub-chunk start .. token i (inclusive)
    tail = _reverse_exclusive_cumsum(ws, 2)             # after token j .. sub-chunk end
    total = head[:, :, -1, :]                           # [n, ns, K]
    blk = jnp.arange(ns)
    # between[I, J] = sum of whole sub-chunks L with J < L < I
    inside = (blk[None, None, :] > blk[None, :, None]) & (blk[None, None, :] < blk[:, None, None])
    between = jnp.einsum("ijl,nlk->nijk", inside.astype(w.dtype), total)   # [n, ns, ns, K]
    x_hat = xs * jnp.exp(head)                                             # [n, ns, sub, K]
    earlier = (blk[None, :] < blk[:, None])[None, :, :, None, None]        # J < I
    y_hat = ys[:, None] * _masked_exp(between[:, :, :, None, :] + tail[:, None], earlier)
    off = jnp.einsum("nisk,nijk->nisj", x_hat, y_hat.reshape(n, ns, c, kd))   # [n, ns, sub, C]
    # Diagonal blocks: E_ij = sum_{j < t <= i} w_t, a running sum over t of w masked to t <= i.
    t_idx = jnp.arange(sub)
    upto = (t_idx[None, :] <= t_idx[:, None])[None, None, :, :, None]     # [i, t]
    e_sum = _reverse_exclusive_cumsum(jnp.where(upto, ws[:, :, None, :, :], 0.0), 3)
    lower = (t_idx[None, :] <= t_idx[:, None])[None, None, :, :, None]    # j <= i
    e = _masked_exp(e_sum, lower)
    d = jnp.sum(xs[:, :, :, None, :] * ys[:, :, None, :, :] * e, axis=-1)  # [n, ns, sub, sub]
    eye = jnp.eye(ns, dtype=d.dtype)
    d = (d[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(n, ns, sub, c)
    return (off + d).reshape(*lead, c, c)


def _masks(reset, chunk, heads, segmented):
    if not segmented:
        return None
    counts = _chunk_resets(reset, chunk, heads, jnp.int32)                 # [B,1,N,C]
    return dict(same=counts[..., :, None] == counts[..., None, :],
                first=(counts == 0)[..., None],
                last=(counts == counts[..., -1:])[..., None],
                keep=(counts[..., -1] == 0)[..., None])


def _pieces(q, k, v, a, b, w, masks, *, scale, sub):
    """The state-free part of every chunk (inputs [B, H, N, C, D] in the accumulation dtype)."""
    w = jnp.maximum(w, LOG_DECAY_FLOOR)
    gam = jnp.cumsum(w, axis=-2)
    gam_ex = jnp.concatenate([jnp.zeros_like(gam[..., :1, :]), gam[..., :-1, :]], axis=-2)
    # The decay from each token to the chunk's end as a suffix sum (not G_last - G_i: no
    # cancellation in the value or its gradient).
    suffix = jnp.cumsum(w[..., ::-1, :], axis=-2)[..., ::-1, :]
    to_end = jnp.concatenate([suffix[..., 1:, :], jnp.zeros_like(suffix[..., :1, :])], axis=-2)
    total = suffix[..., 0, :]
    # The four pair matrices in one batched call (a quarter of the program to compile). The
    # b pairs are q-like pairs one row up: Aba_ij = M_{i-1, j} with M the inclusive matrix of
    # b_{i+1} against a_j under exp(G_i - G_j), so their nearest pair (j = i - 1, decay exactly
    # 1) is M's constant diagonal: as exp(G^-_i - G_{i-1}) it would add and subtract the same
    # O(1) term to the gradient of a decay that strong decays make tiny.
    b_up = jnp.concatenate([b[..., 1:, :], jnp.zeros_like(b[..., :1, :])], axis=-2)
    qk, qa, bk, ba = pair_scores(jnp.stack([q, q, b_up, b_up]), jnp.stack([k, a, k, a]),
                                 jnp.broadcast_to(w, (4,) + w.shape), sub=sub)
    down = lambda m: jnp.concatenate([jnp.zeros_like(m[..., :1, :]), m[..., :-1, :]], axis=-2)
    bk, ba = down(bk), down(ba)
    qhat = scale * q * jnp.exp(gam)
    bhat = b * jnp.exp(gam_ex)
    kd = k * jnp.exp(to_end)
    ad = a * jnp.exp(to_end)
    decay = jnp.exp(total)
    if masks is not None:
        same = masks["same"]
        qk, qa, bk, ba = (jnp.where(same, m, 0.0) for m in (qk, qa, bk, ba))
        qhat = jnp.where(masks["first"], qhat, 0.0)
        bhat = jnp.where(masks["first"], bhat, 0.0)
        kd = jnp.where(masks["last"], kd, 0.0)
        ad = jnp.where(masks["last"], ad, 0.0)
        decay = jnp.where(masks["keep"], decay, 0.0)
    t = unit_lower_inverse(-ba)
    mm = lambda spec, x, y: jnp.einsum(spec, x, y)
    return dict(
        w=mm("...ij,...jk->...ik", t, bhat),
        u_tilde=mm("...ij,...jv->...iv", t, mm("...ij,...jv->...iv", bk, v)),
        qhat=qhat, qa=scale * qa,
        o_v=scale * mm("...ij,...jv->...iv", qk, v),
        ad=ad, kv=mm("...ck,...cv->...kv", kd, v), decay=decay)


def _step(p, s):
    """One chunk's state-dependent part: (o [..., C, V], state leaving the chunk)."""
    u = p["u_tilde"] + jnp.einsum("...ck,...kv->...cv", p["w"], s)
    o = (jnp.einsum("...ck,...kv->...cv", p["qhat"], s)
         + jnp.einsum("...ij,...jv->...iv", p["qa"], u) + p["o_v"])
    s_next = p["decay"][..., :, None] * s + jnp.einsum("...ck,...cv->...kv", p["ad"], u) + p["kv"]
    return o, s_next


def _chunked_inputs(q, k, v, a, b, w, reset, chunk, acc, segmented):
    xs = tuple(_to_chunks(x, chunk, acc) for x in (q, k, v, a, b, w))      # [B,H,N,C,D]
    sub = math.gcd(chunk, SUB_CHUNK)
    return xs, _masks(reset, chunk, q.shape[2], segmented), sub


def chunk_forward(q, k, v, a, b, w, h0, reset, *, scale, chunk, segmented):
    """(o [B,T,H,V] in v's dtype, final state, states entering each chunk [B,H,N,K,V])."""
    xs, masks, sub = _chunked_inputs(q, k, v, a, b, w, reset, chunk, h0.dtype, segmented)
    p = _pieces(*xs, masks, scale=scale, sub=sub)

    def scan_step(s, p_n):
        o, s_next = _step(p_n, s)
        return s_next, (s, o)

    final, (states, o) = jax.lax.scan(scan_step, h0, jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), p))
    o = jnp.moveaxis(o, 0, 2)
    return _from_chunks(o, q.shape[1]).astype(v.dtype), final, jnp.moveaxis(states, 0, 2)


def dplr_forward(q, k, v, a, b, w, h0, reset, *, scale, chunk_size, segmented):
    """(o, final state, states entering each chunk) for the custom VJP's residuals."""
    length = q.shape[1]
    if length <= min(chunk_size, RECURRENT_MAX_LENGTH):
        o, final = dplr_reference(q, k, v, a, b, w, h0, reset > 0, scale=scale)
        return o.astype(v.dtype), final, h0[:, :, None]
    return chunk_forward(q, k, v, a, b, w, h0, reset, scale=scale,
                         chunk=effective_chunk(length, chunk_size), segmented=segmented)


def dplr_backward(q, k, v, a, b, w, h0, reset, states, do, dfinal, *, scale, chunk_size,
                  segmented):
    """Cotangents (dq, dk, dv, da, db, dw, dh0) of the chunked form from the states entering
    each chunk, recomputing every chunk's pieces."""
    length = q.shape[1]
    chunk = effective_chunk(length, chunk_size)
    acc = h0.dtype
    xs, masks, sub = _chunked_inputs(q, k, v, a, b, w, reset, chunk, acc, segmented)
    p, pieces_vjp = jax.vjp(lambda *x: _pieces(*x, masks, scale=scale, sub=sub), *xs)
    doc = _to_chunks(do, chunk, acc)
    first = lambda x: jnp.moveaxis(x, 2, 0)

    def scan_step(ds_next, inputs):
        p_n, s_n, do_n = inputs
        _, step_vjp = jax.vjp(_step, p_n, s_n)
        dp_n, ds_n = step_vjp((do_n, ds_next))
        return ds_n, dp_n

    dh0, dp = jax.lax.scan(scan_step, dfinal.astype(acc),
                           (jax.tree.map(first, p), first(states.astype(acc)), first(doc)),
                           reverse=True)
    dxs = pieces_vjp(jax.tree.map(lambda x: jnp.moveaxis(x, 0, 2), dp))
    dq, dk, dv, da, db, dw = (_from_chunks(x, length) for x in dxs)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), da.astype(a.dtype),
            db.astype(b.dtype), dw.astype(w.dtype), dh0.astype(h0.dtype))
