"""The XLA path of `delta_rule`: the chunked WY / UT form (the CPU default), its backward, and a
fused recurrent form for decoding and very short sequences.

Per chunk of C tokens with incoming state S (K x V), G_i = sum_{t<=i} g_t inside the chunk,
Gam_ij = exp(G_i - G_j) for j <= i in the same segment (else 0), gamma_i = Gam_i,start:

    A  = strictly_lower(diag(beta) K K^T * Gam)        T = (I + A)^-1  (unit lower triangular)
    U~ = T diag(beta) V        W = T diag(beta * gamma) K        U = U~ - W S
    O  = scale * (diag(gamma) Q S + (Q K^T * Gam) U)
    S' = gamma_last S + (diag(Gam_last,:) K)^T U

U holds the "pseudo-values" beta_j (v_j - S'_j^T k_j) that the token-by-token rule writes; the
triangular system is the delta rule's dependence of each write on the earlier writes in the
chunk. Gates stay in log space: only differences G_i - G_j <= 0 are exponentiated. Segment
resets are masks: token j reaches token i only if no reset lies in (j, i].

Everything runs batched over (batch, heads, chunks) as big einsums; only the two state matmuls
per chunk are sequential (a scan over chunks). The backward recomputes T, W, U~ from the inputs
and keeps only the states entering each chunk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._chunks import chunk_resets, effective_chunk, from_chunks, to_chunks

# Sequences up to this length (and no longer than the chunk) run the token-by-token form:
# decoding steps should not pay for a C x C triangular solve.
RECURRENT_MAX_LENGTH = 16


def _diagonal_blocks(a, size):
    """The diagonal size x size blocks of a [..., C, C]: [..., C / size, size, size]."""
    c = a.shape[-1]
    nb = c // size
    blocks = a.reshape(a.shape[:-2] + (nb, size, nb, size))
    return jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)


def unit_lower_inverse(a, base: int = 8):
    """(I + a)^-1 for strictly lower triangular a [..., C, C], by matmuls only.

    Forward substitution row by row inside diagonal blocks of `base`, then doubling:
    inv([[A, 0], [L, B]]) = [[A^-1, 0], [-B^-1 L A^-1, B^-1]]. XLA's CPU triangular solve runs
    several times slower than this on the batched C x C systems of the chunked form.
    """
    c = a.shape[-1]
    size = 1
    while size < c:
        size *= 2
    if size != c:   # pad to a power of two with an identity block that does not interact
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - c), (0, size - c)])
    b = min(base, size)
    blk = _diagonal_blocks(a, b)                                          # [..., nb, b, b]
    eye = jnp.eye(b, dtype=a.dtype)
    rows = [jnp.broadcast_to(eye[0], blk.shape[:-1])]
    for r in range(1, b):
        prev = jnp.stack(rows, -2)                                        # [..., nb, r, b]
        rows.append(jnp.broadcast_to(eye[r], blk.shape[:-1])
                    - jnp.einsum("...j,...jk->...k", blk[..., r, :r], prev))
    d = jnp.stack(rows, -2)
    s = b
    while s < size:
        low = _diagonal_blocks(a, 2 * s)[..., s:, :s]
        t11 = d[..., 0::2, :, :]
        t22 = d[..., 1::2, :, :]
        x = -jnp.einsum("...ij,...jk->...ik", t22, jnp.einsum("...jk,...kl->...jl", low, t11))
        d = jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], -1),
                             jnp.concatenate([x, t22], -1)], -2)
        s *= 2
    return d[..., 0, :c, :c]


class _Chunked:
    """The intra-chunk quantities, built once in the forward and again in the backward."""

    def __init__(self, q, k, v, beta, g, reset, *, scale, chunk, gated, segmented):
        acc = g.dtype
        self.acc, self.scale, self.chunk = acc, scale, chunk
        self.gated, self.segmented = gated, segmented
        self.q, self.k = (to_chunks(x.astype(acc), chunk) for x in (q, k))    # [B,H,N,C,K]
        self.v = to_chunks(v.astype(acc), chunk)                               # [B,H,N,C,V]
        self.beta = to_chunks(beta.astype(acc), chunk)                         # [B,H,N,C]
        c = chunk
        idx = jnp.arange(c)
        incl = (idx[:, None] >= idx[None, :])[None, None, None]              # [1,1,1,C,C]
        strict = (idx[:, None] > idx[None, :])[None, None, None]
        if segmented:
            counts = chunk_resets(reset, chunk)[:, None]                     # [B,1,N,C]
            same = counts[..., :, None] == counts[..., None, :]
            self.incl = incl & same
            self.first = counts == 0                                          # sees S
            self.last = counts == counts[..., -1:]                            # reaches S'
        else:
            self.incl = incl
            self.first = None
            self.last = None
        self.strict = self.incl & strict
        if gated:
            gc = to_chunks(g.astype(acc), chunk)
            self.G = jnp.cumsum(gc, axis=-1)                                  # [B,H,N,C]
            diff = self.G[..., :, None] - self.G[..., None, :]
            # Only differences G_i - G_j <= 0 (j <= i) are exponentiated; others are masked out.
            self.gam = jnp.where(self.incl, jnp.exp(jnp.where(self.incl, diff, 0.0)), 0.0)
            self.gamma = jnp.exp(self.G)                                      # [B,H,N,C]
            self.dlast = jnp.exp(self.G[..., -1:] - self.G)
            if segmented:
                self.gamma = jnp.where(self.first, self.gamma, 0.0)
                self.dlast = jnp.where(self.last, self.dlast, 0.0)
        else:
            self.G = None
            self.gam = self.incl.astype(acc)
            if segmented:
                self.gamma = self.first.astype(acc)
                self.dlast = self.last.astype(acc)
            else:
                self.gamma = None
                self.dlast = None
        self.gam_strict = jnp.where(strict, self.gam, 0.0)
        self.gl = None if self.gamma is None else self.gamma[..., -1]         # [B,H,N]

        # The UT transform: T = (I + A)^-1 by a batched unit-lower triangular solve.
        self.kk = jnp.einsum("bhnik,bhnjk->bhnij", self.k, self.k)
        a = self.beta[..., :, None] * self.kk * self.gam_strict
        self.a = a
        self.t = unit_lower_inverse(a)
        self.vb = self.beta[..., None] * self.v
        # W = T diag(bg) K and Kd = diag(dlast) K: gates and resets are row scalings of K (the
        # Mosaic GPU kernel's float32 key dim 256 plan multiplies them in rather than load W, Kd).
        self.bg = self.beta if self.gamma is None else self.beta * self.gamma   # [B,H,N,C]
        self.kb = self.bg[..., None] * self.k
        self.u_tilde = jnp.einsum("bhnij,bhnjv->bhniv", self.t, self.vb)
        self.w = jnp.einsum("bhnij,bhnjk->bhnik", self.t, self.kb)
        self.qk = jnp.einsum("bhnik,bhnjk->bhnij", self.q, self.k)
        self.p = scale * self.qk * self.gam
        self.qg = self._scale_rows(scale * self.q, self.gamma)
        self.kd = self._scale_rows(self.k, self.dlast)

    @staticmethod
    def _scale_rows(x, s):
        return x if s is None else s[..., None] * x

    def pseudo_values(self, states):
        """U = U~ - W S from the states entering each chunk [B,H,N,K,V], all chunks at once."""
        return self.u_tilde - jnp.einsum("bhnck,bhnkv->bhncv", self.w, states)

    def output(self, states, u):
        """O = Qg S + P U per chunk [B,H,N,C,V] (float32 in the chunk layout)."""
        return (jnp.einsum("bhnck,bhnkv->bhncv", self.qg, states)
                + jnp.einsum("bhnij,bhnjv->bhniv", self.p, u))

    def chunk_inputs(self):
        """The per-chunk inputs of the sequential state recurrence, chunks first."""
        n = self.u_tilde.shape[2]
        gl = self.gl if self.gl is not None else jnp.ones(self.u_tilde.shape[:3], self.acc)
        return tuple(jnp.moveaxis(x, 2, 0) for x in (self.u_tilde, self.w, self.kd, gl)), n


def _state_scan(ch: _Chunked, h0):
    """States entering each chunk [B,H,N,K,V], pseudo-values U [B,H,N,C,V], final state."""
    xs, _ = ch.chunk_inputs()

    def step(s, x):
        u_tilde, w, kd, gl = x
        u = u_tilde - jnp.einsum("bhck,bhkv->bhcv", w, s)
        s_next = gl[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", kd, u)
        return s_next, (s, u)

    final, (states, u) = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(states, 0, 2), jnp.moveaxis(u, 0, 2), final


def chunk_forward(q, k, v, beta, g, h0, reset, *, scale, chunk, gated, segmented):
    """Returns (o [B,T,H,V] in v's dtype, final state, states entering each chunk [B,H,N,K,V])."""
    ch = _Chunked(q, k, v, beta, g, reset, scale=scale, chunk=chunk, gated=gated,
                  segmented=segmented)
    states, u, final = _state_scan(ch, h0)
    o = ch.output(states, u)
    return from_chunks(o, q.shape[1]).astype(v.dtype), final, states


def recurrent_forward(q, k, v, beta, g, h0, reset, *, scale):
    """Token by token (decoding, short prompts): two matrix-vector products per step."""
    acc = h0.dtype

    def step(s, xs):
        q_t, k_t, v_t, b_t, g_t, r_t = (x.astype(acc) for x in xs)
        decay = jnp.where(r_t[:, None] > 0, 0.0, jnp.exp(g_t))
        s = decay[..., None, None] * s
        u = b_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t))
        s = s + k_t[..., :, None] * u[..., None, :]
        return s, (scale * jnp.einsum("bhkv,bhk->bhv", s, q_t))

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, beta, g, reset))
    final, o = jax.lax.scan(step, h0, xs)
    return jnp.swapaxes(o, 0, 1).astype(v.dtype), final


def delta_rule_forward(q, k, v, beta, g, h0, reset, *, scale, chunk_size, gated, segmented):
    """(o, final state, states entering each chunk) for the custom VJP's residuals."""
    length = q.shape[1]
    chunk = effective_chunk(length, chunk_size)
    if length <= min(chunk_size, RECURRENT_MAX_LENGTH):
        o, final = recurrent_forward(q, k, v, beta, g, h0, reset, scale=scale)
        return o, final, h0[:, :, None]
    return chunk_forward(q, k, v, beta, g, h0, reset, scale=scale, chunk=chunk, gated=gated,
                         segmented=segmented)


def _reverse_cumsum(x):
    return jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1), -1)


def reverse_state_scan(pt_do, qgt_do, kd, w, gl, ds_final):
    """The backward's only sequential part: over chunks in reverse, dS_next -> dU -> dS,

        dU = P^T dO + Kd dS_next        dS = Qg^T dO + gl dS_next - W^T dU

    from pt_do [B,H,N,C,V], qgt_do [B,H,N,K,V], kd, w [B,H,N,C,K], gl [B,H,N] (None: 1) and the
    final state's cotangent. Returns (dS leaving every chunk [B,H,N,K,V], dU [B,H,N,C,V], dh0).
    `delta_rule_backward(reverse_scan=)` takes a replacement (the Mosaic GPU kernel) with this
    signature plus a keyword `chunks`, the `_Chunked`."""
    if gl is None:
        gl = jnp.ones(pt_do.shape[:3], pt_do.dtype)

    def step(ds_next, x):
        pt_do_n, qgt_do_n, kd_n, w_n, gl_n = x
        du = pt_do_n + jnp.einsum("bhck,bhkv->bhcv", kd_n, ds_next)
        ds = qgt_do_n + gl_n[..., None, None] * ds_next - jnp.einsum("bhck,bhcv->bhkv", w_n, du)
        return ds, (ds_next, du)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (pt_do, qgt_do, kd, w, gl))
    dh0, (ds_next, du) = jax.lax.scan(step, ds_final, xs, reverse=True)
    return jnp.moveaxis(ds_next, 0, 2), jnp.moveaxis(du, 0, 2), dh0


def delta_rule_backward(q, k, v, beta, g, h0, reset, states, do, dfinal, *, scale, chunk_size,
                        gated, segmented, reverse_scan=None):
    """Cotangents (dq, dk, dv, dbeta, dg, dh0) of the chunked form, recomputing T, W, U~.
    `reverse_scan` replaces `reverse_state_scan` (same signature and layouts, plus `chunks=`)."""
    length = q.shape[1]
    chunk = effective_chunk(length, chunk_size)
    ch = _Chunked(q, k, v, beta, g, reset, scale=scale, chunk=chunk, gated=gated,
                  segmented=segmented)
    acc = ch.acc
    doc = to_chunks(do.astype(acc), chunk)                                 # [B,H,N,C,V]
    u = ch.pseudo_values(states)
    pt_do = jnp.einsum("bhnij,bhniv->bhnjv", ch.p, doc)                    # P^T dO
    qgt_do = jnp.einsum("bhnck,bhncv->bhnkv", ch.qg, doc)                  # Qg^T dO
    scan_args = (pt_do, qgt_do, ch.kd, ch.w, ch.gl, dfinal.astype(acc))
    if reverse_scan is None:
        ds_next, du, dh0 = reverse_state_scan(*scan_args)
    else:
        # The chunk quantities too: a kernel may take K, T and the row scalings instead of W
        # and Kd (the Mosaic GPU float32 key dim 256 plan).
        ds_next, du, dh0 = reverse_scan(*scan_args, chunks=ch)

    # Everything else is batched over chunks.
    dp = jnp.einsum("bhniv,bhnjv->bhnij", doc, u)
    dqg = jnp.einsum("bhncv,bhnkv->bhnck", doc, states)
    dkd = jnp.einsum("bhncv,bhnkv->bhnck", u, ds_next)
    dw = -jnp.einsum("bhncv,bhnkv->bhnck", du, states)
    du_tilde = du
    # Through U~ = T Vb, W = T Kb and T = (I + A)^-1 (dA = -T^T dT T^T on the strict lower part).
    dvb = jnp.einsum("bhnij,bhniv->bhnjv", ch.t, du_tilde)
    dkb = jnp.einsum("bhnij,bhnik->bhnjk", ch.t, dw)
    dt = (jnp.einsum("bhniv,bhnjv->bhnij", du_tilde, ch.vb)
          + jnp.einsum("bhnik,bhnjk->bhnij", dw, ch.kb))
    da = -jnp.einsum("bhnji,bhnjl->bhnil", ch.t, jnp.einsum("bhnjm,bhnlm->bhnjl", dt, ch.t))
    da = jnp.where(ch.strict, da, 0.0)
    # A = diag(beta) (K K^T) * Gam_strict.
    e = da * ch.gam_strict                          # d(beta_i k_i . k_j)
    eb = ch.beta[..., :, None] * e
    dk = jnp.einsum("bhnij,bhnjk->bhnik", eb, ch.k) + jnp.einsum("bhnij,bhnik->bhnjk", eb, ch.k)
    dbeta = jnp.sum(e * ch.kk, axis=-1)
    # P = scale * (Q K^T) * Gam.
    dpm = scale * dp * ch.gam
    dq = jnp.einsum("bhnij,bhnjk->bhnik", dpm, ch.k)
    dk = dk + jnp.einsum("bhnij,bhnik->bhnjk", dpm, ch.q)
    # Qg = scale * diag(gamma) Q, Kd = diag(dlast) K, Kb = diag(beta * gamma) K, Vb = diag(beta) V.
    dq = dq + ch._scale_rows(scale * dqg, ch.gamma)
    dk = dk + ch._scale_rows(dkd, ch.dlast)
    bg = ch.bg
    dk = dk + bg[..., None] * dkb
    dkb_k = jnp.sum(dkb * ch.k, axis=-1)
    dbeta = dbeta + (dkb_k if ch.gamma is None else ch.gamma * dkb_k)
    dv = ch.beta[..., None] * dvb
    dbeta = dbeta + jnp.sum(dvb * ch.v, axis=-1)
    if gated:
        # dG from every factor exp(G_i - G_j) and exp(G_i): rows gain, columns lose.
        # The diagonal of Gam (exp(0)) and the last token's exp(G_last - G_last) are constants:
        # leaving them out avoids float32 cancellation of O(1) terms in tiny gate gradients.
        ra = da * ch.a
        rp = jnp.where(ch.strict, dp * ch.p, 0.0)
        dG = (jnp.sum(ra, -1) - jnp.sum(ra, -2) + jnp.sum(rp, -1) - jnp.sum(rp, -2))
        dG = dG + jnp.sum(dqg * ch.qg, -1)                         # gamma_i in Qg
        dG = dG + bg * dkb_k                                       # gamma_j in Kb
        rk = jnp.sum(dkd * ch.kd, -1)                              # exp(G_last - G_j) in Kd
        rk = jnp.where(jnp.arange(ch.chunk) < ch.chunk - 1, rk, 0.0)
        dG = dG - rk
        dgl = jnp.sum(states * ds_next, axis=(-2, -1)) * ch.gl     # gamma_last S
        dG = dG.at[..., -1].add(jnp.sum(rk, -1) + dgl)
        dgc = _reverse_cumsum(dG)
        dg = from_chunks(dgc[..., None], length)[..., 0]
    else:
        dg = jnp.zeros(g.shape, acc)
    dq, dk, dv = (from_chunks(x, length) for x in (dq, dk, dv))
    dbeta = from_chunks(dbeta[..., None], length)[..., 0]
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbeta.astype(beta.dtype),
            dg.astype(g.dtype), dh0.astype(h0.dtype))
