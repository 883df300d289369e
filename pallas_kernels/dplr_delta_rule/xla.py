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

The state-free part of each chunk (T, W, U~, the pair matrices: `_terms`, `_pieces`) is batched
over all chunks; only `_step` (a handful of [C, K] x [K, V] products) is sequential. The
backward is written out (as delta_rule's): it recomputes `_terms` from the inputs, runs the
transpose of `_step` in a reverse scan that carries only dS, from the stored states entering
each chunk, and then everything else batched over chunks (jax.vjp of the same pieces took
4-6x longer to compile for a GPU: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels._chunks import chunk_resets, effective_chunk, from_chunks, to_chunks
from pallas_kernels.delta_rule.xla import unit_lower_inverse
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


def _exclusive_cumsum(x, axis):
    """sum_{t < i} x_t along `axis`, by shifting a cumulative sum (no subtraction)."""
    c = jnp.cumsum(x, axis=axis)
    head = jax.lax.slice_in_dim(c, 0, x.shape[axis] - 1, axis=axis)
    return jnp.concatenate([jnp.zeros_like(jax.lax.slice_in_dim(c, 0, 1, axis=axis)), head],
                           axis=axis)


def _reverse_cumsum(x, axis):
    return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)


def _pair_parts(x, y, w, sub):
    """pair_scores' factors ([n, ...] with the leading axes flattened), kept for the backward."""
    c, kd = x.shape[-2:]
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
    x_fac = jnp.exp(head)
    earlier = (blk[None, :] < blk[:, None])[None, :, :, None, None]        # J < I
    y_fac = _masked_exp(between[:, :, :, None, :] + tail[:, None], earlier)  # [n, I, J, sub, K]
    # Diagonal blocks: E_ij = sum_{j < t <= i} w_t, a running sum over t of w masked to t <= i.
    t_idx = jnp.arange(sub)
    upto = (t_idx[None, :] <= t_idx[:, None])[None, None, :, :, None]     # [i, t]
    e_sum = _reverse_exclusive_cumsum(jnp.where(upto, ws[:, :, None, :, :], 0.0), 3)
    e = _masked_exp(e_sum, upto)                                           # j <= i
    return dict(xs=xs, ys=ys, x_fac=x_fac, y_fac=y_fac, e=e, inside=inside, upto=upto)


def _pair_assemble(f):
    xs, ys = f["xs"], f["ys"]
    n, ns, sub, kd = xs.shape
    c = ns * sub
    x_hat = xs * f["x_fac"]
    y_hat = ys[:, None] * f["y_fac"]
    off = jnp.einsum("nisk,nijk->nisj", x_hat, y_hat.reshape(n, ns, c, kd))   # [n, ns, sub, C]
    d = jnp.sum(xs[:, :, :, None, :] * ys[:, :, None, :, :] * f["e"], axis=-1)  # [n, ns, sub, sub]
    eye = jnp.eye(ns, dtype=d.dtype)
    d = (d[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(n, ns, sub, c)
    return (off + d).reshape(n, c, c)


def pair_scores(x, y, w, *, sub: int):
    """[..., C, C]: M_ij = sum_c x_ic y_jc exp(sum_{j < t <= i} w_tc) for j <= i (the diagonal's
    decay exactly 1), 0 above; x, y, w [..., C, K], w <= 0 per-token log decays.

    No exponent is a difference of two cumulative sums: over a chunk of strong decays those
    reach hundreds, and their difference would lose the precision of the nearby pairs that
    matter (and of the decays' gradients). Each exponent is a sum of same-signed terms: inside
    a sub-chunk, a masked running sum; across sub-chunks, the query's sum from its sub-chunk's
    start, the whole sub-chunks between, and the key's sum to its sub-chunk's end, the
    query and key factors exponentiated separately (both exponents <= 0)."""
    *lead, c, _ = x.shape
    return _pair_assemble(_pair_parts(x, y, w, sub)).reshape(*lead, c, c)


def _pair_scores_backward(f, dm):
    """Cotangents (dx, dy, dw) of pair_scores from its factors `f` and dm [n, C, C]; entries
    of dm above the diagonal do not reach anything (M is 0 there whatever the inputs).

    Each exponent's cotangent is its factor times the factor's cotangent (d exp(z) = exp(z)
    dz), handed back to the decays through the transposes of the forward's sums (cumulative
    sums shifted, never subtracted from one another)."""
    xs, ys, x_fac, y_fac, e = f["xs"], f["ys"], f["x_fac"], f["y_fac"], f["e"]
    n, ns, sub, kd = xs.shape
    c = ns * sub
    dm = dm.reshape(n, ns, sub, ns, sub)
    x_hat = xs * x_fac
    y_hat = ys[:, None] * y_fac                                            # [n, I, J, s, K]
    # Across sub-chunks (J < I; y_fac is 0 elsewhere).
    dx_hat = jnp.einsum("nisjt,nijtk->nisk", dm, y_hat)
    dy_hat = jnp.einsum("nisjt,nisk->nijtk", dm, x_hat)
    dxs = dx_hat * x_fac
    dhead = dx_hat * x_hat
    dys = jnp.sum(dy_hat * y_fac, axis=1)
    dlog_y = dy_hat * y_hat                                                # masked by y_fac
    dtail = jnp.sum(dlog_y, axis=1)                                        # [n, J, s, K]
    dbetween = jnp.sum(dlog_y, axis=3)                                     # [n, I, J, K]
    dtotal = jnp.einsum("ijl,nijk->nlk", f["inside"].astype(dm.dtype), dbetween)
    # Diagonal blocks.
    dd = jnp.moveaxis(jnp.diagonal(dm, axis1=1, axis2=3), -1, 1)[..., None]   # [n, ns, i, j, 1]
    dxs = dxs + jnp.sum(dd * ys[:, :, None, :, :] * e, axis=3)
    dys = dys + jnp.sum(dd * xs[:, :, :, None, :] * e, axis=2)
    de_sum = dd * xs[:, :, :, None, :] * ys[:, :, None, :, :] * e          # 0 where j > i
    # e_sum[i, j] = sum_{t > j} [t <= i] w_t: w_t gets sum_{j < t} de_sum[i, j] where t <= i.
    dmasked = _exclusive_cumsum(de_sum, 3)
    dws = jnp.sum(jnp.where(f["upto"], dmasked, 0.0), axis=2)
    # head = cumsum(w) (its last entry the sub-chunk's total), tail = reverse exclusive sum.
    dhead = dhead.at[:, :, -1, :].add(dtotal)
    dws = dws + _reverse_cumsum(dhead, 2) + _exclusive_cumsum(dtail, 2)
    shape = (n, c, kd)
    return dxs.reshape(shape), dys.reshape(shape), dws.reshape(shape)


def _masks(reset, chunk, heads, segmented):
    if not segmented:
        return None
    counts = chunk_resets(reset, chunk)[:, None]                           # [B,1,N,C]
    return dict(same=counts[..., :, None] == counts[..., None, :],
                first=(counts == 0)[..., None],
                last=(counts == counts[..., -1:])[..., None],
                keep=(counts[..., -1] == 0)[..., None])


def _down(m):
    """Rows shifted down one (row 0 zero): M_{i-1, j} at (i, j)."""
    return jnp.concatenate([jnp.zeros_like(m[..., :1, :]), m[..., :-1, :]], axis=-2)


def _up(m):
    """Rows shifted up one (the last row zero): the transpose of `_down`."""
    return jnp.concatenate([m[..., 1:, :], jnp.zeros_like(m[..., :1, :])], axis=-2)


def _terms(q, k, v, a, b, w, masks, *, scale, sub):
    """Every state-free quantity of every chunk (inputs [B, H, N, C, D] in the accumulation
    dtype): what `_pieces` hands the step, and the factors the backward differentiates."""
    w = jnp.maximum(w, LOG_DECAY_FLOOR)
    gam = jnp.cumsum(w, axis=-2)
    gam_ex = _exclusive_cumsum(w, -2)
    # The decay from each token to the chunk's end as a suffix sum (not G_last - G_i: no
    # cancellation in the value or its gradient).
    to_end = _reverse_exclusive_cumsum(w, -2)
    total = jnp.sum(w, axis=-2)
    # The four pair matrices in one batched call (a quarter of the program to compile). The
    # b pairs are q-like pairs one row up: Aba_ij = M_{i-1, j} with M the inclusive matrix of
    # b_{i+1} against a_j under exp(G_i - G_j), so their nearest pair (j = i - 1, decay exactly
    # 1) is M's constant diagonal: as exp(G^-_i - G_{i-1}) it would add and subtract the same
    # O(1) term to the gradient of a decay that strong decays make tiny.
    pairs = _pair_parts(jnp.stack([q, q, _up(b), _up(b)]), jnp.stack([k, a, k, a]),
                        jnp.broadcast_to(w, (4,) + w.shape), sub)
    qk, qa, bk, ba = _pair_assemble(pairs).reshape((4,) + q.shape[:-1] + (q.shape[-2],))
    bk, ba = _down(bk), _down(ba)
    z = dict(pairs=pairs, eg=jnp.exp(gam), eg_ex=jnp.exp(gam_ex), e_end=jnp.exp(to_end),
             decay=jnp.exp(total))
    if masks is not None:
        # Masked factors: every product with one is masked, and so is its gradient.
        same = masks["same"]
        qk, qa, bk, ba = (jnp.where(same, m, 0.0) for m in (qk, qa, bk, ba))
        z["eg"] = jnp.where(masks["first"], z["eg"], 0.0)
        z["eg_ex"] = jnp.where(masks["first"], z["eg_ex"], 0.0)
        z["e_end"] = jnp.where(masks["last"], z["e_end"], 0.0)
        z["decay"] = jnp.where(masks["keep"], z["decay"], 0.0)
    z.update(qk=qk, qa=qa, bk=bk, t=unit_lower_inverse(-ba), qhat=scale * q * z["eg"],
             bhat=b * z["eg_ex"], kd=k * z["e_end"], ad=a * z["e_end"])
    z["bkv"] = jnp.einsum("...ij,...jv->...iv", bk, v)
    z["w"] = jnp.einsum("...ij,...jk->...ik", z["t"], z["bhat"])
    z["u_tilde"] = jnp.einsum("...ij,...jv->...iv", z["t"], z["bkv"])
    return z


def _pieces(q, k, v, a, b, w, masks, *, scale, sub):
    """The state-free part of every chunk that the sequential step reads."""
    z = _terms(q, k, v, a, b, w, masks, scale=scale, sub=sub)
    return dict(w=z["w"], u_tilde=z["u_tilde"], qhat=z["qhat"], qa=scale * z["qa"],
                o_v=scale * jnp.einsum("...ij,...jv->...iv", z["qk"], v), ad=z["ad"],
                kv=jnp.einsum("...ck,...cv->...kv", z["kd"], v), decay=z["decay"])


def _step(p, s):
    """One chunk's state-dependent part: (o [..., C, V], state leaving the chunk)."""
    u = p["u_tilde"] + jnp.einsum("...ck,...kv->...cv", p["w"], s)
    o = (jnp.einsum("...ck,...kv->...cv", p["qhat"], s)
         + jnp.einsum("...ij,...jv->...iv", p["qa"], u) + p["o_v"])
    s_next = p["decay"][..., :, None] * s + jnp.einsum("...ck,...cv->...kv", p["ad"], u) + p["kv"]
    return o, s_next


def _chunked_inputs(q, k, v, a, b, w, reset, chunk, acc, segmented):
    xs = tuple(to_chunks(x.astype(acc), chunk) for x in (q, k, v, a, b, w))      # [B,H,N,C,D]
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
    return from_chunks(o, q.shape[1]).astype(v.dtype), final, jnp.moveaxis(states, 0, 2)


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
    each chunk, recomputing every chunk's `_terms`.

    Only dS runs in order (a reverse scan over chunks, two [C, K] x [K, V] products and one
    [K, C] x [C, V] per chunk: the transpose of `_step`); everything else is batched over
    chunks. T = (I - Aba)^-1 gives dAba = T^T dT T^T on its strictly lower part; the decays'
    cotangent gathers, for every exp(.) factor, its value times its cotangent, and sums those
    over the tokens each exponent sums (`_pair_scores_backward` for the pair matrices)."""
    length = q.shape[1]
    chunk = effective_chunk(length, chunk_size)
    acc = h0.dtype
    xs, masks, sub = _chunked_inputs(q, k, v, a, b, w, reset, chunk, acc, segmented)
    qc, kc, vc, ac, bc, wc = xs
    z = _terms(*xs, masks, scale=scale, sub=sub)
    doc = to_chunks(do.astype(acc), chunk)                                       # [B,H,N,C,V]
    states = states.astype(acc)
    mm = jnp.einsum
    u = z["u_tilde"] + mm("...ck,...kv->...cv", z["w"], states)

    # Reverse over chunks: dS' -> dU -> dS (the only sequential part).
    qa_do = scale * mm("...ij,...iv->...jv", z["qa"], doc)                 # Aqa^T dO
    qhat_do = mm("...ck,...cv->...kv", z["qhat"], doc)                     # Qhat^T dO

    def step(ds_next, x):
        qa_do_n, qhat_do_n, ad, w_n, decay = x
        du = qa_do_n + mm("...ck,...kv->...cv", ad, ds_next)
        ds = qhat_do_n + decay[..., :, None] * ds_next + mm("...ck,...cv->...kv", w_n, du)
        return ds, (ds_next, du)

    first = lambda x: jnp.moveaxis(x, 2, 0)
    dh0, (ds_next, du) = jax.lax.scan(
        step, dfinal.astype(acc),
        tuple(first(x) for x in (qa_do, qhat_do, z["ad"], z["w"], z["decay"])), reverse=True)
    ds_next, du = jnp.moveaxis(ds_next, 0, 2), jnp.moveaxis(du, 0, 2)

    # The step's other inputs, batched over chunks.
    dqhat = mm("...cv,...kv->...ck", doc, states)
    dqa = scale * mm("...iv,...jv->...ij", doc, u)
    dqk = scale * mm("...iv,...jv->...ij", doc, vc)
    dad = mm("...cv,...kv->...ck", u, ds_next)
    dkd = mm("...cv,...kv->...ck", vc, ds_next)
    ddecay = jnp.sum(states * ds_next, axis=-1)
    dw_mat = mm("...cv,...kv->...ck", du, states)                          # dW; dU~ = dU
    # W = T Bhat, U~ = T (Abk V), T = (I - Aba)^-1.
    dbhat = mm("...ij,...ik->...jk", z["t"], dw_mat)
    dbkv = mm("...ij,...iv->...jv", z["t"], du)
    dt = mm("...ik,...jk->...ij", dw_mat, z["bhat"]) + mm("...iv,...jv->...ij", du, z["bkv"])
    dba = mm("...ji,...jl->...il", z["t"], mm("...jm,...lm->...jl", dt, z["t"]))
    dbk = mm("...iv,...jv->...ij", dbkv, vc)
    dv = (mm("...ij,...iv->...jv", z["bk"], dbkv) + scale * mm("...ij,...iv->...jv", z["qk"], doc)
          + mm("...ck,...kv->...cv", z["kd"], ds_next))
    if masks is not None:
        dqk, dqa, dbk, dba = (jnp.where(masks["same"], m, 0.0) for m in (dqk, dqa, dbk, dba))
    c = chunk
    idx = jnp.arange(c)
    dba = jnp.where(idx[:, None] > idx[None, :], dba, 0.0)
    # The pair matrices: the b pairs were shifted down one row, so their cotangents go up.
    dm = jnp.stack([dqk, dqa, _up(dbk), _up(dba)]).reshape(-1, c, c)
    dx, dy, dwp = (x.reshape((4,) + qc.shape) for x in _pair_scores_backward(z["pairs"], dm))
    dq = dx[0] + dx[1] + scale * z["eg"] * dqhat
    dk = dy[0] + dy[2] + z["e_end"] * dkd
    da = dy[1] + dy[3] + z["e_end"] * dad
    db = _down(dx[2] + dx[3]) + z["eg_ex"] * dbhat
    # The per-token exponents: G (inclusive), G^- (exclusive), to_end (suffix), the total.
    dgam = dqhat * z["qhat"]
    dgam_ex = dbhat * z["bhat"]
    dto_end = dkd * z["kd"] + dad * z["ad"]
    dtotal = ddecay * z["decay"]
    dwc = (jnp.sum(dwp, axis=0) + _reverse_cumsum(dgam, -2)
           + _reverse_exclusive_cumsum(dgam_ex, -2) + _exclusive_cumsum(dto_end, -2)
           + dtotal[..., None, :])
    # jnp.maximum's derivative (half at a tie), as the forward's clamp.
    dwc = dwc * jnp.where(wc > LOG_DECAY_FLOOR, 1.0, jnp.where(wc == LOG_DECAY_FLOOR, 0.5, 0.0))
    grads = (from_chunks(x, length) for x in (dq, dk, dv, da, db, dwc))
    dq, dk, dv, da, db, dw = grads
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), da.astype(a.dtype),
            db.astype(b.dtype), dw.astype(w.dtype), dh0.astype(h0.dtype))
