"""The Hopper (sm_90a) forward kernel of `delta_rule` (plain, gated, segmented) in Pallas on
Mosaic GPU.

fla's split for Hopper: everything inside a chunk that does not depend on the carried state is
batched XLA work before the kernel (xla.py's `_Chunked`: the UT transform T = (I + A)^-1 and

    W  = T diag(beta gamma) K      U~ = T diag(beta) V          [C, K], [C, V]
    P  = scale (Q K^T) * Gam       Qg = scale diag(gamma) Q     [C, C], [C, K]
    Kd = diag(Gam_last,:) K        gl = gamma_last              [C, K], scalar

with gates and segment resets already folded in), so the kernel is only the sequential state
recurrence, a chain of WGMMAs per chunk:

    u  = U~ - W S                   [64, vb]   (W: head + remainder, S: head + remainder)
    o  = Qg S + P u                 [64, vb]
    S' = gl S + Kd^T u              [Kd, vb]   (u: head + remainder)

One program (one warpgroup, 128 threads) per (batch * head, block of vb value columns) walks
the chunks (padded with zero rows to 64, WGMMA's M; a zero row leaves S as it is) in order.
`plgpu.emit_pipeline` TMA-loads each chunk's W (head, remainder), Qg, Kd (and its remainder
where it is not exact in 16 bits), P [64, 64] in the input dtype and U~ [64, vb] float32.
S [Kd, vb] float32 stays in registers (WGMMA accumulator layout) between chunks and goes
through SMEM as a 16-bit head + remainder where it is a WGMMA operand, as u does: the state
keeps ~16 bits of mantissa in every product and float32 sums. Outputs (o [64, vb] in v's
dtype, the chunk's start state [Kd, vb] float32 in xla.py's layout, which the custom VJP's
Triton / XLA backward reads) leave by TMA from one SMEM buffer each, waited on before the next
chunk writes them.

Tiling (`_plan` from `_smem_bytes`, the kernels' SMEM arithmetic, separately for the forward
and the reverse scan): u = U~ - W S sums over every key row, so the key dim is never split
across programs; the value columns are (each column of S evolves on its own). vb is the widest
of 64, 32, 16 with S [Kd, vb] at most 128 x 64 (64 registers a thread) whose tiles fit 227
KiB, with 2 chunks in flight where they fit. Every call covered before keeps vb 64 (bf16 /
f16: 2 stages at key dim 64, 1 at 128; float32 key dim 64: 1 stage); key dim 256 (16-bit):
vb 32 (16 gated), 1 stage; float32 key dim 128: vb 16 forward, 32 reverse scan. WGMMA wants
one swizzle on both SMEM operands, so every 16-bit tile takes the [.., vb] one's (vb * 2
bytes: 128, 64 or 32). Narrow blocks reload W, Qg, P and Kd once per block of columns.

Precision: the products that reach the state (W S, Kd^T u) use head + remainder on both sides
(the remainder x remainder term dropped); Qg and P, which reach only o (rounded to 16 bits on
the way out), are single 16-bit operands.

float32 inputs: WGMMA takes no float32 operands, so every float32 operand (W, Qg, P, Kd, S,
u) meets it as 3 bf16 pieces x = x0 + x1 + x2 (each the rounding of what the previous leave:
24 bits of mantissa, float32's), and a product keeps the 6 piece pairs of order i + j < 3
(the dropped ones are below float32's rounding); o comes out float32 through a plain f32 SMEM
buffer. Three pieces of every tile fill the SMEM at key dim 64 with one pipeline stage and
vb 64; key dim 128 takes narrower value blocks.

float32 at key dim 256 (the K, T layout, `_state_walk` / `_reverse_walk`): W, Qg and Kd in 3
pieces each are 288 KiB of [64, 256] tiles, more than the SMEM. W = T diag(bg) K and
Kd = diag(dec) K (bg = beta gamma, dec = Gam_last,: with the resets folded in: row scalings of
K), so the kernel takes K and T (3 pieces each: 120 KiB) and the two row vectors, and scales
the float32 accumulators in registers before their split into pieces (same precision):

    u = U~ - T (diag(bg) (K S))        S' = gl S + K^T (diag(dec) u)

As in fla's Hopper kernels, this forward computes only the chunk start states (and the final
one); o = Qg S + P (U~ - W S) is then batched XLA over all chunks (`_Chunked.output`). vb 32
forward, 16 reverse scan, one stage.

The restrictions of GPU interpret mode in JAX 0.12.0.1 (SMEM-only WGMMA operands, no
`run_state` accumulator initialised from registers, no predicated pipeline outputs) are
handled as in chunked_linear_attention/mosaic_gpu.py. Not here: key dims above 256, chunks
longer than 64.

The backward (`reverse_scan`, below) is the same split: xla.delta_rule_backward does the
batched work and hands its reverse scan over chunks (dS -> dU -> dS) to a kernel of the same
shape as this one.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _chunks, _dispatch
from pallas_kernels.delta_rule import xla as _xla

F32 = jnp.float32
ROWS = 64          # chunk rows: the WGMMA tile's M
# Value columns per program, widest first: S's value columns evolve independently, so a block
# of them is a program; the key dim cannot be split (u = U~ - W S sums over every key row).
# A 16-bit [.., vb] operand tile has a vb * 2-byte swizzle (128, 64 or 32 bytes).
BLOCKS_V = (64, 32, 16)
MAX_KEY_DIM = 256
# S [Kd, vb] float32 lives in registers next to a fresh accumulator of the same size: at
# 128 x 64 it is 64 registers a thread (Kd 128 bf16 already reaches 255 with it).
MAX_STATE_ELEMS = 128 * 64
# Shared memory a block may use on the H100 / H200 (opt-in), and what the kernel takes beyond
# the tiles `_smem_bytes` counts (barriers, alignment: < 1 KiB in the compiled variants).
SMEM_BYTES = 232_448
_SMEM_SLACK = 1024
_ALIGN = 1024
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
GL_WIDTH = 16


def available() -> bool:
    """Whether the installed JAX has Pallas Mosaic GPU as this kernel is written for it."""
    return _dispatch.mosaic_gpu_available()


def interpret_params():
    return _dispatch.gpu_interpret_params()


def _operands(dtype):
    """(the 16-bit dtype the tensor cores take, pieces per float32 operand): a 16-bit input's
    own dtype with head + remainder (~16 bits of mantissa), or bf16 in 3 pieces for float32
    inputs (24 bits: float32's)."""
    return (jnp.bfloat16, 3) if dtype == F32 else (dtype, 2)


def _counts(dtype, gated):
    """(16-bit dtype, pieces of W / S / u, pieces of Qg and P, pieces of Kd). Qg and P reach
    only o: one 16-bit operand where o is rounded to 16 bits. Kd (k scaled by in-chunk decays)
    is exact in k's dtype when nothing decays it and k is 16-bit."""
    dt, pieces = _operands(dtype)
    n_qp = 1 if pieces == 2 else pieces
    n_kd = 1 if not gated and pieces == 2 else pieces
    return dt, pieces, n_qp, n_kd


def _smem_bytes(kernel, kd, vb, stages, dtype, gated, factored=False):
    """Shared memory of the forward ("fwd") or reverse-scan ("bwd") kernel at vb value columns
    per program: the pipelined tiles per stage (gl's counted whether or not it comes) and the
    scratch (f32 output buffers, S / u or dS / dU pieces). `factored`: the K, T layout (K and
    T in pieces, the two row vectors; no o in the forward)."""
    _, pieces, n_qp, n_kd = _counts(dtype, gated)
    c = ROWS
    if factored:
        # bg, dec and gl are tiny, but each pipelined buffer starts 1 KiB aligned (the compiled
        # kernels' SMEM matches this count to the byte).
        stage = pieces * c * (kd + c) * 2 + c * vb * 4 + 3 * _ALIGN - GL_WIDTH * 4
        scratch = kd * vb * 4
        if kernel == "bwd":
            stage += kd * vb * 4
            scratch += c * vb * 4
    elif kernel == "fwd":
        stage = (pieces + n_qp + n_kd) * c * kd * 2 + n_qp * c * c * 2 + c * vb * 4
        scratch = c * vb * (4 if dtype == F32 else 2) + kd * vb * 4
    else:
        stage = (pieces + n_kd) * c * kd * 2 + (c + kd) * vb * 4
        scratch = (kd + c) * vb * 4
    return stages * (stage + GL_WIDTH * 4) + scratch + pieces * (kd + c) * vb * 2


def _plan(kernel, kd, dtype, gated):
    """(value columns per program, pipeline stages, factored): the widest block whose state
    fits the registers (MAX_STATE_ELEMS) and whose tiles fit the SMEM, with 2 chunks in flight
    where they fit, else 1; in the W, Kd layout where any block fits (every 16-bit call, float32
    up to key dim 128), else in the K, T one (float32 key dim 256). None if nothing fits."""
    for factored in (False, True):
        for vb in BLOCKS_V:
            if kd * vb > MAX_STATE_ELEMS:
                continue
            for stages in (2, 1):
                need = _smem_bytes(kernel, kd, vb, stages, dtype, gated, factored)
                if need + _SMEM_SLACK <= SMEM_BYTES:
                    return vb, stages, factored
    return None


def supports(q, k, v, h0, chunk_size) -> bool:
    """Whether this kernel computes the call (else the op runs the Triton kernel): both the
    forward and the reverse scan must fit, planned for a gated call (the larger one), since
    the op's backward follows this predicate whatever the gate."""
    chunk = _chunks.effective_chunk(q.shape[1], chunk_size)
    if not (available() and chunk <= ROWS and h0.dtype == F32
            and q.dtype == k.dtype == v.dtype and any(k.dtype == d for d in DTYPES)
            and q.shape[-1] <= MAX_KEY_DIM):
        return False
    kd = _chunks.round_up(q.shape[-1], 64)
    return all(_plan(kernel, kd, k.dtype, True) is not None for kernel in ("fwd", "bwd"))


def _tiling(plgpu, width):
    """The SMEM layout WGMMA reads a 16-bit operand of `width` columns from: tiles of 8 rows x
    width (<= 64) elements, a width * 2-byte swizzle."""
    width = min(width, 64)
    return plgpu.TilingTransform((8, width)), plgpu.SwizzleTransform(width * 2)


_split = _chunks.split_16bit


def _load_state(plgpu, src, shape):
    """A float32 [Kd, vb] HBM tile (h0, dS_final) into registers, WGMMA layout."""
    def body(smem, bar):
        plgpu.copy_gmem_to_smem(src, smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        return plgpu.load(smem, layout=plgpu.Layout.WGMMA)

    return pl.run_scoped(body, plgpu.SMEM(shape, F32), plgpu.Barrier(num_barriers=1))


def _store_state(plgpu, x, dst):
    """x [Kd, vb] float32 (the final state, dh0) out to its HBM tile by TMA."""
    def body(smem):
        smem[...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, dst)
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(body, plgpu.SMEM(x.shape, F32))


def _walk_chunks(plgpu, chunk_body, scratch, *, n, in_specs, ins, stages, init, final):
    """chunk_body(scratch, idx, *tiles) -> carry over the n chunks through emit_pipeline from
    `init`, with the SMEM buffers `scratch` scoped around the walk; the last carry (a [Kd, vb]
    float32 state) goes to `final` once the chunks' output copies have read their buffers."""
    def walk(*bufs):
        last = plgpu.emit_pipeline(
            functools.partial(chunk_body, bufs), grid=(n,), in_specs=in_specs,
            max_concurrent_steps=stages, init_carry=init)(*ins)
        plgpu.wait_smem_to_gmem(0)      # before the output buffers are released
        return last

    _store_state(plgpu, pl.run_scoped(walk, *scratch), final)


def _piece_buffers(plgpu, rows, vb, dt, pieces, tf16):
    """SMEM for the 16-bit pieces of a [rows, vb] WGMMA operand (S, u, dS, dU)."""
    return [plgpu.SMEM((rows, vb), dt, transforms=tf16)] * pieces


def _launch(plgpu, kernel, out_type, *, bh, vd, vb, interpret):
    """`kernel` on the grid of (batch * head, block of vb value columns) programs."""
    return plgpu.kernel(kernel, out_type=out_type, grid=(bh, vd // vb), grid_names=("bh", "v"),
                        interpret=interpret if interpret is not None else False)


def _rows(plgpu, ref, shape):
    """A [64] float32 row vector from SMEM broadcast along the WGMMA rows of a [64, vb] tile."""
    x = plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))
    return jax.lax.broadcast_in_dim(x, shape, [0])


def _split_to(x, refs, dt):
    """`_split` inside the kernel, each piece stored to its SMEM ref."""
    for n, ref in enumerate(refs):
        head = x.astype(dt)
        ref[...] = head
        if n + 1 < len(refs):
            x = x - head.astype(F32)


def _products(plgpu, acc, lhs, rhs, pieces, transpose=False):
    """acc += (sum lhs) @ (sum rhs) over the piece pairs whose order is below `pieces` (the
    dropped pairs are below float32's, or the 16-bit remainder's, rounding)."""
    for i, a in enumerate(lhs):
        for j, b in enumerate(rhs):
            if i + j < pieces:
                plgpu.wgmma(acc, a.T if transpose else a, b)


def _product(plgpu, shape, *operands, **kw):
    """`_products` into a fresh float32 WGMMA accumulator of `shape`, its value."""
    def body(acc):
        _products(plgpu, acc, *operands, **kw)
        return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, F32))


def forward(q, k, v, beta, g, h0, reset, *, scale, chunk_size, gated, segmented,
            interpret=None):
    """`xla.delta_rule_forward` on Mosaic GPU: (o [B,T,H,V] in v's dtype, final state [B,H,K,V]
    float32, the state entering every chunk [B,H,N,K,V] float32). Only calls in `supports`."""
    if not supports(q, k, v, h0, chunk_size):
        raise ValueError("delta_rule: the Mosaic GPU kernel takes q, k, v of one dtype (16-bit "
                         f"or float32; key_dim <= {MAX_KEY_DIM}), a float32 "
                         f"initial state and chunks <= {ROWS}; got q {q.dtype} {q.shape}, "
                         f"v {v.dtype}, chunk_size {chunk_size}")
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    chunk = _chunks.effective_chunk(length, chunk_size)
    dt, pieces, n_qp, n_kd = _counts(k.dtype, gated)
    # XLA's GPU float32 matmuls may run in TF32: the state-independent work keeps float32.
    with jax.default_matmul_precision("highest"):
        ch = _xla._Chunked(q, k, v, beta, g, reset, scale=scale, chunk=chunk, gated=gated,
                           segmented=segmented)
        (u_t, w, kdec, gl), n = ch.chunk_inputs()           # chunk major [N, B, H, C, ...]
        qg, p = ch.qg, ch.p                                   # [B, H, N, C, ...]
    kd = _chunks.round_up(key_dim, 64)
    vb, stages, factored = _plan("fwd", kd, k.dtype, gated)
    vd = _chunks.round_up(value_dim, vb)
    bh = batch * heads
    if factored:
        final, states = _state_walk(ch, h0, kd=kd, vd=vd, vb=vb, stages=stages, dt=dt,
                                    pieces=pieces, decays=gated or segmented,
                                    interpret=interpret, plgpu=plgpu)
        # o is parallel over chunks once their start states are known: batched XLA.
        with jax.default_matmul_precision("highest"):
            o = ch.output(states, ch.pseudo_values(states))
        return _chunks.from_chunks(o, length).astype(v.dtype), final, states

    def tiles(x, width, chunk_major=False):
        """[.., C, D] per chunk -> [B*H, N*64, width]: each chunk zero padded to 64 rows."""
        if chunk_major:
            x = jnp.moveaxis(x, 0, 2)
        x = jnp.pad(x, [(0, 0)] * 3 + [(0, ROWS - chunk), (0, width - x.shape[-1])])
        return x.reshape(bh, n * ROWS, width)

    args = (_split(tiles(w, kd, True), dt, pieces) + _split(tiles(qg, kd), dt, n_qp)
            + _split(tiles(p, ROWS), dt, n_qp) + _split(tiles(kdec, kd, True), dt, n_kd))
    args.append(tiles(u_t, vd, True).astype(F32))
    decays = gated or segmented
    if decays:
        # The chunk's decay of S, repeated to GL_WIDTH: a TMA box is at least 16 bytes.
        gl = jnp.moveaxis(gl, 0, 2).reshape(bh, n, 1).astype(F32)
        args.append(jnp.broadcast_to(gl, (bh, n, GL_WIDTH)).reshape(bh, n * GL_WIDTH))
    h0p = jnp.pad(h0.astype(F32), [(0, 0), (0, 0), (0, kd - key_dim), (0, vd - value_dim)])
    args.append(h0p.reshape(bh, kd, vd))
    o, final, states = _call(args, kd=kd, vd=vd, vb=vb, stages=stages, n=n, dt=dt,
                             out_dt=v.dtype, pieces=pieces, n_qp=n_qp, n_kd=n_kd, decays=decays,
                             interpret=interpret, plgpu=plgpu)
    o = o.reshape(batch, heads, n, ROWS, vd)[:, :, :, :chunk, :value_dim]
    o = _chunks.from_chunks(o, length)
    final = final[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    states = states.reshape(batch, heads, n, kd, vd)[..., :key_dim, :value_dim]
    return o, final, states


def _call(args, *, kd, vd, vb, stages, n, dt, out_dt, pieces, n_qp, n_kd, decays, interpret,
          plgpu):
    bh = args[0].shape[0]
    c = ROWS
    # What WGMMA reads from SMEM. Mosaic GPU asks both operands of a WGMMA for one swizzle, and
    # the [.., vb] right-hand sides (S, u) allow vb * 2 bytes: every 16-bit tile takes it.
    tf16 = _tiling(plgpu, vb)
    n_in = len(args)
    # Where each operand's pieces sit in the tiles a chunk step gets.
    counts = (pieces, n_qp, n_qp, n_kd)
    bounds = [sum(counts[:m]) for m in range(5)]
    n_tiles = bounds[-1]

    def delta_rule_fwd_kernel(*refs):
        in_refs, (o_ref, fin_ref, st_ref) = refs[:n_in], refs[n_in:n_in + 3]
        h0_ref = in_refs[-1]
        i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("v")
        cols = pl.ds(j * vb, vb)

        s0 = _load_state(plgpu, h0_ref.at[i, :, cols], (kd, vb))

        def chunk_body(scratch, idx, *tiles):
            o_s, st_s = scratch[:2]
            s_p, u_p = scratch[2:2 + pieces], scratch[2 + pieces:]
            tiles = list(tiles)
            s = tiles.pop()
            w_p, qg_p, p_p, kd_p = (tiles[bounds[m]:bounds[m + 1]] for m in range(4))
            ut_s = tiles[n_tiles]
            gl = tiles[n_tiles + 1][0] if decays else None
            t = idx[0]
            _split_to(s, s_p, dt)
            plgpu.commit_smem()

            u = plgpu.load(ut_s, layout=plgpu.Layout.WGMMA) - _product(
                plgpu, (c, vb), w_p, s_p, pieces)
            # Through SMEM, not as a register operand: GPU interpret mode takes only SMEM refs
            # as WGMMA operands (JAX 0.12.0.1).
            _split_to(u, u_p, dt)
            plgpu.commit_smem()

            def out(acc):
                _products(plgpu, acc, qg_p, s_p, pieces)
                _products(plgpu, acc, p_p, u_p, pieces)
                return acc[...]

            o = pl.run_scoped(out, plgpu.ACC((c, vb), F32))
            # The outputs leave by TMA from one buffer each, written once the previous chunk's
            # copies have read it (GPU interpret mode does not model emit_pipeline's
            # predicated output copies).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_s[...] = o.astype(o_s.dtype)
            st_s[...] = s
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[i, pl.ds(t * c, c), cols])
            plgpu.copy_smem_to_gmem(st_s, st_ref.at[i, pl.ds(t * kd, kd), cols])

            # A fresh accumulator plus the (decayed) state rather than one initialised with it:
            # GPU interpret mode has no rule for the discharged WGMMA `run_state` produces.
            if decays:
                s = s * gl
            return s + _product(plgpu, (kd, vb), kd_p, u_p, pieces, transpose=True)

        seq = lambda w: plgpu.BlockSpec((c, w), lambda t: (t, 0), transforms=tf16)
        widths = [kd] * pieces + [kd] * n_qp + [c] * n_qp + [kd] * n_kd
        in_specs = [seq(w) for w in widths]
        ins = [r.at[i] for r in in_refs[:n_tiles]]
        in_specs.append(plgpu.BlockSpec((c, vb), lambda t: (t, 0)))
        ins.append(in_refs[n_tiles].at[i, :, cols])
        if decays:
            in_specs.append(plgpu.BlockSpec((GL_WIDTH,), lambda t: (t,)))
            ins.append(in_refs[n_tiles + 1].at[i])

        # o's buffer: WGMMA-tiled 16-bit, or plain float32 (TMA copies it out either way).
        o_buf = (plgpu.SMEM((c, vb), F32) if out_dt == F32
                 else plgpu.SMEM((c, vb), out_dt, transforms=tf16))
        scratch = [o_buf, plgpu.SMEM((kd, vb), F32)]
        scratch += _piece_buffers(plgpu, kd, vb, dt, pieces, tf16)
        scratch += _piece_buffers(plgpu, c, vb, dt, pieces, tf16)
        _walk_chunks(plgpu, chunk_body, scratch, n=n, in_specs=in_specs, ins=ins, stages=stages,
                     init=s0, final=fin_ref.at[i, :, cols])

    out_type = (jax.ShapeDtypeStruct((bh, n * c, vd), out_dt),
                jax.ShapeDtypeStruct((bh, kd, vd), F32),
                jax.ShapeDtypeStruct((bh, n * kd, vd), F32))
    call = _launch(plgpu, delta_rule_fwd_kernel, out_type, bh=bh, vd=vd, vb=vb, interpret=interpret)
    return call(*args)


# ---------------------------------------------------------------------------------------------
# The K, T layout (float32 key dim 256, where W, Qg, Kd in 3 pieces each do not fit the SMEM):
# W = T diag(bg) K and Kd = diag(dec) K, so only K's pieces are [64, Kd] tiles, T [64, 64]:
#
#     forward:  u = U~ - T (diag(bg) (K S))       S' = gl S + K^T (diag(dec) u)
#     reverse:  dU = P^T dO + diag(dec) (K dS')   dS = Qg^T dO + gl dS' - K^T (diag(bg) (T^T dU))
#
# The row scalings act on the float32 accumulators before their split into pieces, so every
# product keeps the 6-piece precision. The forward writes only the chunk start states (and the
# final one); o is `_Chunked.output`, batched over chunks in XLA.


def _chunk_tiles(x, width, rows=ROWS):
    """[B, H, N, R, D] -> [B*H, N*rows, width] float32, each chunk's tile zero padded."""
    b, h, n = x.shape[:3]
    x = jnp.pad(x.astype(F32), [(0, 0)] * 3 + [(0, rows - x.shape[3]), (0, width - x.shape[-1])])
    return x.reshape(b * h, n * rows, width)


def _row_tiles(x):
    """[B, H, N, C] -> [B*H, N*64] float32: a row vector per chunk, zero padded."""
    b, h, n, c = x.shape
    return jnp.pad(x.astype(F32), [(0, 0)] * 3 + [(0, ROWS - c)]).reshape(b * h, n * ROWS)


def _gl_tiles(gl):
    """[B, H, N] -> [B*H, N*GL_WIDTH]: the chunk's decay of S repeated (a TMA box is at least
    16 bytes)."""
    b, h, n = gl.shape
    gl = jnp.broadcast_to(gl.reshape(b * h, n, 1).astype(F32), (b * h, n, GL_WIDTH))
    return gl.reshape(b * h, n * GL_WIDTH)


def _factored_inputs(ch, seq, state, *, kd, vd, dt, pieces, decays):
    """The K, T kernels' inputs: K and T in pieces, the [64, vb] and [Kd, vb] float32 tiles in
    `seq` / `state` (U~; P^T dO, Qg^T dO), bg (and dec, gl where something decays)."""
    args = _split(_chunk_tiles(ch.k, kd), dt, pieces) + _split(_chunk_tiles(ch.t, ROWS), dt, pieces)
    args += [_chunk_tiles(x, vd) for x in seq] + [_chunk_tiles(x, vd, kd) for x in state]
    args.append(_row_tiles(ch.bg))
    if decays:
        args += [_row_tiles(ch.dlast), _gl_tiles(ch.gl)]
    return args


def _factored_specs(plgpu, in_refs, i, cols, *, kd, vb, n_seq, n_state, decays, index, tf16):
    """BlockSpecs and refs of `_factored_inputs` for program (i, cols); `index` maps the
    pipeline step to the chunk."""
    c = ROWS
    n_pieces = len(in_refs) - n_seq - n_state - (3 if decays else 1)
    pieces = n_pieces // 2
    tile = lambda w: plgpu.BlockSpec((c, w), lambda t: (index(t), 0), transforms=tf16)
    specs = [tile(kd)] * pieces + [tile(c)] * pieces
    ins = [r.at[i] for r in in_refs[:n_pieces]]
    specs += [plgpu.BlockSpec((c, vb), lambda t: (index(t), 0))] * n_seq
    specs += [plgpu.BlockSpec((kd, vb), lambda t: (index(t), 0))] * n_state
    ins += [r.at[i, :, cols] for r in in_refs[n_pieces:n_pieces + n_seq + n_state]]
    rest = in_refs[n_pieces + n_seq + n_state:]
    specs += [plgpu.BlockSpec((c,), lambda t: (index(t),))] * (2 if decays else 1)
    if decays:
        specs.append(plgpu.BlockSpec((GL_WIDTH,), lambda t: (index(t),)))
    ins += [r.at[i] for r in rest]
    return specs, ins


def _state_walk(ch, h0, *, kd, vd, vb, stages, dt, pieces, decays, interpret, plgpu):
    """The forward's state recurrence in the K, T layout: (final state [B,H,K,V], the state
    entering every chunk [B,H,N,K,V]), float32."""
    batch, heads, n, chunk, key_dim = ch.k.shape
    value_dim = h0.shape[-1]
    bh = batch * heads
    c = ROWS
    args = _factored_inputs(ch, [ch.u_tilde], [], kd=kd, vd=vd, dt=dt, pieces=pieces,
                            decays=decays)
    h0p = jnp.pad(h0.astype(F32), [(0, 0), (0, 0), (0, kd - key_dim), (0, vd - value_dim)])
    args.append(h0p.reshape(bh, kd, vd))
    n_in = len(args)
    tf16 = _tiling(plgpu, vb)

    def delta_rule_fwd_factored_kernel(*refs):
        in_refs, (fin_ref, st_ref) = refs[:n_in - 1], refs[n_in:n_in + 2]
        i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("v")
        cols = pl.ds(j * vb, vb)
        s0 = _load_state(plgpu, refs[n_in - 1].at[i, :, cols], (kd, vb))

        def chunk_body(scratch, idx, *tiles):
            st_s, s_p, x_p = scratch[0], scratch[1:1 + pieces], scratch[1 + pieces:]
            *tiles, s = tiles
            k_p, t_p = tiles[:pieces], tiles[pieces:2 * pieces]
            # Every float32 tile is read first (as in the reverse scan below).
            u_t = plgpu.load(tiles[2 * pieces], layout=plgpu.Layout.WGMMA)
            bg = _rows(plgpu, tiles[2 * pieces + 1], (c, vb))
            if decays:
                dec = _rows(plgpu, tiles[2 * pieces + 2], (c, vb))
                gl = tiles[2 * pieces + 3][0]
            _split_to(s, s_p, dt)
            plgpu.commit_smem()
            x = bg * _product(plgpu, (c, vb), k_p, s_p, pieces)
            # Through SMEM, not as a register operand: GPU interpret mode takes only SMEM refs
            # as WGMMA operands (JAX 0.12.0.1). x_p is free again once each product returns.
            _split_to(x, x_p, dt)
            plgpu.commit_smem()
            u = u_t - _product(plgpu, (c, vb), t_p, x_p, pieces)
            _split_to(dec * u if decays else u, x_p, dt)
            # The start state leaves by TMA from one buffer, rewritten once the previous
            # chunk's copy has read it.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            st_s[...] = s
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_s, st_ref.at[i, pl.ds(idx[0] * kd, kd), cols])
            return ((s * gl) if decays else s) + _product(plgpu, (kd, vb), k_p, x_p, pieces,
                                                          transpose=True)

        in_specs, ins = _factored_specs(plgpu, in_refs, i, cols, kd=kd, vb=vb, n_seq=1,
                                        n_state=0, decays=decays, index=lambda t: t, tf16=tf16)

        scratch = [plgpu.SMEM((kd, vb), F32)]
        scratch += _piece_buffers(plgpu, kd, vb, dt, pieces, tf16)
        scratch += _piece_buffers(plgpu, c, vb, dt, pieces, tf16)
        _walk_chunks(plgpu, chunk_body, scratch, n=n, in_specs=in_specs, ins=ins, stages=stages,
                     init=s0, final=fin_ref.at[i, :, cols])

    out_type = (jax.ShapeDtypeStruct((bh, kd, vd), F32),
                jax.ShapeDtypeStruct((bh, n * kd, vd), F32))
    call = _launch(plgpu, delta_rule_fwd_factored_kernel, out_type, bh=bh, vd=vd, vb=vb, interpret=interpret)
    final, states = call(*args)
    final = final[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    states = states.reshape(batch, heads, n, kd, vd)[..., :key_dim, :value_dim]
    return final, states


def _reverse_walk(ch, pt_do, qgt_do, ds_final, *, kd, vd, vb, stages, dt, pieces, decays,
                  interpret, plgpu):
    """`reverse_scan` in the K, T layout: (dS leaving every chunk [B,H,N,K,V], dU
    [B,H,N,C,V], dh0)."""
    batch, heads, n, chunk, value_dim = pt_do.shape
    key_dim = qgt_do.shape[-2]
    bh = batch * heads
    c = ROWS
    args = _factored_inputs(ch, [pt_do], [qgt_do], kd=kd, vd=vd, dt=dt, pieces=pieces,
                            decays=decays)
    dsf = jnp.pad(ds_final.astype(F32), [(0, 0), (0, 0), (0, kd - key_dim), (0, vd - value_dim)])
    args.append(dsf.reshape(bh, kd, vd))
    n_in = len(args)
    tf16 = _tiling(plgpu, vb)

    def delta_rule_bwd_factored_kernel(*refs):
        in_refs, (dsn_ref, du_ref, dh0_ref) = refs[:n_in - 1], refs[n_in:n_in + 3]
        i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("v")
        cols = pl.ds(j * vb, vb)
        ds0 = _load_state(plgpu, refs[n_in - 1].at[i, :, cols], (kd, vb))

        def chunk_body(scratch, idx, *tiles):
            dsn_s, du_s = scratch[:2]
            ds_p, y_p = scratch[2:2 + pieces], scratch[2 + pieces:]
            *tiles, ds = tiles
            k_p, t_p = tiles[:pieces], tiles[pieces:2 * pieces]
            t = n - 1 - idx[0]
            # Every float32 tile is read first: with one stage its buffer is the next TMA
            # load's target once the body returns (a race in GPU interpret mode otherwise).
            pt_do_t = plgpu.load(tiles[2 * pieces], layout=plgpu.Layout.WGMMA)
            base = plgpu.load(tiles[2 * pieces + 1], layout=plgpu.Layout.WGMMA)
            bg = _rows(plgpu, tiles[2 * pieces + 2], (c, vb))
            if decays:
                dec = _rows(plgpu, tiles[2 * pieces + 3], (c, vb))
                base = base + ds * tiles[2 * pieces + 4][0]
            else:
                base = base + ds
            _split_to(ds, ds_p, dt)
            plgpu.commit_smem()
            x = _product(plgpu, (c, vb), k_p, ds_p, pieces)
            du = pt_do_t + (dec * x if decays else x)
            _split_to(du, y_p, dt)
            # The outputs leave by TMA from one buffer each, written once the previous chunk's
            # copies have read it.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            dsn_s[...] = ds
            du_s[...] = du
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dsn_s, dsn_ref.at[i, pl.ds(t * kd, kd), cols])
            plgpu.copy_smem_to_gmem(du_s, du_ref.at[i, pl.ds(t * c, c), cols])
            z = bg * _product(plgpu, (c, vb), t_p, y_p, pieces, transpose=True)
            _split_to(z, y_p, dt)       # y_p is free again: the product above has returned
            plgpu.commit_smem()
            return base - _product(plgpu, (kd, vb), k_p, y_p, pieces, transpose=True)

        in_specs, ins = _factored_specs(plgpu, in_refs, i, cols, kd=kd, vb=vb, n_seq=1,
                                        n_state=1, decays=decays, index=lambda t: n - 1 - t,
                                        tf16=tf16)

        scratch = [plgpu.SMEM((kd, vb), F32), plgpu.SMEM((c, vb), F32)]
        scratch += _piece_buffers(plgpu, kd, vb, dt, pieces, tf16)
        scratch += _piece_buffers(plgpu, c, vb, dt, pieces, tf16)
        _walk_chunks(plgpu, chunk_body, scratch, n=n, in_specs=in_specs, ins=ins, stages=stages,
                     init=ds0, final=dh0_ref.at[i, :, cols])

    out_type = (jax.ShapeDtypeStruct((bh, n * kd, vd), F32),
                jax.ShapeDtypeStruct((bh, n * c, vd), F32),
                jax.ShapeDtypeStruct((bh, kd, vd), F32))
    call = _launch(plgpu, delta_rule_bwd_factored_kernel, out_type, bh=bh, vd=vd, vb=vb, interpret=interpret)
    ds_next, du, dh0 = call(*args)
    ds_next = ds_next.reshape(batch, heads, n, kd, vd)[..., :key_dim, :value_dim]
    du = du.reshape(batch, heads, n, ROWS, vd)[..., :chunk, :value_dim]
    dh0 = dh0[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    return ds_next, du, dh0


# ---------------------------------------------------------------------------------------------
# Backward: xla.delta_rule_backward with its reverse scan over chunks on Mosaic GPU.
#
#     dU = P^T dO + Kd dS_next          [64, vb]   (Kd: head [+ remainder], dS: head + remainder)
#     dS = Qg^T dO + gl dS_next - W^T dU  [Kd, vb]  (W: head + remainder, dU: head + remainder)
#
# Same program grid and precision scheme as the forward: one warpgroup per (batch * head, vb
# value columns; its own `_plan("bwd", ...)`) walking the chunks last to first, dS [Kd, vb]
# float32 in registers; P^T dO and
# Qg^T dO come in float32 (batched XLA einsums), W and Kd as 16-bit tiles. Out go dS_next and
# dU per chunk (float32), in xla.py's layout, and dh0.


def reverse_scan(pt_do, qgt_do, kdec, w, gl, ds_final, *, dtype, split_kd, interpret=None,
                 chunks=None):
    """`xla.reverse_state_scan` on Mosaic GPU (the same arguments and results); `dtype` is the
    inputs' dtype (16-bit, or float32: bf16 pieces), `split_kd` whether Kd is decayed (gated)
    and so not exact in a 16-bit k's dtype. `chunks` (xla.delta_rule_backward's `_Chunked`)
    gives the K, T layout its K, T and row scalings (float32 key dim 256)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, heads, n, chunk, value_dim = pt_do.shape
    key_dim = qgt_do.shape[-2]
    kd = _chunks.round_up(key_dim, 64)
    plan = _plan("bwd", kd, dtype, split_kd) if key_dim <= MAX_KEY_DIM else None
    if chunk > ROWS or plan is None:
        raise ValueError(f"delta_rule: the Mosaic GPU backward takes chunks <= {ROWS} and key_dim "
                         f"<= {MAX_KEY_DIM}; got chunk {chunk}, key_dim "
                         f"{key_dim} ({jnp.dtype(dtype).name})")
    vb, stages, factored = plan
    vd = _chunks.round_up(value_dim, vb)
    bh = batch * heads
    dt, pieces, _, n_kd = _counts(dtype, split_kd)
    if factored:
        if chunks is None:
            raise ValueError("delta_rule: the Mosaic GPU backward at float32 key_dim > 128 takes "
                             "chunks= (xla._Chunked: K, T and the row scalings)")
        return _reverse_walk(chunks, pt_do, qgt_do, ds_final, kd=kd, vd=vd, vb=vb,
                             stages=stages, dt=dt, pieces=pieces, decays=gl is not None,
                             interpret=interpret, plgpu=plgpu)

    def tiles(x, rows, width):
        """[B, H, N, R, D] -> [B*H, N*rows, width], each chunk's tile zero padded."""
        x = jnp.pad(x.astype(F32), [(0, 0)] * 3 + [(0, rows - x.shape[3]),
                                                   (0, width - x.shape[-1])])
        return x.reshape(bh, n * rows, width)

    args = _split(tiles(w, ROWS, kd), dt, pieces) + _split(tiles(kdec, ROWS, kd), dt, n_kd)
    args += [tiles(pt_do, ROWS, vd), tiles(qgt_do, kd, vd)]
    decays = gl is not None
    if decays:
        gl = gl.reshape(bh, n, 1).astype(F32)
        args.append(jnp.broadcast_to(gl, (bh, n, GL_WIDTH)).reshape(bh, n * GL_WIDTH))
    dsf = jnp.pad(ds_final.astype(F32), [(0, 0), (0, 0), (0, kd - key_dim), (0, vd - value_dim)])
    args.append(dsf.reshape(bh, kd, vd))
    ds_next, du, dh0 = _bwd_call(args, kd=kd, vd=vd, vb=vb, stages=stages, n=n, dt=dt,
                                 pieces=pieces, n_kd=n_kd, decays=decays, interpret=interpret,
                                 plgpu=plgpu)
    ds_next = ds_next.reshape(batch, heads, n, kd, vd)[..., :key_dim, :value_dim]
    du = du.reshape(batch, heads, n, ROWS, vd)[..., :chunk, :value_dim]
    dh0 = dh0[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    return ds_next, du, dh0


def _bwd_call(args, *, kd, vd, vb, stages, n, dt, pieces, n_kd, decays, interpret, plgpu):
    bh = args[0].shape[0]
    c = ROWS
    tf16 = _tiling(plgpu, vb)      # one swizzle for both WGMMA operands, as in the forward
    n_in = len(args)
    n_tiles = pieces + n_kd

    def delta_rule_bwd_kernel(*refs):
        in_refs, (dsn_ref, du_ref, dh0_ref) = refs[:n_in], refs[n_in:n_in + 3]
        dsf_ref = in_refs[-1]
        i, j = jax.lax.axis_index("bh"), jax.lax.axis_index("v")
        cols = pl.ds(j * vb, vb)

        ds0 = _load_state(plgpu, dsf_ref.at[i, :, cols], (kd, vb))

        def chunk_body(scratch, idx, *tiles):
            dsn_s, du_s = scratch[:2]
            ds_p, du_p = scratch[2:2 + pieces], scratch[2 + pieces:]
            tiles = list(tiles)
            ds = tiles.pop()
            w_p, kd_p = tiles[:pieces], tiles[pieces:n_tiles]
            ptdo_s, qgtdo_s = tiles[n_tiles:n_tiles + 2]
            gl = tiles[n_tiles + 2][0] if decays else None
            t = n - 1 - idx[0]
            _split_to(ds, ds_p, dt)
            plgpu.commit_smem()

            du = plgpu.load(ptdo_s, layout=plgpu.Layout.WGMMA) + _product(
                plgpu, (c, vb), kd_p, ds_p, pieces)
            # dU meets W^T as an SMEM operand (GPU interpret mode: SMEM-only WGMMA operands).
            _split_to(du, du_p, dt)
            # The outputs leave by TMA from one buffer each, written once the previous chunk's
            # copies have read it.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            dsn_s[...] = ds
            du_s[...] = du
            # Qg^T dO is read before the fence: with one stage its buffer is the next TMA
            # load's target once the body returns (a race in GPU interpret mode otherwise).
            base = plgpu.load(qgtdo_s, layout=plgpu.Layout.WGMMA) + (ds * gl if decays else ds)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dsn_s, dsn_ref.at[i, pl.ds(t * kd, kd), cols])
            plgpu.copy_smem_to_gmem(du_s, du_ref.at[i, pl.ds(t * c, c), cols])
            return base - _product(plgpu, (kd, vb), w_p, du_p, pieces, transpose=True)

        rev = lambda t: (n - 1 - t, 0)
        seq = lambda w: plgpu.BlockSpec((c, w), rev, transforms=tf16)
        in_specs = [seq(kd)] * n_tiles
        ins = [r.at[i] for r in in_refs[:n_tiles]]
        in_specs += [plgpu.BlockSpec((c, vb), rev), plgpu.BlockSpec((kd, vb), rev)]
        ins += [r.at[i, :, cols] for r in in_refs[n_tiles:n_tiles + 2]]
        if decays:
            in_specs.append(plgpu.BlockSpec((GL_WIDTH,), lambda t: (n - 1 - t,)))
            ins.append(in_refs[n_tiles + 2].at[i])

        scratch = [plgpu.SMEM((kd, vb), F32), plgpu.SMEM((c, vb), F32)]
        scratch += _piece_buffers(plgpu, kd, vb, dt, pieces, tf16)
        scratch += _piece_buffers(plgpu, c, vb, dt, pieces, tf16)
        _walk_chunks(plgpu, chunk_body, scratch, n=n, in_specs=in_specs, ins=ins, stages=stages,
                     init=ds0, final=dh0_ref.at[i, :, cols])

    out_type = (jax.ShapeDtypeStruct((bh, n * kd, vd), F32),
                jax.ShapeDtypeStruct((bh, n * c, vd), F32),
                jax.ShapeDtypeStruct((bh, kd, vd), F32))
    call = _launch(plgpu, delta_rule_bwd_kernel, out_type, bh=bh, vd=vd, vb=vb, interpret=interpret)
    return call(*args)
