"""The Hopper (sm_90a) forward kernel of `chunked_linear_attention` in Pallas on Mosaic GPU.

One program (one warpgroup, 128 threads) per (batch * head, block of 64 value columns) walks
the chunks (64 tokens, WGMMA's M) in order. `plgpu.emit_pipeline` streams each chunk's input
tiles into shared memory by TMA, `stages` chunks in flight (2 up to key_dim 128; 1 at 256,
where two stages would not fit the 227 KiB a block may use):

    in  (TMA -> SMEM, pipelined): q, k [64, Kd] and v [64, 64] in bf16/f16 (128-byte swizzle)
    out (SMEM -> TMA, one buffer each, waited on before reuse): o [64, 64] in v's dtype and
        the state entering the chunk [Kd, 64] f32 (what the backward reads)
    scratch SMEM: S as bf16 head + remainder [Kd, 64] x 2; the masked scores as bf16 head +
        remainder [64, 64] x 2

The carried state S [Kd, 64] float32 lives in registers between chunks (WGMMA accumulator
layout). Per chunk, WGMMA products with float32 accumulators:

    A       = q k^T                     [64, 64]  (smem x smem^T)
    o_intra = tril(A) v                 [64, 64]  (tril(A) as head + remainder: 2 products)
    o_inter = q S                       [64, 64]  (S as head + remainder: 2 products)
    S'      = S + k^T v                 [Kd, 64]  (smem^T x smem, added to S in registers)

16-bit inputs only: the products' operands are the inputs themselves (exact) and the float32
quantities that meet the tensor cores (the masked scores and S) are each split into a bfloat16
head and remainder, so only q (scaled by `scale` in float32 outside) is rounded to 16 bits;
the chunk states come out at float32 accuracy. Float32 inputs stay on the Triton kernel (TF32x3,
~1e-6 relative): Mosaic's tf32 WGMMA takes only K-major operands, and k^T v contracts over the
rows of both k and v.

Written for GPU interpret mode as well (JAX 0.12.0.1): it takes only SMEM refs as WGMMA
operands (so the scores go through SMEM, not registers), has no rule for WGMMA on an
accumulator initialised from registers (so S' = S + a fresh product), and does not model the
predicated output copies of emit_pipeline (so the outputs are copied out by hand).

Not here yet (the op runs the Triton kernel for them): gates (the scalar-gated body below is
kept but off, see ENABLE_SCALAR_GATE), segment_ids, key dims above 256, and the backward (the
custom VJP's backward reads the chunk start states this kernel writes, in xla.py's layout, and
runs the Triton backward unchanged).

The math is pallas.py's `chunk_forward` (and xla.py's): cumulative log gates from
`xla._cumulative` outside the kernel, only differences <= 0 exponentiated inside.
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
DTYPES = (jnp.bfloat16, jnp.float16)
# The scalar-gated body below lowers, but Mosaic GPU's layout inference did not finish on it
# (over 10 minutes on this CPU, JAX 0.12.0.1) even with every intermediate cast to the WGMMA
# layout: until that is solved, gated calls take the Triton kernel.
ENABLE_SCALAR_GATE = False


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


def supports(q, k, v, g, runs, chunk_size=None) -> bool:
    """Whether this kernel computes the call (else the op runs the Triton kernel). Chunks
    longer than 64 would need several row tiles per product (the op's default is 64); the
    chunks must be xla.py's, whose start states the backward reads."""
    vector = g is not None and g.shape[-1] > 1
    chunk = _xla.chunk_geometry(q.shape[1], chunk_size, False)[0]
    return (available() and runs is None and chunk <= ROWS and (g is None or ENABLE_SCALAR_GATE) and not vector
            and k.dtype == v.dtype and any(k.dtype == d for d in DTYPES)
            and q.shape[-1] <= MAX_KEY_DIM)


def _stages(kd):
    return 2 if kd <= 128 else 1


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
    chunk, _, padded = _xla.chunk_geometry(length, chunk_size, False)
    n = padded // chunk
    kd = _round_up(key_dim, 64)
    vd = _round_up(value_dim, BLOCK_V)
    geo = _pallas._Geometry(chunk=chunk, cp=ROWS, n=n, kd=kd, kg=1, block_v=BLOCK_V, vd=vd)
    bh = batch * heads
    dt = k.dtype
    chunked = lambda x: _xla.to_chunks(x, chunk, padded)
    qt = _pallas._to_tiles(chunked(q), geo, kd).astype(dt)
    kt = _pallas._to_tiles(chunked(k), geo, kd)
    vt = _pallas._to_tiles(chunked(v), geo, vd)
    args = [qt, kt, vt]
    gated = g is not None
    if gated:
        b, to_end, total = _xla._cumulative(chunked(g).astype(F32))
        # Edge padding: a padded row carries its chunk's last cumulative gate (exponents <= 0).
        args += [_pallas._to_tiles(b, geo, 1, edge=True).reshape(bh, n * ROWS),
                 _pallas._to_tiles(to_end, geo, 1, edge=True).reshape(bh, n * ROWS),
                 jnp.broadcast_to(total, (batch, heads, n, kd)).reshape(bh, n * kd)]
    args.append(_pallas._state_in(h0, geo))
    o, final, states = _call(args, geo, gated, dt, interpret, plgpu)
    o = _pallas._from_tiles(o, geo, (batch, length, heads, value_dim))
    final = final[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    states = states.reshape(bh, n, kd, vd)[:, :, :key_dim, :value_dim]
    return o, final, states.reshape(batch, heads, n, key_dim, value_dim)


def _call(args, geo, gated, dt, interpret, plgpu):
    bh, kd, vd, n = args[0].shape[0], geo.kd, geo.vd, geo.n
    c, vb = ROWS, BLOCK_V
    # 128-byte swizzle, tiles of 8 rows x 64 16-bit elements: what WGMMA reads from SMEM.
    tf16 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def kernel(*refs):
        if gated:
            q_ref, k_ref, v_ref, b_ref, e_ref, t_ref, h0_ref, o_ref, fin_ref, st_ref = refs[:10]
        else:
            q_ref, k_ref, v_ref, h0_ref, o_ref, fin_ref, st_ref = refs[:7]
        i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("v")
        wg = lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA)
        cols = pl.ds(j * vb, vb)

        def load_state(smem, bar):
            plgpu.copy_gmem_to_smem(h0_ref.at[i, :, cols], smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            return plgpu.load(smem, layout=plgpu.Layout.WGMMA)

        s0 = pl.run_scoped(load_state, plgpu.SMEM((kd, vb), F32), plgpu.Barrier(num_barriers=1))

        def chunk_body(scratch, idx, *tiles):
            o_s, st_s, s_hi, s_lo, p_hi, p_lo, *vs = scratch
            if gated:
                q_s, k_s, v_s, b_s, e_s, t_s, s = tiles
            else:
                q_s, k_s, v_s, s = tiles
            t = idx[0]
            s_in = s
            hi = s.astype(dt)
            s_hi[...] = hi
            s_lo[...] = (s - hi.astype(F32)).astype(dt)
            plgpu.commit_smem()

            def scores(acc):
                plgpu.wgmma(acc, q_s, k_s.T)
                return acc[...]

            a = pl.run_scoped(scores, plgpu.ACC((c, c), F32))
            row = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=plgpu.Layout.WGMMA)
            col = plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=plgpu.Layout.WGMMA)
            if gated:
                b_row = plgpu.load(b_s, layout=plgpu.Layout.WGMMA.reduce(1))
                b_col = plgpu.load(b_s, layout=plgpu.Layout.WGMMA.reduce(0))
                diff = wg(jax.lax.broadcast_in_dim(b_row, (c, c), [0])
                          - jax.lax.broadcast_in_dim(b_col, (c, c), [1]))
                strict = row > col
                decay = wg(jnp.where(strict, wg(jnp.exp(wg(jnp.where(strict, diff, 0.0)))), 0.0))
                a = wg(jnp.where(row == col, a, wg(a * decay)))
            else:
                a = jnp.where(row >= col, a, 0.0)
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
                plgpu.wgmma(acc, q_s, s_hi)
                plgpu.wgmma(acc, q_s, s_lo)
                return acc[...]

            o = pl.run_scoped(intra, plgpu.ACC((c, vb), F32))
            o_inter = pl.run_scoped(inter, plgpu.ACC((c, vb), F32))
            if gated:
                eb = jnp.exp(b_row)
                o = wg(o + wg(jax.lax.broadcast_in_dim(eb, (c, vb), [0])) * o_inter)
                ee = jnp.exp(plgpu.load(e_s, layout=plgpu.Layout.WGMMA.reduce(1)))
                vv = plgpu.load(v_s, layout=plgpu.Layout.WGMMA).astype(F32)
                vs = vs[0]
                vs[...] = wg(wg(jax.lax.broadcast_in_dim(ee, (c, vb), [0])) * vv).astype(dt)
                plgpu.commit_smem()
                dec = jnp.exp(plgpu.load(t_s, layout=plgpu.Layout.WGMMA.reduce(1)))
                s = wg(wg(jax.lax.broadcast_in_dim(dec, (kd, vb), [0])) * s)
                src = vs
            else:
                o = o + o_inter
                src = v_s
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
                plgpu.wgmma(acc, k_s.T, src)
                return acc[...]

            # A fresh accumulator plus s rather than one initialised with s (`run_state` on
            # ACC.init): GPU interpret mode has no rule for the discharged WGMMA it produces.
            return s + pl.run_scoped(update, plgpu.ACC((kd, vb), F32))

        seq = lambda w: plgpu.BlockSpec((c, w), lambda t: (t, 0), transforms=tf16)
        in_specs = [seq(kd), seq(kd), seq(vb)]
        in_refs = [q_ref.at[i], k_ref.at[i], v_ref.at[i, :, cols]]
        if gated:
            vec = lambda w: plgpu.BlockSpec((w,), lambda t: (t,))
            in_specs += [vec(c), vec(c), vec(kd)]
            in_refs += [b_ref.at[i], e_ref.at[i], t_ref.at[i]]

        def walk(*scratch):
            last = plgpu.emit_pipeline(
                functools.partial(chunk_body, scratch), grid=(n,), in_specs=in_specs,
                max_concurrent_steps=_stages(kd), init_carry=s0)(*in_refs)
            plgpu.wait_smem_to_gmem(0)      # before the output buffers are released
            return last

        scratch = [plgpu.SMEM((c, vb), dt, transforms=tf16), plgpu.SMEM((kd, vb), F32)]
        scratch += [plgpu.SMEM((kd, vb), dt, transforms=tf16)] * 2 + [
            plgpu.SMEM((c, c), dt, transforms=tf16)] * 2
        if gated:
            scratch.append(plgpu.SMEM((c, vb), dt, transforms=tf16))
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
