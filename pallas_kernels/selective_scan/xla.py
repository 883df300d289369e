"""The XLA path of `selective_scan`: the CPU default and the fallback everywhere.

Forward: a `fori_loop` over blocks of `UNROLL` steps; each step forms exp(dt_t A) and
dt_t u_t B_t for that step only, on a [batch, state, channels] carry, so XLA fuses decay, input
and the C contraction of a step into a couple of loops over a cache-resident state. Nothing of
size [B, T, C, N] exists. Outputs are written into their buffers in place.

Layout, measured on the 2-core development CPU at B2 D1024 L2048 N16 (benchmarks/RESULTS.md):
the state is [B, N, C] with channels on the vector lanes, so the contraction over N is a sum of
whole vectors (N minor was 3.7x slower), and groups are not an axis of the state (a size-1 group
axis made XLA's loops 4x slower): a group's B_t, C_t are broadcast over its channels per step.

Backward (the custom VJP in __init__.py): the forward saves the state at the start of every
segment of `segment_length(N)` steps. The backward walks the segments last to first: it
recomputes the segment's states h_{t-1} from its checkpoint into one [B, segment, N, C] buffer,
then walks the segment backwards with the state cotangent g:

    g_t    = C_t dy_t + a_{t+1} g_{t+1}          (a_t = keep_t exp(dt_t A); g seeded by dh_T)
    dC_t   = sum_c dy_t h_t             dB_t = sum_c g_t dt_t u_t       (c over the group)
    du_t   = dt_t sum_n g_t B_t         ddt_t = sum_n g_t (A a_t h_{t-1} + u_t B_t)
    dA     = sum_{b,t} g_t a_t dt_t h_{t-1}        dh_0 = a_0 g_0

Stored: per-segment states only, B * (T / segment) * C * N with segment >= 4N, i.e. at most a
quarter of one [B, T, C] array whatever N is; the recompute buffer is B * segment * C * N, which
does not grow with T.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Steps per unrolled block of the loops (measured: benchmarks/RESULTS.md).
UNROLL = 4


def segment_length(state: int) -> int:
    """Steps between saved states: >= 4 N, a multiple of 64 (so of UNROLL, and TPU blocks of
    128 time steps hold whole segments)."""
    return -(-max(64, 4 * state) // 64) * 64


def _rows(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _put(buf, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, rows.astype(buf.dtype), start, axis=1)


def _pad_time(x, total, value=0.0):
    extra = total - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _over_channels(x_t, channels):
    """A group's [B, G, N] row -> [B, N, C] (or [B, N, 1] for one group) for channel c in
    group c // (C / G)."""
    batch, groups, state = x_t.shape
    x_t = jnp.swapaxes(x_t, 1, 2)
    if groups == 1:
        return x_t
    return jnp.broadcast_to(x_t[..., None], (batch, state, groups, channels // groups)).reshape(
        batch, state, channels)


def _sum_over_group(x, groups):
    """[B, N, C] -> [B, G, N]: the transpose of _over_channels."""
    batch, state, channels = x.shape
    if groups == 1:
        return jnp.sum(x, axis=-1)[:, None, :]
    return jnp.swapaxes(jnp.sum(x.reshape(batch, state, groups, channels // groups), -1), 1, 2)


def _block_over_channels(x, channels):
    """[B, U, G, N] -> [B, U, N, C] (or [B, U, N, 1] for one group)."""
    batch, rows, groups, state = x.shape
    x = jnp.swapaxes(x, 2, 3)
    if groups == 1:
        return x
    return jnp.broadcast_to(x[..., None], (batch, rows, state, groups, channels // groups)
                            ).reshape(batch, rows, state, channels)


def _block_sum_over_group(x, groups):
    """[B, U, N, C] -> [B, U, G, N]: the transpose of _block_over_channels."""
    batch, rows, state, channels = x.shape
    if groups == 1:
        return jnp.sum(x, axis=-1)[:, :, None, :]
    return jnp.swapaxes(
        jnp.sum(x.reshape(batch, rows, state, groups, channels // groups), -1), 2, 3)


def _group_contract(x, y, groups):
    """sum over the channels c of each group of x[b, u, n, c] y[b, u, c] -> [B, U, G, N]: a
    batched matrix-vector product (XLA's dot beat a reduce fusion by 1.2x here)."""
    batch, rows, state, channels = x.shape
    x = x.reshape(batch, rows, state, groups, channels // groups)
    y = y.reshape(batch, rows, groups, channels // groups)
    return jnp.einsum('bungk,bugk->bugn', x, y)


def _state_contract(x, b, groups):
    """sum_n x[b, u, n, c] b[b, u, g(c), n] -> [B, U, C]."""
    batch, rows, state, channels = x.shape
    x = x.reshape(batch, rows, state, groups, channels // groups)
    return jnp.einsum('bungk,bugn->bugk', x, b).reshape(batch, rows, channels)


def _transposed(a):
    """A^T [N, C] as its own buffer. Left to XLA, the transpose became a layout change fused
    into the loops, and under jit(vmap(...)) the CPU compiler then read A in the wrong order
    (wrong results, jax 0.10.2; tests/pallas_kernels/test_selective_scan.py vmap test)."""
    return jax.lax.optimization_barrier(a.T)


def _decay(dt_t, a_t, keep_t):
    """dt_t [B, C]; a_t [N, C] (A transposed); keep_t [B] -> [B, N, C]."""
    return jnp.exp(dt_t[:, None, :] * a_t[None]) * keep_t[:, None, None]


def _block_forward(h, a_t, dt, u, b, c, keep, *, save_prev: bool):
    """Steps from state h [B, N, C] over the rows of dt, u [B, U, C], b, c [B, U, G, N],
    keep [B, U]. Returns the state, y rows [B, U, C] and (save_prev) the states before each
    step [B, U, N, C]."""
    channels = h.shape[-1]
    ys, prevs = [], []
    for j in range(dt.shape[1]):
        if save_prev:
            prevs.append(h)
        dt_j = dt[:, j]
        h = (_decay(dt_j, a_t, keep[:, j]) * h
             + (dt_j * u[:, j])[:, None, :] * _over_channels(b[:, j], channels))
        ys.append(jnp.sum(h * _over_channels(c[:, j], channels), axis=1))
    return h, jnp.stack(ys, axis=1), (jnp.stack(prevs, axis=1) if save_prev else None)


def _prepare(dt, u, b, c, keep, total):
    """Pads time to `total` with identity steps (dt = 0: decay 1, input 0)."""
    return (_pad_time(dt, total), _pad_time(u, total), _pad_time(b, total), _pad_time(c, total),
            _pad_time(keep, total, 1.0))


def selective_scan_forward(dt, u, b, c, a, h0, keep, *, save_states: bool = False):
    """dt, u [B, T, C]; b, c [B, T, G, N]; a [C, N]; h0 [B, C, N]; keep [B, T]; all in the
    accumulation dtype. Returns (y [B, T, C], h_T [B, C, N]) and, with save_states, the state
    at the start of every segment, [B, segments, N, C] (the internal layout)."""
    length = u.shape[1]
    seg = segment_length(b.shape[3])
    n_seg = -(-length // seg)
    if n_seg == 1:
        # One segment (decoding's T=1 above all): its checkpoint is h0 whatever its length, so
        # pad only to whole unrolled blocks instead of running a full segment of identity steps.
        seg = -(-length // UNROLL) * UNROLL
    dt, u, b, c, keep = _prepare(dt, u, b, c, keep, n_seg * seg)
    a_t = _transposed(a)
    h = jnp.swapaxes(h0, 1, 2)
    y = jnp.zeros(u.shape, u.dtype)
    saved = jnp.zeros((h.shape[0], n_seg) + h.shape[1:], h.dtype) if save_states else None

    def block(i, carry):
        h, y = carry
        t = i * UNROLL
        h, ys, _ = _block_forward(h, a_t, *(_rows(x, t, UNROLL) for x in (dt, u, b, c, keep)),
                                  save_prev=False)
        return h, _put(y, ys, t)

    per_seg = seg // UNROLL

    def segment(s, carry):
        h, y, saved = carry
        if saved is not None:
            saved = _put(saved, h[:, None], s)
        h, y = jax.lax.fori_loop(s * per_seg, (s + 1) * per_seg, block, (h, y))
        return h, y, saved

    h, y, saved = jax.lax.fori_loop(0, n_seg, segment, (h, y, saved))
    y, h = y[:, :length], jnp.swapaxes(h, 1, 2)
    return (y, h, saved) if save_states else (y, h)


def selective_scan_backward(dt, u, b, c, a, keep, saved, dy, dh_final):
    """The VJP of selective_scan_forward with respect to (dt, u, b, c, a, h0), from the saved
    segment states (module docstring). dy [B, T, C]; dh_final [B, C, N]."""
    batch, length, channels = u.shape
    groups, state = b.shape[2], b.shape[3]
    seg = segment_length(state)
    n_seg = saved.shape[1]
    total = n_seg * seg
    dt, u, b, c, keep = _prepare(dt, u, b, c, keep, total)
    dy = _pad_time(dy, total)
    a_t = _transposed(a)
    per_seg = seg // UNROLL

    def backward_block(j, carry, t0):
        g, da, ddt, du, db, dc, prevs_seg = carry
        t = t0 + j * UNROLL
        dt_r, u_r, b_r, c_r, keep_r, dy_r = (_rows(x, t, UNROLL) for x in (dt, u, b, c, keep, dy))
        h_prev = _rows(prevs_seg, j * UNROLL, UNROLL)  # [B, U, N, C]
        # Only g's recurrence is sequential; everything else is one vectorised pass over the
        # block's [B, U, N, C] (measured 3x faster than per-step reductions).
        decay = jnp.exp(dt_r[:, :, None, :] * a_t[None, None]) * keep_r[:, :, None, None]
        b_full = _block_over_channels(b_r, channels)  # [B, U, N, C] or [B, U, N, 1]
        c_full = _block_over_channels(c_r, channels)
        dyc = dy_r[:, :, None, :] * c_full
        gs = [None] * UNROLL
        for r in range(UNROLL - 1, -1, -1):
            g = g + dyc[:, r]
            gs[r] = g
            g = decay[:, r] * g
        gs = jnp.stack(gs, axis=1)
        du_in = dt_r * u_r
        h = decay * h_prev + du_in[:, :, None, :] * b_full
        gb = _state_contract(gs, b_r, groups)  # [B, U, C]
        decayed = gs * decay * h_prev
        ddt = _put(ddt, jnp.sum(decayed * a_t[None, None], axis=2) + u_r * gb, t)
        du = _put(du, dt_r * gb, t)
        db = _put(db, _group_contract(gs, du_in, groups), t)
        dc = _put(dc, _group_contract(h, dy_r, groups), t)
        da = da + jnp.einsum('bunc,buc->nc', decayed, dt_r)
        return g, da, ddt, du, db, dc, prevs_seg

    def segment(i, carry):
        s = n_seg - 1 - i
        t0 = s * seg

        # Recompute the states before each step of the segment from its checkpoint.
        def recompute(j, rc):
            h, prevs_seg = rc
            t = t0 + j * UNROLL
            h, _, prevs = _block_forward(
                h, a_t, *(_rows(x, t, UNROLL) for x in (dt, u, b, c, keep)), save_prev=True)
            return h, _put(prevs_seg, prevs, j * UNROLL)

        _, prevs_seg = jax.lax.fori_loop(
            0, per_seg, recompute, (_rows(saved, s, 1)[:, 0], carry[-1]))
        return jax.lax.fori_loop(0, per_seg, lambda j, cr: backward_block(per_seg - 1 - j, cr, t0),
                                 carry[:-1] + (prevs_seg,))

    zeros_c = jnp.zeros(u.shape, u.dtype)
    zeros_n = jnp.zeros(b.shape, b.dtype)
    g0 = jnp.swapaxes(dh_final, 1, 2).astype(saved.dtype)
    carry = (g0, jnp.zeros(a_t.shape, a_t.dtype), zeros_c, zeros_c, zeros_n, zeros_n,
             jnp.zeros((batch, seg) + g0.shape[1:], saved.dtype))
    g, da, ddt, du, db, dc, _ = jax.lax.fori_loop(0, n_seg, segment, carry)
    return (ddt[:, :length], du[:, :length], db[:, :length], dc[:, :length], da.T,
            jnp.swapaxes(g, 1, 2))
