"""Pallas forward kernels for `dplr_delta_rule`: one chunk body (xla.py's WY / UT form with
per-key-channel decays), walked by the shared chunk launch (pallas_kernels._chunks.launch). The
backward is xla.dplr_backward, from the chunk states these kernels write (the same chunks, so
the same states).

Each program owns one (batch * head, value block) pair and walks the chunks in order, carrying
the K x block_v state in float32. Value columns of the state evolve independently (the read
b^T S and the writes are per column), so splitting V over programs is exact; every program
rebuilds the chunk's pair matrices and triangular inverse for its own columns.

Inside a chunk the four pair matrices (q.a, q.k, b.a, b.k, each decayed per key channel by
exp(G_i - G_j) <= 1) are built one query row at a time as [C, K] elementwise products reduced
over K (no [C, C, K] tensor, only 2-D values, exponents <= 0); they come out transposed, which
is what delta_rule's row substitution (T = (I + A)^-1 from A^T) and the transposed matmuls
take. The chunks are the op's (_chunks.effective_chunk), each padded at its end to the hardware's
tile (delta_rule.pallas.pallas_chunk) with zero rows whose decay is 1 and cumulative decay that
of the chunk's last token, which leave the state as it is.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks
from pallas_kernels._chunks import dot as _dot, dot_tn as _dot_tn
from pallas_kernels.delta_rule.pallas import Layout, _substitute, layout, pallas_chunk
from pallas_kernels.dplr_delta_rule.xla import LOG_DECAY_FLOOR

F32 = jnp.float32
_OP = "dplr_delta_rule"

__all__ = ["BlockSizes", "GPU_FORWARD_MAX_KEY_DIM", "chunk_step", "dplr_forward", "pallas_chunk"]


class BlockSizes(_chunks.BlockSizes):
    __doc__ = _chunks.BlockSizes.__doc__
    op = _OP


# Key dims above this run the XLA forward on GPU (the same chunk states): the Triton body keeps
# seven [C, K] tiles and four [C, C] matrices live (tests/pallas_kernels/test_compile.py).
GPU_FORWARD_MAX_KEY_DIM = 128


def _masked_exp(x, mask):
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _pick(sel, x):
    """Row `sel` ([C, 1] one-hot mask) of x [C, D] as [1, D] (no dynamic slicing: Triton)."""
    return jnp.sum(jnp.where(sel, x, 0.0), axis=0, keepdims=True)


def chunk_step(q, k, a, b, v, gam, gam_ex, to_end, cnt, decay, s, *, scale, segmented):
    """One chunk of the DPLR delta rule (the kernels' one body).

    q, k, a, b [C, K]; v [C, Vb]; gam / gam_ex [C, K]: the cumulative log decay inside the
    chunk through / before each token; to_end [C, K]: after each token to the chunk's end;
    cnt [C, 1]: resets so far inside the chunk; decay [K, 1]: what multiplies the incoming state
    at the chunk's end (0 past a reset); s [K, Vb] the state entering the chunk.
    Returns (o [C, Vb], the state leaving the chunk).
    """
    c = q.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)

    def query_row(i, mats):
        qa_t, qk_t, ba_t, bk_t = mats
        sel = rows == i
        incl = rows <= i
        strict = rows < i
        if segmented:
            same = cnt == _pick(sel, cnt)
            incl = incl & same
            strict = strict & same
        qe = _pick(sel, q) * _masked_exp(_pick(sel, gam) - gam, incl)        # [C, K], row j
        be = _pick(sel, b) * _masked_exp(_pick(sel, gam_ex) - gam, strict)
        at = cols == i
        put = lambda x, y, m: jnp.where(at, jnp.sum(x * y, axis=1, keepdims=True), m)
        return put(qe, a, qa_t), put(qe, k, qk_t), put(be, a, ba_t), put(be, k, bk_t)

    zeros = jnp.zeros((c, c), F32)
    qa_t, qk_t, ba_t, bk_t = jax.lax.fori_loop(0, c, query_row, (zeros,) * 4)
    t = _substitute(-ba_t)                                   # (I - Aba)^-1
    qhat = scale * q * jnp.exp(gam)
    bhat = b * jnp.exp(gam_ex)
    dl = jnp.exp(to_end)
    if segmented:
        first = cnt == 0
        qhat = jnp.where(first, qhat, 0.0)
        bhat = jnp.where(first, bhat, 0.0)
        clast = _pick(rows == c - 1, cnt)
        dl = jnp.where(cnt == clast, dl, 0.0)
    u = _dot(t, _dot_tn(bk_t, v) + _dot(bhat, s))
    o = _dot(qhat, s) + scale * (_dot_tn(qa_t, u) + _dot_tn(qk_t, v))
    s_next = decay * s + _dot_tn(a * dl, u) + _dot_tn(k * dl, v)
    return o, s_next


def _decays(lay: Layout, w, reset):
    """gam, gam_ex, to_end [BH, N*Cp, kd], reset counts [BH, N*Cp, 1] and the chunks' state
    decays [BH, N, kd], all in the kernels' tiles. Padding rows have w = 0: their cumulative
    decay is the last token's, so no exponent a kernel forms is positive."""
    geo = lay.geo
    bh, n, c, kd = lay.bh, geo.n, geo.cp, geo.kd
    w = lay.seq(jnp.maximum(w.astype(F32), LOG_DECAY_FLOOR), kd).reshape(bh, n, c, kd)
    gam = jnp.cumsum(w, axis=2)
    gam_ex = jnp.concatenate([jnp.zeros_like(gam[:, :, :1]), gam[:, :, :-1]], axis=2)
    suffix = jnp.cumsum(w[:, :, ::-1], axis=2)[:, :, ::-1]
    to_end = jnp.concatenate([suffix[:, :, 1:], jnp.zeros_like(suffix[:, :, :1])], axis=2)
    counts = lay.counts(reset)                                                   # [BH, N, Cp]
    decay = jnp.where(counts[:, :, -1:] == 0, jnp.exp(suffix[:, :, 0]), 0.0)     # [BH, N, kd]
    flat = lambda x: x.reshape(bh, n * c, x.shape[-1])
    return flat(gam), flat(gam_ex), flat(to_end), counts.reshape(bh, n * c, 1), decay


def dplr_forward(q, k, v, a, b, w, h0, reset, *, scale, chunk_size, segmented, target: str,
                 interpret=None, block_sizes: BlockSizes | None = None):
    """(o [B,T,H,V], final state [B,H,K,V], states entering each chunk [B,H,N,K,V]).

    On GPU, key dims above GPU_FORWARD_MAX_KEY_DIM run the XLA forward (the same chunk states).
    """
    if target == "cuda" and q.shape[-1] > GPU_FORWARD_MAX_KEY_DIM:
        from pallas_kernels.dplr_delta_rule import xla as _xla
        return _xla.dplr_forward(q, k, v, a, b, w, h0, reset, scale=scale,
                                 chunk_size=chunk_size, segmented=segmented)
    if h0.dtype != F32:
        raise ValueError(f"dplr_delta_rule: the Pallas kernels accumulate in float32, "
                         f"got {h0.dtype}")
    # The chunks' state decays are per key channel: "total" columns of the key width.
    lay = layout(_OP, q, v, chunk_size=chunk_size, target=target,
                 block_sizes=block_sizes or BlockSizes.get_default(target), kg=None)
    geo = lay.geo
    kd = geo.kd
    gam, gam_ex, to_end, counts, decay = _decays(lay, w, reset)
    inputs = ([(name, "seq", kd, lay.seq(x, kd)) for name, x in zip("qkab", (q, k, a, b))]
              + [("gam", "seq", kd, gam), ("gam_ex", "seq", kd, gam_ex),
                 ("to_end", "seq", kd, to_end), ("v", "seq", "v", lay.seq(v, geo.vd)),
                 ("c", "seq", 1, counts),
                 ("decay", "total", kd, _chunks.totals(
                     decay.reshape(lay.batch, lay.heads, geo.n, kd), geo, target))])
    body = functools.partial(chunk_step, scale=scale, segmented=segmented)
    o, final, states = _chunks.forward(
        lambda t, s: body(t["q"], t["k"], t["a"], t["b"], t["v"], t["gam"], t["gam_ex"],
                          t["to_end"], t["c"], t["decay"], s),
        inputs, _chunks.state_in(h0, geo), v.dtype, target=target, geo=geo, bh=lay.bh,
        interpret=interpret, name="memzoo_dplr_delta_rule_fwd", op=_OP)
    return lay.seq_out(o, lay.value_dim), lay.state_out(final), lay.states_out(states)
