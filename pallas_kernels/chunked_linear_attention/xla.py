"""The XLA path of `chunked_linear_attention` (the CPU default): the chunked form.

Time is cut into chunks of C tokens. Inside a chunk everything is a batched matmul; between
chunks only the [K, V] state travels, through a short `lax.scan` over chunks:

    b_i   = sum_{t <= i in the chunk} g_t                       (cumulative log gate, <= 0)
    o_i   = q_i^T (exp(b_i) * S_start)  +  sum_{j <= i} (q_i . k_j exp(b_i - b_j)) v_j
    S_end = exp(b_C) * S_start  +  sum_j (k_j exp(b_C - b_j)) v_j^T

Only differences b_i - b_j with j <= i (and b_i, b_C - b_j) are ever exponentiated: all <= 0, so
a decay of any strength underflows to 0 instead of overflowing. For a vector gate the
[C, C, K] tensor of exp(b_i - b_j) is never formed for the whole chunk: the chunk is cut into
sub-chunks of `sub` tokens; a query sub-chunk I meets the keys of earlier sub-chunks through the
cumulative gate r_I at the end of sub-chunk I-1 (q_i exp(b_i - r_I) . k_j exp(r_I - b_j), both
exponents <= 0, one matmul per query sub-chunk), and only the sub x sub diagonal blocks are
formed elementwise (fused by XLA into their reduction).

Segments (packed documents): the segment starts counted inside each chunk
(`_chunks.chunk_resets`: equal counts see each other) mask pairs inside a chunk, the carried
state for tokens past a reset, and the chunk's decay of S_start.

The backward (custom VJP in __init__.py) keeps only the inputs and the per-chunk start states:
the state cotangents travel back through the same chunk scan reversed (dS_start = exp(b_C) dS_end
+ sum_i exp(b_i) q_i do_i^T), then every chunk's local function is differentiated in parallel,
recomputing its intra-chunk matrices.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels._chunks import chunk_resets, from_chunks, to_chunks

DEFAULT_CHUNK = 64
# Log gates are clamped here in the chunked form: exp(-30) ~ 1e-13 is below float32's resolution
# of anything carried, so results do not change, while the cumulative sums b inside a chunk stay
# small enough that their differences keep their precision (a -1e4 gate would leave b_i - b_j
# with an absolute error of 1e-3). The gradient of a clamped gate is 0 (its true value is
# below 1e-13 of the others).
GATE_FLOOR = -30.0
SUB_CHUNK = 16   # vector gates: tokens per sub-chunk (the size of the elementwise diagonal blocks)


def chunk_geometry(length: int, chunk_size: int | None, vector_gate: bool):
    """(chunk C, sub-chunk, padded length). Short inputs get one chunk of their own length
    (T=1 is then exactly the recurrent decoding step), long ones are padded to a multiple of C."""
    chunk = chunk_size or DEFAULT_CHUNK
    sub = math.gcd(chunk, SUB_CHUNK) if vector_gate else 1
    sub = min(sub, length)
    chunk = min(chunk, -(-length // sub) * sub)
    padded = -(-length // chunk) * chunk
    return chunk, sub, padded


def _dot(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=a.dtype)


def _masked_exp(x, mask):
    """exp(x) where mask, else 0; x is only exponentiated where it is meant to be (<= 0), and
    the gradient of the masked-out entries is 0, never inf * 0."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0)), 0)


def _chunk_pieces(q, k, v, g, masks, sub):
    """Chunk-local quantities, batched over leading dims X ([N, B, H] on the XLA path).

    q, k [X, C, K]; v [X, C, V]; g None | [X, C, 1] | [X, C, K]; masks None or the dict of
    segment masks (see `segment_masks`). Returns (o_intra [X,C,V], qd [X,C,K] the queries
    decayed to the chunk start, kd [X,C,K] the keys decayed to the chunk end, decay [X,Kg] or
    None the whole chunk's decay).
    """
    c = q.shape[-2]
    causal = jnp.tril(jnp.ones((c, c), bool))
    same = causal if masks is None else causal & masks["same"]
    if g is None:
        a = jnp.where(same, _dot("...ik,...jk->...ij", q, k), 0)
        qd, kd, decay = q, k, None
        if masks is not None:
            qd = jnp.where(masks["from_start"][..., None], q, 0)
            kd = jnp.where(masks["to_end"][..., None], k, 0)
    else:
        b, to_end, total = _cumulative(g)
        qd = q * jnp.exp(b)
        kd = k * jnp.exp(to_end)
        if masks is not None:
            qd = jnp.where(masks["from_start"][..., None], qd, 0)
            kd = jnp.where(masks["to_end"][..., None], kd, 0)
        if g.shape[-1] == 1:
            bs = b[..., 0]
            a = _dot("...ik,...jk->...ij", q, k) * _pair_decay(bs[..., :, None] - bs[..., None, :],
                                                              same, jnp.eye(c, dtype=bool))
        else:
            a = _vector_gate_scores(q, k, b, sub)
            a = jnp.where(same, a, 0)
        decay = jnp.exp(total)
    o = _dot("...ij,...jv->...iv", a, v.astype(a.dtype))
    return o, qd, kd, decay


def _cumulative(g):
    """From log gates [X, C, Kg]: b_i = sum_{t <= i} g_t, the decay to the chunk end
    sum_{t > i} g_t (a suffix sum, not b_C - b_i: no cancellation in value or gradient), and
    the whole chunk's b_C [X, Kg]."""
    g = jnp.maximum(g, GATE_FLOOR)
    b = jnp.cumsum(g, axis=-2)
    suffix = jnp.cumsum(g[..., ::-1, :], axis=-2)[..., ::-1, :]
    to_end = jnp.concatenate([suffix[..., 1:, :], jnp.zeros_like(suffix[..., :1, :])], axis=-2)
    return b, to_end, suffix[..., 0, :]


def _pair_decay(diff, mask, eye):
    """exp(b_i - b_j) where `mask` (a lower triangle, diagonal included), else 0. The diagonal
    (`eye`) is exactly 1 and a constant: exp(b_i - b_i) would add and subtract the same O(1)
    term to the gate's gradient, and their rounding would swamp a gradient that strong decays
    make tiny."""
    strict = mask & ~eye
    return jnp.where(eye, jnp.ones_like(diff), _masked_exp(diff, strict))


def _vector_gate_scores(q, k, b, sub):
    """[X, C, C]: sum_k q_ik k_jk exp(b_ik - b_jk) for j <= i (upper triangle arbitrary-finite,
    masked by the caller), exponentiating only differences <= 0."""
    *x, c, kdim = q.shape
    # The leading dims are flattened into one: under jax 0.10.2, XLA CPU's YNNPACK fusions
    # segfault on the rank-7/8 intermediates of this function's gradient (a transpose in
    # slinky's fuse_contiguous_dims), which unflattened [B, H, N, ns, sub, sub, K] reaches.
    q, k, b = (a.reshape(-1, c, kdim) for a in (q, k, b))
    scores = _vector_gate_scores_flat(q, k, b, sub)
    return scores.reshape(*x, c, c)


def _vector_gate_scores_flat(q, k, b, sub):
    x, c, kdim = q.shape
    x = (x,)
    ns = c // sub
    qs = q.reshape(*x, ns, sub, kdim)
    ks = k.reshape(*x, ns, sub, kdim)
    bs = b.reshape(*x, ns, sub, kdim)
    # r_I: the cumulative gate just before sub-chunk I (0 for the first one).
    ref = jnp.concatenate([jnp.zeros_like(bs[..., :1, -1, :]), bs[..., :-1, -1, :]], axis=-2)
    q_hat = qs * jnp.exp(bs - ref[..., :, None, :])                        # [X, ns, sub, K]
    before = jnp.arange(c)[None, :] < (jnp.arange(ns) * sub)[:, None]        # [ns, C]
    k_hat = k[..., None, :, :] * _masked_exp(ref[..., :, None, :] - b[..., None, :, :],
                                             before[:, :, None])            # [X, ns, C, K]
    a_off = _dot("...isk,...ijk->...isj", q_hat, k_hat)                     # [X, ns, sub, C]
    tri = jnp.tril(jnp.ones((sub, sub), bool))[:, :, None]
    e = _pair_decay(bs[..., :, None, :] - bs[..., None, :, :], tri,
                    jnp.eye(sub, dtype=bool)[:, :, None])         # [X, ns, sub, sub, K]
    a_diag = jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * e, axis=-1)  # [X, ns, sub, sub]
    eye = jnp.eye(ns, dtype=a_diag.dtype)
    a_diag = (a_diag[..., :, :, None, :] * eye[:, None, :, None]).reshape(*x, ns, sub, c)
    return (a_off + a_diag).reshape(*x, c, c)


def _inter(qd, s_start):
    return _dot("...ik,...kv->...iv", qd, s_start)


def _chunk_state(kd, v):
    return _dot("...jk,...jv->...kv", kd, v.astype(kd.dtype))


def _decay_state(decay, keep, s):
    """The part of S_start that reaches S_end: exp(b_C) * S_start, or 0 past a reset."""
    if decay is not None:
        s = decay[..., :, None] * s
    if keep is not None:
        s = jnp.where(keep[..., None, None], s, 0)
    return s


def chunk_local(q, k, v, g, s_start, masks, sub):
    """The whole map of one chunk: (o, S_end) from its inputs and its start state."""
    o, qd, kd, decay = _chunk_pieces(q, k, v, g, masks, sub)
    o = o + _inter(qd, s_start)
    keep = None if masks is None else masks["keep"]
    return o, _decay_state(decay, keep, s_start) + _chunk_state(kd, v)


# ---------------------------------------------------------------------------------------------
# Layout: [B, T, H, D] <-> chunks (pallas_kernels._chunks.to_chunks / from_chunks; the Pallas
# kernels' tiles start from the head-major [B, H, N, C, D]).
# The XLA path itself keeps chunks chunk-major, [N, B, H, C, D] (`chunk_major=True`): the chunk
# scan then reads and writes its [N, B, H, K, V] states where the batched matmuls put them,
# without two moveaxis copies of all chunk states (about 10% of the forward at B4 T4096 H8 d64 on
# a CPU). `starts` leave forward_with_states in the Pallas kernels' [B, H, N, K, V] (both paths'
# residuals agree, as lax.platform_dependent needs), and XLA drops that transpose when nothing
# differentiates.


def _states_out(starts):
    """[N, B, H, K, V] -> [B, H, N, K, V]."""
    return jnp.moveaxis(starts, 0, 2)


def _states_in(starts):
    return jnp.moveaxis(starts, 2, 0)


def segment_masks(reset, chunk):
    """Masks of the chunked form from segment starts [B, T] (None: no segments), shaped to
    broadcast against the XLA path's [N, B, H, ...]."""
    if reset is None:
        return None
    counts = chunk_resets(reset, chunk).transpose(1, 0, 2)[:, :, None, :]   # [N,B,1,C]
    # The state entering a chunk belongs to the previous chunk's last token (initial_state to
    # the first run): it reaches the tokens with no start before them in the chunk.
    last = counts[..., -1]
    return {"same": counts[..., :, None] == counts[..., None, :],     # [N,B,1,C,C]
            "from_start": counts == 0,                                # [N,B,1,C]
            "to_end": counts == last[..., None],                      # [N,B,1,C]
            "keep": last == 0}                                        # [N,B,1]


def _prepare(q, k, v, g, reset, chunk_size):
    acc = q.dtype
    length = q.shape[1]
    chunk, sub, _ = chunk_geometry(length, chunk_size, g is not None and g.shape[-1] > 1)
    qc, kc, vc, gc = (to_chunks(x, chunk, chunk_major=True) for x in (q, k, v, g))
    kc = kc.astype(acc)
    if gc is not None:
        gc = gc.astype(acc)
    return qc, kc, vc, gc, segment_masks(reset, chunk), sub


def _by_chunk(x, local):
    """A per-chunk decay [N,B,H,Kg] or keep mask [N,B,1] broadcast to the chunks' [N,B,H]."""
    if x is None:
        return None
    return jnp.broadcast_to(x, local.shape[:3] + x.shape[3:])


def _scan_states(decay, keep, local, h0):
    """S_start for every chunk [N,B,H,K,V] and the final state, through a scan over chunks."""
    def step(s, xs):
        d, kp, loc = xs
        return _decay_state(d, kp, s) + loc, s

    xs = (_by_chunk(decay, local), _by_chunk(keep, local), local)
    final, starts = jax.lax.scan(step, h0, xs, length=local.shape[0])
    return starts, final


def forward(q, k, v, g, h0, reset, *, chunk_size=None):
    """q (scaled, accumulation dtype) [B,T,H,K]; k [B,T,H,K]; v [B,T,H,V]; g None | [B,T,H,1|K];
    h0 [B,H,K,V]; reset None | [B,T] int (1 where a segment starts, `_chunks.segment_starts`).
    Returns (o [B,T,H,V] in v's dtype, final state)."""
    o, final, _ = forward_with_states(q, k, v, g, h0, reset, chunk_size=chunk_size)
    return o, final


def _broadcasting(fn):
    """The chunked form broadcasts masks and per-chunk scalars by rank on purpose (the test
    suite raises on implicit rank promotion elsewhere)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.numpy_rank_promotion("allow"):
            return fn(*args, **kwargs)
    return wrapped


@_broadcasting
def forward_with_states(q, k, v, g, h0, reset, *, chunk_size=None):
    length = q.shape[1]
    qc, kc, vc, gc, masks, sub = _prepare(q, k, v, g, reset, chunk_size)
    o_intra, qd, kd, decay = _chunk_pieces(qc, kc, vc, gc, masks, sub)
    keep = None if masks is None else masks["keep"]
    starts, final = _scan_states(decay, keep, _chunk_state(kd, vc), h0)
    o = o_intra + _inter(qd, starts)
    return from_chunks(o, length, chunk_major=True).astype(v.dtype), final, _states_out(starts)


@_broadcasting
def backward(q, k, v, g, h0, reset, starts, do, dfinal, *, chunk_size=None, ends=None):
    """Cotangents (dq, dk, dv, dg, dh0) of `forward`, given its per-chunk start states.
    `ends`: (the state cotangent at every chunk's end [B,H,N,K,V], dh0) from another walk of
    the reverse chunk scan (the Mosaic GPU kernel); None runs the scan here."""
    length = q.shape[1]
    acc = q.dtype
    qc, kc, vc, gc, masks, sub = _prepare(q, k, v, g, reset, chunk_size)
    chunk, _, _ = chunk_geometry(length, chunk_size, g is not None and g.shape[-1] > 1)
    doc = to_chunks(do.astype(acc), chunk, chunk_major=True)
    starts = _states_in(starts)
    if ends is None:
        d_ends, dh0 = _reverse_scan_from(qc, gc, masks, doc, dfinal.astype(acc))
    else:
        d_ends, dh0 = _states_in(ends[0]).astype(acc), ends[1].astype(acc)

    def chunk_fn(q, k, v, g):
        return chunk_local(q, k, v, g, starts, masks, sub)

    primals = (qc, kc, vc.astype(acc)) + ((gc,) if gc is not None else ())
    _, vjp = jax.vjp(lambda *p: chunk_fn(*p[:3], p[3] if len(p) > 3 else None), *primals)
    grads = vjp((doc, d_ends))
    dq, dk, dv = (from_chunks(x, length, chunk_major=True) for x in grads[:3])
    dg = from_chunks(grads[3], length, chunk_major=True) if gc is not None else None
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), dg, dh0


@_broadcasting
def state_cotangents(q, g, reset, do, dfinal, *, chunk_size=None):
    """The reverse chunk scan alone (what mosaic_gpu.py's backward kernel walks): the state
    cotangent at every chunk's end [B,H,N,K,V] and d initial_state."""
    acc = q.dtype
    chunk, _, _ = chunk_geometry(q.shape[1], chunk_size, g is not None and g.shape[-1] > 1)
    qc, gc, doc = (to_chunks(x, chunk, chunk_major=True) for x in (q, g, do.astype(acc)))
    gc = None if gc is None else gc.astype(acc)
    d_ends, dh0 = _reverse_scan_from(qc, gc, segment_masks(reset, chunk), doc,
                                     dfinal.astype(acc))
    return _states_out(d_ends), dh0


def _reverse_scan_from(qc, gc, masks, doc, dfinal):
    """The reverse chunk scan from the chunked inputs: (dS_end per chunk, dh0)."""
    keep = None if masks is None else masks["keep"]
    if gc is None:
        qd, decay = qc, None
        if masks is not None:
            qd = jnp.where(masks["from_start"][..., None], qc, 0)
    else:
        b, _, total = _cumulative(gc)
        qd = qc * jnp.exp(b)
        if masks is not None:
            qd = jnp.where(masks["from_start"][..., None], qd, 0)
        decay = jnp.exp(total)
    # The state cotangent entering each chunk from its own outputs; then the reverse chunk scan.
    local = _dot("...ik,...iv->...kv", qd, doc)
    return _reverse_scan(decay, keep, local, dfinal)


def _reverse_scan(decay, keep, local, dfinal):
    """dS_end for every chunk [N,B,H,K,V] and dS_start of the first (= d initial_state)."""
    def step(d_end, xs):
        dcy, kp, loc = xs
        return _decay_state(dcy, kp, d_end) + loc, d_end

    xs = (_by_chunk(decay, local), _by_chunk(keep, local), local)
    dh0, d_ends = jax.lax.scan(step, dfinal, xs, length=local.shape[0], reverse=True)
    return d_ends, dh0
