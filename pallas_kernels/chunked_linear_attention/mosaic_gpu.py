"""The Hopper (sm_90a) kernels of `chunked_linear_attention` in Pallas on Mosaic GPU: the
forward, and the backward's reverse chunk scan (`state_cotangents`, the end of this file).

One program (one warpgroup, 128 threads) per (batch * head, block of 64 value columns) walks
the chunks (64 tokens, WGMMA's M) in order. `plgpu.emit_pipeline` streams each chunk's input
tiles into shared memory by TMA, `stages` chunks in flight (`_stages`: what fits the 227 KiB a
block may use). Three modes (`_mode`), one kernel:

    plain  (no gate, no segments)  in: q, k [64, Kd], v [64, 64]
    scalar (a gate per head and step, and/or segment_ids)
                                   in: q, k, v, q~, k~ (3 pieces; 1 without a gate),
                                       D [64, 64] f32, gamma [Kd] f32
    vector (a gate per key, with or without segments)
                                   in: v, q~, k~ (3 pieces), A [64, 64] f32, gamma [Kd] f32

    (16-bit tiles with a 128-byte swizzle)
    out (SMEM -> TMA, one buffer each, waited on before reuse): o [64, 64] in v's dtype and
        the state entering the chunk [Kd, 64] f32 (what the backward reads)
    scratch SMEM: S as bf16 head + remainder [Kd, 64] x 2; the masked scores as bf16 head +
        remainder [64, 64] x 2

All gate and segment arithmetic happens in XLA before the call (`_gate_tiles`, xla.py's chunked
form; every exponent <= 0): with b the within-chunk cumulative log gate,

    q~_i = q_i exp(b_i)    k~_j = k_j exp(b_C - b_j)    gamma = exp(b_C) (0 past a reset)
    D_ij = exp(b_i - b_j) [j <= i, same segment]                     (scalar gates / segments)
    A_ij = sum_d q_id k_jd exp(b_id - b_jd) [j <= i, same segment]   (vector gates: the C x C
                                                                       x Kd part, as in fla)

so the kernel is a chain of WGMMAs and elementwise ops on tiles of known layout: the carried
state S [Kd, 64] float32 lives in registers between chunks (WGMMA accumulator layout), and per
chunk, with float32 accumulators,

    A       = (q k^T) * D, tril(q k^T) or the A tile     [64, 64]
    o       = A v + q~ S                 [64, 64]  (A and S as head + remainder: 4 products)
    S'      = gamma * S + k~^T v         [Kd, 64]  (gamma broadcast along WGMMA rows; one
                                                    product per piece of k~)

16-bit inputs only: the products' operands are the inputs themselves (exact) or float32
quantities split into 16-bit pieces (the scores and S into head + remainder; k~, whose error
would enter the chunk states, into 3 pieces: float32's 24 bits), so only q and q~ (the query
side of o) are rounded to 16 bits and the chunk states come out at float32 accuracy. Float32
inputs stay on the Triton kernel (TF32x3, ~1e-6 relative): Mosaic's tf32 WGMMA takes only
K-major operands, and k^T v contracts over the rows of both k and v.

Written for GPU interpret mode as well (JAX 0.12.0.1): it takes only SMEM refs as WGMMA
operands (so the scores go through SMEM, not registers), has no rule for WGMMA on an
accumulator initialised from registers (so S' = gamma S + a fresh product), and does not model
the predicated output copies of emit_pipeline (so the outputs are copied out by hand).

Not here (the op runs the Triton kernel for them): gated or segmented calls above key_dim 128
(their tiles do not fit SMEM even with one stage), any call above 256, chunks longer than 64,
float32 inputs. The backward covers the same calls (with the output's cotangent in the inputs'
dtype): its kernel walks dS back through the chunks, xla.py's per-chunk VJP does the rest.

An earlier version computed the decays inside the kernel (row/column broadcasts of b, iota
masks and exp on the scores); Mosaic GPU's layout inference did not finish on it in 10+
minutes. With the decays as input tiles every gated variant compiles in seconds.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch
from pallas_kernels._chunks import round_up as _round_up
from pallas_kernels.chunked_linear_attention import pallas as _pallas
from pallas_kernels.chunked_linear_attention import xla as _xla

F32 = jnp.float32
_OP = "chunked_linear_attention"
ROWS = 64          # chunk rows: the WGMMA tile's M (a chunk is padded to it)
BLOCK_V = 64       # value columns per program: one 128-byte swizzle row of bf16
MAX_KEY_DIM = 256
MAX_GATED_KEY_DIM = 128   # the gated tiles (q~, k~ in 3 pieces, D or A) fill SMEM at 256
DTYPES = (jnp.bfloat16, jnp.float16)
# The float32 decayed keys k~ reach the tensor cores as this many 16-bit pieces (8 bits of
# mantissa each): 3 carry float32's 24, so the chunk states keep float32 accuracy.
KEY_PIECES = 3


def available() -> bool:
    """Whether the installed JAX has Pallas Mosaic GPU (JAX >= 0.7 or so)."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return False
    return all(hasattr(plgpu, n) for n in ("emit_pipeline", "wgmma", "kernel", "ACC"))


def interpret_params():
    """GPU interpret mode as the kernel tests ask: race detection on, uninitialised memory NaN."""
    return _dispatch.gpu_interpret_params()


def _mode(g, runs):
    """"plain" (no gate, no segments), "scalar" (a gate per head and step, or segments: the
    kernel multiplies q k^T by a decay tile) or "vector" (a gate per key: the scores come in)."""
    if g is not None and g.shape[-1] > 1:
        return "vector"
    return "plain" if g is None and runs is None else "scalar"


def supports(q, k, v, g, runs, chunk_size=None) -> bool:
    """Whether this kernel computes the call (else the op runs the Triton kernel). Chunks
    longer than 64 would need several row tiles per product (the op's default is 64); the
    chunks must be xla.py's, whose start states the backward reads."""
    mode = _mode(g, runs)
    chunk = _xla.chunk_geometry(q.shape[1], chunk_size, mode == "vector")[0]
    max_kd = MAX_KEY_DIM if mode == "plain" else MAX_GATED_KEY_DIM
    return (available() and chunk <= ROWS and k.dtype == v.dtype
            and any(k.dtype == d for d in DTYPES) and q.shape[-1] <= max_kd)


def _stages(kd, mode):
    """Chunks in flight: what fits the 227 KiB of SMEM a block may use (RESULTS.md's table)."""
    if mode == "plain":
        return 2 if kd <= 128 else 1
    return 2 if kd <= 64 else 1


def _split(x, dt, pieces):
    """float32 x as `pieces` 16-bit terms (head first) whose sum is x to 8 (bf16) or 11 (f16)
    bits of mantissa per piece."""
    out = []
    for _ in range(pieces):
        head = x.astype(dt)
        out.append(head)
        x = x - head.astype(F32)
    return out


def _square_tiles(x, geo):
    """Per-chunk [B, H, N, C, C] -> [B*H, N*ROWS, ROWS], zero padded (the padded rows and
    columns are the padded tokens: no score reaches or leaves them)."""
    b, h, n, c, _ = x.shape
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, ROWS - c)] * 2)
    return x.reshape(b * h, n * ROWS, ROWS)


@_xla._broadcasting
def _gate_tiles(q, k, g, runs, geo, chunk, sub, padded, mode, dt, query_pieces=1):
    """The gate and segment arithmetic, in XLA (xla.py's chunked form), as the kernel's tiles:

        q~_i = q_i exp(b_i)       k~_j = k_j exp(b_C - b_j)       gamma = exp(b_C)
        D_ij = exp(b_i - b_j) [j <= i, same segment]     (scalar gates; segments alone: 0/1)
        A_ij = sum_d q_id k_jd exp(b_id - b_jd) [j <= i, same segment]   (vector gates)

    with q~ zero for tokens after a segment start in the chunk (the carried state does not
    reach them), k~ zero for tokens before the chunk's last start, gamma zero past a start.
    All exponents are <= 0. Returns the extra kernel inputs after q, k, v: [q~, k~ pieces...,
    D or A, gamma [B*H, N*Kd]], q~ as `query_pieces` 16-bit pieces."""
    chunked = lambda x: _xla.to_chunks(x, chunk, padded)      # [B, H, N, C, D]
    qc, kc = chunked(q), chunked(k).astype(F32)
    batch, heads, n = qc.shape[:3]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    same, from_start, to_end, keep = causal, None, None, None
    if runs is not None:
        masks = {name: jnp.moveaxis(m, 0, 2)                  # [N, B, 1, ...] -> [B, 1, N, ...]
                 for name, m in _xla.segment_masks(runs, chunk).items()}
        same = causal & masks["same"]
        from_start, to_end, keep = masks["from_start"], masks["to_end"], masks["keep"]
    if g is None:
        qd, kd, gamma = qc, kc, jnp.ones((batch, heads, n, 1), F32)
        scores = jnp.broadcast_to(same, (batch, heads, n, chunk, chunk)).astype(F32)
    else:
        b, to_end_gate, total = _xla._cumulative(chunked(g).astype(F32))
        qd, kd, gamma = qc * jnp.exp(b), kc * jnp.exp(to_end_gate), jnp.exp(total)
        if mode == "vector":
            scores = jnp.where(same, _xla._vector_gate_scores(qc, kc, b, sub), 0.0)
        else:
            bs = b[..., 0]
            scores = _xla._pair_decay(bs[..., :, None] - bs[..., None, :], same,
                                      jnp.eye(chunk, dtype=bool))
            scores = jnp.broadcast_to(scores, (batch, heads, n, chunk, chunk))
    if runs is not None:
        qd = jnp.where(from_start[..., None], qd, 0.0)
        kd = jnp.where(to_end[..., None], kd, 0.0)
        gamma = jnp.where(keep[..., None], gamma, 0.0)
    # Exact in 16 bits without a gate (masked inputs): one piece is the whole key.
    pieces = KEY_PIECES if g is not None else 1
    gamma = jnp.broadcast_to(gamma, (batch, heads, n, q.shape[-1]))
    gamma = jnp.pad(gamma, [(0, 0)] * 3 + [(0, geo.kd - q.shape[-1])])
    tiles = _split(_pallas._to_tiles(qd, geo, geo.kd), dt, query_pieces)
    tiles += _split(_pallas._to_tiles(kd, geo, geo.kd), dt, pieces)
    tiles += [_square_tiles(scores, geo), gamma.reshape(batch * heads, n * geo.kd)]
    return tiles


def forward(q, k, v, g, h0, runs, *, chunk_size=None, interpret=None):
    """`pallas.forward` (target "cuda") on Mosaic GPU: (o [B,T,H,V] in v's dtype, final state
    [B,H,K,V] f32, the state entering every chunk [B,H,N,K,V] f32). Calls outside `supports`
    run the Triton kernel."""
    if not supports(q, k, v, g, runs, chunk_size):
        return _pallas.forward(q, k, v, g, h0, runs, chunk_size=chunk_size, target="cuda",
                               interpret=_dispatch.triton_interpret(interpret))
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _pallas._check_dtype(h0)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    mode = _mode(g, runs)
    chunk, sub, padded = _xla.chunk_geometry(length, chunk_size, mode == "vector")
    n = padded // chunk
    kd = _round_up(key_dim, 64)
    vd = _round_up(value_dim, BLOCK_V)
    geo = _pallas._Geometry(chunk=chunk, cp=ROWS, n=n, kd=kd, kg=1, block_v=BLOCK_V, vd=vd)
    bh = batch * heads
    dt = k.dtype
    chunked = lambda x: _xla.to_chunks(x, chunk, padded)
    args = []
    if mode != "vector":     # vector gates: the scores arrive whole, q and k are not needed
        args += [_pallas._to_tiles(chunked(q), geo, kd).astype(dt),
                 _pallas._to_tiles(chunked(k), geo, kd)]
    args.append(_pallas._to_tiles(chunked(v), geo, vd))
    pieces = 0
    if mode != "plain":
        extra = _gate_tiles(q, k, g, runs, geo, chunk, sub, padded, mode, dt)
        pieces = len(extra) - 3
        args += extra
    args.append(_pallas._state_in(h0, geo))
    o, final, states = _call(args, geo, mode, pieces, dt, interpret, plgpu)
    o = _pallas._from_tiles(o, geo, (batch, length, heads, value_dim))
    final = final[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    states = states.reshape(bh, n, kd, vd)[:, :, :key_dim, :value_dim]
    return o, final, states.reshape(batch, heads, n, key_dim, value_dim)


def _call(args, geo, mode, pieces, dt, interpret, plgpu):
    bh, kd, vd, n = args[0].shape[0], geo.kd, geo.vd, geo.n
    c, vb = ROWS, BLOCK_V
    # 128-byte swizzle, tiles of 8 rows x 64 16-bit elements: what WGMMA reads from SMEM.
    tf16 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    n_in = len(args)
    wgmma_layout = plgpu.Layout.WGMMA

    def kernel(*refs):
        in_refs, (h0_ref, o_ref, fin_ref, st_ref) = refs[:n_in - 1], refs[n_in - 1:n_in + 3]
        i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("v")
        cols = pl.ds(j * vb, vb)

        def load_state(smem, bar):
            plgpu.copy_gmem_to_smem(h0_ref.at[i, :, cols], smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            return plgpu.load(smem, layout=wgmma_layout)

        s0 = pl.run_scoped(load_state, plgpu.SMEM((kd, vb), F32), plgpu.Barrier(num_barriers=1))

        def chunk_body(scratch, idx, *tiles):
            o_s, st_s, s_hi, s_lo, p_hi, p_lo = scratch
            *tiles, s = tiles
            if mode == "plain":
                q_s, k_s, v_s = tiles
                qd_s, keys = q_s, [k_s]
            elif mode == "scalar":
                q_s, k_s, v_s, qd_s, *keys, d_s, gam_s = tiles
            else:
                v_s, qd_s, *keys, a_s, gam_s = tiles
            t = idx[0]
            s_in = s
            hi = s.astype(dt)
            s_hi[...] = hi
            s_lo[...] = (s - hi.astype(F32)).astype(dt)
            plgpu.commit_smem()

            def scores(acc):
                plgpu.wgmma(acc, q_s, k_s.T)
                return acc[...]

            if mode == "vector":
                a = plgpu.load(a_s, layout=wgmma_layout)
            else:
                a = pl.run_scoped(scores, plgpu.ACC((c, c), F32))
                if mode == "plain":
                    row = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=wgmma_layout)
                    col = plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=wgmma_layout)
                    a = jnp.where(row >= col, a, 0.0)
                else:
                    # The decay tile carries the causal and segment masks too.
                    a = a * plgpu.load(d_s, layout=wgmma_layout)
            a_hi = a.astype(dt)
            # Through SMEM, not as a register operand: GPU interpret mode takes only SMEM refs
            # as WGMMA operands (JAX 0.12.0.1).
            p_hi[...] = a_hi
            p_lo[...] = (a - a_hi.astype(F32)).astype(dt)
            plgpu.commit_smem()

            def intra(acc):
                plgpu.wgmma(acc, p_hi, v_s)
                plgpu.wgmma(acc, p_lo, v_s)
                return acc[...]

            def inter(acc):
                plgpu.wgmma(acc, qd_s, s_hi)
                plgpu.wgmma(acc, qd_s, s_lo)
                return acc[...]

            o = pl.run_scoped(intra, plgpu.ACC((c, vb), F32))
            o = o + pl.run_scoped(inter, plgpu.ACC((c, vb), F32))
            if mode != "plain":
                # The chunk's decay of the carried state: one factor per key row of S.
                gamma = plgpu.load(gam_s, layout=wgmma_layout.reduce(1))
                s = s * jax.lax.broadcast_in_dim(gamma, (kd, vb), [0])
            # The outputs leave by TMA from one buffer each, written once the previous chunk's
            # copies have read it (emit_pipeline's own output stage predicates its copies,
            # which GPU interpret mode does not model).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_s[...] = o.astype(o_s.dtype)
            st_s[...] = s_in
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[i, pl.ds(t * c, c), cols])
            plgpu.copy_smem_to_gmem(st_s, st_ref.at[i, pl.ds(t * kd, kd), cols])

            def update(acc):
                for key in keys:
                    plgpu.wgmma(acc, key.T, v_s)
                return acc[...]

            # A fresh accumulator plus s rather than one initialised with s (`run_state` on
            # ACC.init): GPU interpret mode has no rule for the discharged WGMMA it produces.
            return s + pl.run_scoped(update, plgpu.ACC((kd, vb), F32))

        seq = lambda w: plgpu.BlockSpec((c, w), lambda t: (t, 0), transforms=tf16)
        if mode == "vector":
            in_specs = [seq(vb)]
            refs_in = [in_refs[0].at[i, :, cols]]
        else:
            in_specs = [seq(kd), seq(kd), seq(vb)]
            refs_in = [in_refs[0].at[i], in_refs[1].at[i], in_refs[2].at[i, :, cols]]
        if mode != "plain":
            in_specs += [seq(kd)] * (1 + pieces) + [
                plgpu.BlockSpec((c, c), lambda t: (t, 0)), plgpu.BlockSpec((kd,), lambda t: (t,))]
            refs_in += [r.at[i] for r in in_refs[len(refs_in):]]

        def walk(*scratch):
            last = plgpu.emit_pipeline(
                functools.partial(chunk_body, scratch), grid=(n,), in_specs=in_specs,
                max_concurrent_steps=_stages(kd, mode), init_carry=s0)(*refs_in)
            plgpu.wait_smem_to_gmem(0)      # before the output buffers are released
            return last

        scratch = [plgpu.SMEM((c, vb), dt, transforms=tf16), plgpu.SMEM((kd, vb), F32)]
        scratch += [plgpu.SMEM((kd, vb), dt, transforms=tf16)] * 2 + [
            plgpu.SMEM((c, c), dt, transforms=tf16)] * 2
        s = pl.run_scoped(walk, *scratch)

        def store_final(smem):
            smem[...] = s
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, fin_ref.at[i, :, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_final, plgpu.SMEM((kd, vb), F32))

    out_type = (jax.ShapeDtypeStruct((bh, n * c, vd), dt),
                jax.ShapeDtypeStruct((bh, kd, vd), F32),
                jax.ShapeDtypeStruct((bh, n * kd, vd), F32))
    call = plgpu.kernel(kernel, out_type=out_type, grid=(bh, vd // vb), grid_names=("bh", "v"),
                        interpret=interpret if interpret is not None else False)
    return call(*args)


# ---------------------------------------------------------------------------------------------
# The backward: the reverse chunk scan of the state cotangent,
#
#     dS_start = gamma * dS_end + q~^T do          [Kd, 64] float32 in registers,
#
# walked from the last chunk with dS = d final_state, writing every chunk's dS_end (and
# d initial_state at the end) in xla.py's layout; everything else (the intra-chunk VJP, the
# inter-chunk terms do S_start^T, v dS_end^T, k~ dS_end, and the gate gradients) is xla.py's
# per-chunk VJP, batched over chunks, from those dS_end and the forward's chunk start states.


def supports_backward(q, k, v, g, runs, do, chunk_size=None) -> bool:
    """The calls whose forward ran this module's kernel (`supports`), with the output's
    cotangent in the inputs' 16-bit dtype (it meets the tensor cores unsplit)."""
    return supports(q, k, v, g, runs, chunk_size) and do.dtype == k.dtype


def _backward_stages(kd):
    """Chunks in flight: q~ in 3 pieces [64, Kd] + do [64, 64] per stage, plus the [Kd, 64]
    float32 output buffer, within 227 KiB (Kd 256: 104 KiB a stage + 64 KiB)."""
    return 2 if kd <= 128 else 1


def backward(q, k, v, g, h0, runs, starts, do, dfinal, *, chunk_size=None, interpret=None):
    """`pallas.backward` (target "cuda") with the reverse chunk scan on Mosaic GPU: (dq, dk,
    dv, dg, dh0), as `xla.backward`. Calls outside `supports_backward` run the Triton
    kernel."""
    if not supports_backward(q, k, v, g, runs, do, chunk_size):
        return _pallas.backward(q, k, v, g, h0, runs, starts, do, dfinal,
                                chunk_size=chunk_size, target="cuda",
                                interpret=_dispatch.triton_interpret(interpret))
    _pallas._check_dtype(h0)
    ends = state_cotangents(q, k, g, runs, do, dfinal, chunk_size=chunk_size,
                            interpret=interpret)
    return _xla.backward(q, k, v, g, h0, runs, starts, do, dfinal, chunk_size=chunk_size,
                         ends=ends)


def state_cotangents(q, k, g, runs, do, dfinal, *, chunk_size=None, interpret=None):
    """`xla.state_cotangents` on Mosaic GPU (a call `supports_backward` covers; k gives the
    16-bit dtype): (dS at every chunk's end [B,H,N,K,V], d initial_state [B,H,K,V])."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, length, heads, key_dim = q.shape
    value_dim = do.shape[-1]
    mode = _mode(g, runs)
    chunk, sub, padded = _xla.chunk_geometry(length, chunk_size, mode == "vector")
    n = padded // chunk
    kd = _round_up(key_dim, 64)
    vd = _round_up(value_dim, BLOCK_V)
    geo = _pallas._Geometry(chunk=chunk, cp=ROWS, n=n, kd=kd, kg=1, block_v=BLOCK_V, vd=vd)
    dt = k.dtype
    chunked = lambda x: _xla.to_chunks(x, chunk, padded)
    # q~ (q itself without gate or segments) is float32 (the scale is folded in): 3 pieces,
    # so the state cotangents keep float32 accuracy. Of _gate_tiles' tiles only q~ and gamma
    # are read; XLA drops the rest (k~, D or A) under jit.
    if mode == "plain":
        args = _split(_pallas._to_tiles(chunked(q).astype(F32), geo, kd), dt, KEY_PIECES)
    else:
        extra = _gate_tiles(q, k, g, runs, geo, chunk, sub, padded, mode, dt,
                            query_pieces=KEY_PIECES)
        args = extra[:KEY_PIECES]
    args.append(_pallas._to_tiles(chunked(do), geo, vd))
    if mode != "plain":
        args.append(extra[-1])
    args.append(_pallas._state_in(dfinal.astype(F32), geo))
    ends, dh0 = _reverse_call(args, geo, mode, interpret, plgpu)
    bh = batch * heads
    ends = ends.reshape(bh, n, kd, vd)[:, :, :key_dim, :value_dim]
    ends = ends.reshape(batch, heads, n, key_dim, value_dim)
    dh0 = dh0[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    return ends, dh0


def _reverse_call(args, geo, mode, interpret, plgpu):
    bh, kd, vd, n = args[0].shape[0], geo.kd, geo.vd, geo.n
    c, vb = ROWS, BLOCK_V
    tf16 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    n_in = len(args)
    wgmma_layout = plgpu.Layout.WGMMA

    def kernel(*refs):
        in_refs, (dfin_ref, ends_ref, dh0_ref) = refs[:n_in - 1], refs[n_in - 1:n_in + 2]
        i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("v")
        cols = pl.ds(j * vb, vb)

        def load_state(smem, bar):
            plgpu.copy_gmem_to_smem(dfin_ref.at[i, :, cols], smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            return plgpu.load(smem, layout=wgmma_layout)

        ds0 = pl.run_scoped(load_state, plgpu.SMEM((kd, vb), F32), plgpu.Barrier(num_barriers=1))

        def chunk_body(end_s, idx, *tiles):
            *tiles, ds = tiles
            if mode == "plain":
                *query, do_s = tiles
            else:
                *query, do_s, gam_s = tiles
            t = n - 1 - idx[0]
            # One output buffer, rewritten once the previous chunk's copy has read it.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            end_s[...] = ds
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(end_s, ends_ref.at[i, pl.ds(t * kd, kd), cols])
            if mode != "plain":
                gamma = plgpu.load(gam_s, layout=wgmma_layout.reduce(1))
                ds = ds * jax.lax.broadcast_in_dim(gamma, (kd, vb), [0])

            def local(acc):
                for piece in query:
                    plgpu.wgmma(acc, piece.T, do_s)
                return acc[...]

            return ds + pl.run_scoped(local, plgpu.ACC((kd, vb), F32))

        rev = lambda t: (n - 1 - t, 0)
        in_specs = [plgpu.BlockSpec((c, kd), rev, transforms=tf16)] * KEY_PIECES
        in_specs.append(plgpu.BlockSpec((c, vb), rev, transforms=tf16))
        refs_in = [r.at[i] for r in in_refs[:KEY_PIECES]]
        refs_in.append(in_refs[KEY_PIECES].at[i, :, cols])
        if mode != "plain":
            in_specs.append(plgpu.BlockSpec((kd,), lambda t: (n - 1 - t,)))
            refs_in.append(in_refs[KEY_PIECES + 1].at[i])

        def walk(end_s):
            last = plgpu.emit_pipeline(
                functools.partial(chunk_body, end_s), grid=(n,), in_specs=in_specs,
                max_concurrent_steps=_backward_stages(kd), init_carry=ds0)(*refs_in)
            plgpu.wait_smem_to_gmem(0)
            return last

        ds = pl.run_scoped(walk, plgpu.SMEM((kd, vb), F32))

        def store_dh0(smem):
            smem[...] = ds
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, dh0_ref.at[i, :, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_dh0, plgpu.SMEM((kd, vb), F32))

    out_type = (jax.ShapeDtypeStruct((bh, n * kd, vd), F32),
                jax.ShapeDtypeStruct((bh, kd, vd), F32))
    call = plgpu.kernel(kernel, out_type=out_type, grid=(bh, vd // vb), grid_names=("bh", "v"),
                        interpret=interpret if interpret is not None else False)
    return call(*args)
