"""The Hopper (sm_90a) kernels of `chunked_linear_attention` in Pallas on Mosaic GPU: the
forward, and the backward's reverse chunk scan (`state_cotangents`, the end of this file).

One program (one warpgroup, 128 threads) per (batch * head, block of 64 value columns, block
of kb key rows) walks the chunks (64 tokens, WGMMA's M) in order. `plgpu.emit_pipeline`
streams each chunk's input tiles into shared memory by TMA, `stages` chunks in flight.
`_plan` picks (kb, stages) from `_smem_bytes`, the kernel's SMEM arithmetic, within the
232,448 B a block may use: the whole key dim (kb = Kd) where one stage fits, else 128 or 64 key
rows per program. Three modes (`_mode`), one kernel:

    plain  (no gate, no segments)  in: q, k [64, kb], v [64, 64]
    scalar (a gate per head and step, and/or segment_ids)
                                   in: q, k, v, q~, k~ (3 pieces; 1 without a gate),
                                       D [64, 64] f32, gamma [kb] f32
    vector (a gate per key, with or without segments)
                                   in: v, q~, k~ (3 pieces), A [64, 64] f32 (this key
                                       block's part), gamma [kb] f32

    (16-bit tiles with a 128-byte swizzle; float32 inputs: q, k, v, q~, k~ each as 3 bf16
    pieces)
    out (SMEM -> TMA, one buffer each, waited on before reuse): o [64, 64] in v's dtype (float32
        partial sums where the key dim is split) and the state entering the chunk [kb, 64] f32
        (what the backward reads)
    scratch SMEM: S [kb, 64] and the masked scores [64, 64], each in 2 16-bit pieces (head +
        remainder; 3 bf16 pieces with float32 inputs)

All gate and segment arithmetic happens in XLA before the call (`_gate_tiles`, xla.py's chunked
form; every exponent <= 0): with b the within-chunk cumulative log gate,

    q~_i = q_i exp(b_i)    k~_j = k_j exp(b_C - b_j)    gamma = exp(b_C) (0 past a reset)
    D_ij = exp(b_i - b_j) [j <= i, same segment]                     (scalar gates / segments)
    A_ij = sum_d q_id k_jd exp(b_id - b_jd) [j <= i, same segment]   (vector gates: the C x C
                                                                       x Kd part, as in fla)

so the kernel is a chain of WGMMAs and elementwise ops on tiles of known layout: the carried
state S [kb, 64] float32 lives in registers between chunks (WGMMA accumulator layout), and per
chunk, with float32 accumulators,

    A       = (q k^T) * D, tril(q k^T) or the A tile     [64, 64]
    o       = A v + q~ S                 [64, 64]
    S'      = gamma * S + k~^T v         [kb, 64]  (gamma broadcast along WGMMA rows)

each product summed over the `_pairs` of its operands' pieces.

Key blocks. S's rows are independent (S' = gamma S + k~^T v row by row), and o is linear in
the key columns: q k^T, its mask or decay D, A and q~ S all sum over key dims, so the program
of key block b computes o_b = (q_b k_b^T * D) v + q~_b S_b (vector gates: A_b v, A_b summed
over b's key dims in XLA) and XLA adds the o_b (float32). The cost of a split: v and the D tile
are read and A_b v computed once per key block. Gated key dim 256 in bf16 does not fit whole
(scalar: q, k, q~ [64, 256] + k~ in 3 pieces + D per stage, 217 KiB, plus S and the scores in 2
pieces and the two output buffers, 152 KiB): two programs of 128 rows (216.5 KiB each at one
stage: the gated key dim 128 kernel with a float32 o buffer).

Precision. 16-bit inputs: the products' operands are the inputs themselves (exact) or float32
quantities split into 16-bit pieces (the scores and S into head + remainder; k~, whose error
would enter the chunk states, into 3 pieces: float32's 24 bits), so only q and q~ (the query
side of o) are rounded to 16 bits and the chunk states come out at float32 accuracy.
Float32 inputs ("bf16x3", XLA's BF16_BF16_F32_X6): each float32 operand, inputs in XLA and S
and the scores in the kernel, is 3 bf16 pieces x = x_0 + x_1 + x_2 (round to nearest: |x_i| <=
2^-8i |x| roughly, the sum exact to 2^-24 |x|). Of the 9 piece products x_i y_j (order
2^-8(i+j)) the 6 with i + j <= 2 are computed; the dropped ones (x_1 y_2, x_2 y_1, x_2 y_2)
are of order 2^-24 |x y|, float32's own rounding. Fewer pieces would not do: 2 per operand
(16 bits) leave errors of 2^-16 ~ 1.5e-5 relative, above the float32 Triton path's 1e-5 bound
(test_chunked_linear_attention's F32_TOL); q and k need all 3 for the scores, v for both
A v and k~^T v, S and the scores because their errors reach o and the next states directly.
So a float32 product is 6 WGMMAs (24 per chunk, ~5x the bf16 kernel's tensor work) and every
float32 operand 1.5x the bytes of a float32 tile in SMEM: at one program per 64 key rows a
plain call fits 2 stages (229,376 B), scalar / vector ones 1 (221,440 / 172,288 B); with 128
rows even one stage would not fit (plain: 120 KiB of tiles + 120 KiB of S, score and output
buffers). Measured in GPU interpret mode: relative RMSE ~1e-7 against float64 for o, states
and gradients. (Alternative not taken: TF32x3, 3 products of 2 tf32 pieces, but Mosaic's tf32
WGMMA takes only K-major operands: k^T v and A v would need v^T and k~^T laid out by XLA and
S transposed in the kernel.)

Written for GPU interpret mode as well (JAX 0.12.0.1): it takes only SMEM refs as WGMMA
operands (so the scores go through SMEM, not registers), has no rule for WGMMA on an
accumulator initialised from registers (so S' = gamma S + a fresh product), and does not model
the predicated output copies of emit_pipeline (so the outputs are copied out by hand).

Not here (the op runs the Triton kernel for them): key_dim above 256, chunks longer than 64,
k and v of different dtypes. The backward covers the same calls (with the output's cotangent in
the inputs' dtype; float32 do as 3 bf16 pieces): its kernel walks dS back through the chunks
(the whole key dim per program: q~ in 3 pieces and do fit one stage at 256, 184 KiB in
float32), xla.py's per-chunk VJP does the rest.

An earlier version computed the decays inside the kernel (row/column broadcasts of b, iota
masks and exp on the scores); Mosaic GPU's layout inference did not finish on it in 10+
minutes. With the decays as input tiles every gated variant compiles in seconds.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _chunks, _dispatch
from pallas_kernels._chunks import round_up as _round_up
from pallas_kernels.chunked_linear_attention import pallas as _pallas
from pallas_kernels.chunked_linear_attention import xla as _xla

F32 = jnp.float32
_OP = "chunked_linear_attention"
ROWS = 64          # chunk rows: the WGMMA tile's M (a chunk is padded to it)
BLOCK_V = 64       # value columns per program: one 128-byte swizzle row of bf16
MAX_KEY_DIM = 256
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Float32 quantities reach the tensor cores as this many 16-bit pieces (8 bits of mantissa
# each with bf16): 3 carry float32's 24 (`_pairs` says which of their products are kept).
KEY_PIECES = 3
# Shared memory a block may use on the H100 / H200 (opt-in), and what the kernel takes beyond
# its tiles (barriers, alignment: 512 B in the compiled variants, RESULTS.md).
SMEM_BYTES = 232_448
_SMEM_SLACK = 1024
MAX_STAGES = 2


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


def _piece_dtype(dtype):
    """The tensor cores' operand dtype: the inputs' own 16-bit one, bf16 pieces for float32
    (float16's range would lose the small pieces and overflow large inputs)."""
    return jnp.bfloat16 if dtype == F32 else dtype


def _pieces(dtype, gated):
    """How many 16-bit pieces each operand has: q and k (the scores), v, q~ and k~ (with gates
    or segments; plain calls use q and k), and the float32 quantities the kernel splits
    itself (S and the masked scores)."""
    wide = dtype == F32
    n_in = KEY_PIECES if wide else 1
    return dict(q=n_in, k=n_in, v=n_in, qd=n_in,
                kd=KEY_PIECES if (gated or wide) else 1,
                inner=KEY_PIECES if wide else 2)


def _pairs(nx, ny):
    """The products of an nx- and an ny-piece operand that are computed. Piece i of a float32
    x (bf16, round to nearest) is of order 2^-8i |x|, so x_i y_j is of order 2^-8(i+j); the
    pairs with i + j < 3 stay, those of order 2^-24 (float32's own rounding) and below are
    dropped: 6 products for 3 x 3 pieces (XLA's BF16_BF16_F32_X6), 3 for 3 x 1, 2 for 2 x 1."""
    return [(i, j) for i in range(nx) for j in range(ny) if i + j < KEY_PIECES]


def _smem_bytes(mode, kd, kb, stages, dtype, gated):
    """Shared memory of `_call` at key block kb: the pipelined input tiles per stage, the S
    and score pieces, and the o / start-state output buffers."""
    n = _pieces(dtype, gated)
    c, vb = ROWS, BLOCK_V
    stage = n["v"] * c * vb * 2
    if mode != "vector":
        stage += (n["q"] + n["k"]) * c * kb * 2
    if mode != "plain":
        stage += (n["qd"] + n["kd"]) * c * kb * 2 + c * c * 4 + kb * 4
    o_bytes = 4 if (dtype == F32 or kb < kd) else 2
    scratch = c * vb * o_bytes + kb * vb * 4 + n["inner"] * (kb * vb + c * c) * 2
    return stages * stage + scratch


def _plan(mode, kd, dtype, gated):
    """(key block, stages): the whole key dim in one program where it fits, else 128 or 64
    key rows per program (S's rows are independent; o's partial sums over key blocks are
    added in XLA), with up to MAX_STAGES chunks in flight. None if nothing fits."""
    for kb in [kd] + [b for b in (128, 64) if b < kd and kd % b == 0]:
        for stages in range(MAX_STAGES, 0, -1):
            if _smem_bytes(mode, kd, kb, stages, dtype, gated) + _SMEM_SLACK <= SMEM_BYTES:
                return kb, stages
    return None


def supports(q, k, v, g, runs, chunk_size=None) -> bool:
    """Whether this kernel computes the call (else the op runs the Triton kernel). Chunks
    longer than 64 would need several row tiles per product (the op's default is 64); the
    chunks must be xla.py's, whose start states the backward reads."""
    mode = _mode(g, runs)
    chunk = _xla.chunk_geometry(q.shape[1], chunk_size, mode == "vector")[0]
    if not (available() and chunk <= ROWS and k.dtype == v.dtype
            and any(k.dtype == d for d in DTYPES) and q.shape[-1] <= MAX_KEY_DIM):
        return False
    kd = _round_up(q.shape[-1], 64)
    return _plan(mode, kd, k.dtype, g is not None) is not None


_split = _chunks.split_16bit


def _square_tiles(x, geo):
    """Per-chunk [B, H, N, C, C] -> [B*H, N*ROWS, ROWS], zero padded (the padded rows and
    columns are the padded tokens: no score reaches or leaves them)."""
    b, h, n, c, _ = x.shape
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, ROWS - c)] * 2)
    return x.reshape(b * h, n * ROWS, ROWS)


@_xla._broadcasting
def _gate_tiles(q, k, g, runs, geo, chunk, sub, padded, mode, dt, query_pieces=1, key_block=None):
    """The gate and segment arithmetic, in XLA (xla.py's chunked form), as the kernel's tiles:

        q~_i = q_i exp(b_i)       k~_j = k_j exp(b_C - b_j)       gamma = exp(b_C)
        D_ij = exp(b_i - b_j) [j <= i, same segment]     (scalar gates; segments alone: 0/1)
        A_ij = sum_d q_id k_jd exp(b_id - b_jd) [j <= i, same segment]   (vector gates)

    with q~ zero for tokens after a segment start in the chunk (the carried state does not
    reach them), k~ zero for tokens before the chunk's last start, gamma zero past a start.
    All exponents are <= 0. Returns the extra kernel inputs after q, k, v: [q~ pieces...,
    k~ pieces..., D [1, B*H, N*ROWS, ROWS] or A [key blocks, B*H, N*ROWS, ROWS] (the sum over
    d split by `key_block`), gamma [B*H, N*Kd]], q~ as `query_pieces` 16-bit pieces."""
    chunked = lambda x: _xla.to_chunks(x, chunk, padded)      # [B, H, N, C, D]
    qc, kc = chunked(q), chunked(k).astype(F32)
    batch, heads, n = qc.shape[:3]
    key_dim = q.shape[-1]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    same, from_start, to_end, keep = causal, None, None, None
    if runs is not None:
        masks = {name: jnp.moveaxis(m, 0, 2)                  # [N, B, 1, ...] -> [B, 1, N, ...]
                 for name, m in _xla.segment_masks(runs, chunk).items()}
        same = causal & masks["same"]
        from_start, to_end, keep = masks["from_start"], masks["to_end"], masks["keep"]
    if g is None:
        qd, kd, gamma = qc, kc, jnp.ones((batch, heads, n, 1), F32)
        scores = [jnp.broadcast_to(same, (batch, heads, n, chunk, chunk)).astype(F32)]
    else:
        b, to_end_gate, total = _xla._cumulative(chunked(g).astype(F32))
        qd, kd, gamma = qc * jnp.exp(b), kc * jnp.exp(to_end_gate), jnp.exp(total)
        if mode == "vector":
            # The sum over d per key block: each program's partial output uses its own.
            kb = key_block or geo.kd
            blocks = [slice(start, start + kb) for start in range(0, geo.kd, kb)]
            scores = [jnp.where(same, _xla._vector_gate_scores(
                qc[..., s], kc[..., s], b[..., s], sub), 0.0) for s in blocks]
        else:
            bs = b[..., 0]
            scores = _xla._pair_decay(bs[..., :, None] - bs[..., None, :], same,
                                      jnp.eye(chunk, dtype=bool))
            scores = [jnp.broadcast_to(scores, (batch, heads, n, chunk, chunk))]
    if runs is not None:
        qd = jnp.where(from_start[..., None], qd, 0.0)
        kd = jnp.where(to_end[..., None], kd, 0.0)
        gamma = jnp.where(keep[..., None], gamma, 0.0)
    # Exact in 16 bits without a gate (masked 16-bit inputs): one piece is the whole key.
    pieces = KEY_PIECES if (g is not None or dt != k.dtype) else 1
    gamma = jnp.broadcast_to(gamma, (batch, heads, n, key_dim))
    gamma = jnp.pad(gamma, [(0, 0)] * 3 + [(0, geo.kd - key_dim)])
    tiles = _split(_pallas._to_tiles(qd, geo, geo.kd), dt, query_pieces)
    tiles += _split(_pallas._to_tiles(kd, geo, geo.kd), dt, pieces)
    tiles += [jnp.stack([_square_tiles(x, geo) for x in scores]),
              gamma.reshape(batch * heads, n * geo.kd)]
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
    kb, stages = _plan(mode, kd, k.dtype, g is not None)
    bh = batch * heads
    dt = _piece_dtype(k.dtype)
    counts = _pieces(k.dtype, g is not None)
    chunked = lambda x: _xla.to_chunks(x, chunk, padded)
    tiles = lambda x, w: _pallas._to_tiles(chunked(x).astype(F32), geo, w)
    groups = []          # (name, [16-bit pieces or one float32 array]), the kernel's inputs
    if mode != "vector":     # vector gates: the scores arrive whole, q and k are not needed
        groups += [("q", _split(tiles(q, kd), dt, counts["q"])),
                   ("k", _split(tiles(k, kd), dt, counts["k"]))]
    groups.append(("v", _split(tiles(v, vd), dt, counts["v"])))
    if mode != "plain":
        *qk, scores, gamma = _gate_tiles(q, k, g, runs, geo, chunk, sub, padded, mode, dt,
                                         query_pieces=counts["qd"], key_block=kb)
        # gamma per key block: [B*H, key blocks, N*kb], so each program streams its rows.
        gamma = gamma.reshape(bh, n, kd // kb, kb).transpose(0, 2, 1, 3)
        groups += [("qd", qk[:counts["qd"]]), ("kd", qk[counts["qd"]:]),
                   ("scores", [scores]), ("gamma", [gamma.reshape(bh, kd // kb, n * kb)])]
    o, final, states = _call(groups, _pallas._state_in(h0, geo), geo, mode, kb, stages, dt,
                             counts["inner"], v.dtype, interpret, plgpu)
    # Partial outputs of the key blocks (one without a split) add up to o.
    o = _pallas._from_tiles(jnp.sum(o, axis=0, dtype=F32) if o.shape[0] > 1 else o[0], geo,
                            (batch, length, heads, value_dim)).astype(v.dtype)
    final = final[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    states = states.reshape(bh, n, kd, vd)[:, :, :key_dim, :value_dim]
    return o, final, states.reshape(batch, heads, n, key_dim, value_dim)


def _call(groups, h0, geo, mode, kb, stages, dt, inner, out_dtype, interpret, plgpu):
    bh, kd, vd, n = h0.shape[0], geo.kd, geo.vd, geo.n
    c, vb = ROWS, BLOCK_V
    nkb = kd // kb
    # Float32 partial outputs where key blocks are summed or the output is float32.
    odt = out_dtype if nkb == 1 else F32
    # 128-byte swizzle, tiles of 8 rows x 64 16-bit elements: what WGMMA reads from SMEM.
    tf16 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    counts = [(name, len(arrays)) for name, arrays in groups]
    args = [a for _, arrays in groups for a in arrays]
    n_in = len(args)
    wgmma_layout = plgpu.Layout.WGMMA

    def split_to(refs, x):
        """Store float32 x into 16-bit SMEM pieces (head first)."""
        for ref in refs:
            head = x.astype(dt)
            ref[...] = head
            x = x - head.astype(F32)

    def kernel(*refs):
        in_refs, (h0_ref, o_ref, fin_ref, st_ref) = refs[:n_in], refs[n_in:n_in + 4]
        i, j, kbi = (jax.lax.axis_index(a) for a in ("bh", "v", "kb"))
        cols, keys = pl.ds(j * vb, vb), pl.ds(kbi * kb, kb)

        def load_state(smem, bar):
            plgpu.copy_gmem_to_smem(h0_ref.at[i, keys, cols], smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            return plgpu.load(smem, layout=wgmma_layout)

        s0 = pl.run_scoped(load_state, plgpu.SMEM((kb, vb), F32), plgpu.Barrier(num_barriers=1))

        def chunk_body(scratch, idx, *tiles):
            o_s, st_s, s_parts, p_parts = scratch
            *tiles, s = tiles
            t, at = idx[0], {}
            for name, count in counts:
                at[name], tiles = tiles[:count], tiles[count:]
            v_s = at["v"]
            qd_s, keys_s = at.get("qd", at.get("q")), at.get("kd", at.get("k"))
            s_in = s
            split_to(s_parts, s)
            plgpu.commit_smem()

            def scores(acc):
                for a, b in _pairs(len(at["q"]), len(at["k"])):
                    plgpu.wgmma(acc, at["q"][a], at["k"][b].T)
                return acc[...]

            if mode == "vector":
                a = plgpu.load(at["scores"][0], layout=wgmma_layout)
            else:
                a = pl.run_scoped(scores, plgpu.ACC((c, c), F32))
                if mode == "plain":
                    row = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=wgmma_layout)
                    col = plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=wgmma_layout)
                    a = jnp.where(row >= col, a, 0.0)
                else:
                    # The decay tile carries the causal and segment masks too.
                    a = a * plgpu.load(at["scores"][0], layout=wgmma_layout)
            # Through SMEM, not as a register operand: GPU interpret mode takes only SMEM refs
            # as WGMMA operands (JAX 0.12.0.1).
            split_to(p_parts, a)
            plgpu.commit_smem()

            def intra(acc):
                for a, b in _pairs(len(p_parts), len(v_s)):
                    plgpu.wgmma(acc, p_parts[a], v_s[b])
                return acc[...]

            def inter(acc):
                for a, b in _pairs(len(qd_s), len(s_parts)):
                    plgpu.wgmma(acc, qd_s[a], s_parts[b])
                return acc[...]

            o = pl.run_scoped(intra, plgpu.ACC((c, vb), F32))
            o = o + pl.run_scoped(inter, plgpu.ACC((c, vb), F32))
            if mode != "plain":
                # The chunk's decay of the carried state: one factor per key row of S.
                gamma = plgpu.load(at["gamma"][0], layout=wgmma_layout.reduce(1))
                s = s * jax.lax.broadcast_in_dim(gamma, (kb, vb), [0])
            # The outputs leave by TMA from one buffer each, written once the previous chunk's
            # copies have read it (emit_pipeline's own output stage predicates its copies,
            # which GPU interpret mode does not model).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_s[...] = o.astype(o_s.dtype)
            st_s[...] = s_in
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[kbi, i, pl.ds(t * c, c), cols])
            plgpu.copy_smem_to_gmem(st_s, st_ref.at[i, pl.ds(t * kd + kbi * kb, kb), cols])

            def update(acc):
                for a, b in _pairs(len(keys_s), len(v_s)):
                    plgpu.wgmma(acc, keys_s[a].T, v_s[b])
                return acc[...]

            # A fresh accumulator plus s rather than one initialised with s (`run_state` on
            # ACC.init): GPU interpret mode has no rule for the discharged WGMMA it produces.
            return s + pl.run_scoped(update, plgpu.ACC((kb, vb), F32))

        in_specs, refs_in, r = [], [], 0
        for name, count in counts:
            for ref in in_refs[r:r + count]:
                if name == "v":
                    spec = plgpu.BlockSpec((c, vb), lambda t: (t, 0), transforms=tf16)
                    ref = ref.at[i, :, cols]
                elif name == "scores":     # D (one for all key blocks) or A (per key block)
                    spec = plgpu.BlockSpec((c, c), lambda t: (t, 0))
                    ref = ref.at[kbi if mode == "vector" else 0, i]
                elif name == "gamma":
                    spec = plgpu.BlockSpec((kb,), lambda t: (t,))
                    ref = ref.at[i, kbi]
                else:                      # q, k, q~, k~ pieces: this program's key columns
                    spec = plgpu.BlockSpec((c, kb), lambda t: (t, 0), transforms=tf16)
                    ref = ref.at[i, :, keys]
                in_specs.append(spec)
                refs_in.append(ref)
            r += count

        def walk(o_s, st_s, *parts):
            scratch = (o_s, st_s, parts[:inner], parts[inner:])
            last = plgpu.emit_pipeline(
                functools.partial(chunk_body, scratch), grid=(n,), in_specs=in_specs,
                max_concurrent_steps=stages, init_carry=s0)(*refs_in)
            plgpu.wait_smem_to_gmem(0)      # before the output buffers are released
            return last

        o_buf = (plgpu.SMEM((c, vb), odt) if odt == F32
                 else plgpu.SMEM((c, vb), odt, transforms=tf16))
        scratch = [o_buf, plgpu.SMEM((kb, vb), F32)]
        scratch += [plgpu.SMEM((kb, vb), dt, transforms=tf16)] * inner + [
            plgpu.SMEM((c, c), dt, transforms=tf16)] * inner
        s = pl.run_scoped(walk, *scratch)

        def store_final(smem):
            smem[...] = s
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, fin_ref.at[i, keys, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_final, plgpu.SMEM((kb, vb), F32))

    out_type = (jax.ShapeDtypeStruct((nkb, bh, n * c, vd), odt),
                jax.ShapeDtypeStruct((bh, kd, vd), F32),
                jax.ShapeDtypeStruct((bh, n * kd, vd), F32))
    call = plgpu.kernel(kernel, out_type=out_type, grid=(bh, vd // vb, nkb),
                        grid_names=("bh", "v", "kb"),
                        interpret=interpret if interpret is not None else False)
    return call(*args, h0)


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
    cotangent in the inputs' dtype (16-bit: it meets the tensor cores unsplit; float32: as 3
    bf16 pieces, like q~)."""
    return supports(q, k, v, g, runs, chunk_size) and do.dtype == k.dtype


def _backward_stages(kd, do_pieces):
    """Chunks in flight: q~ in 3 pieces [64, Kd] + do [64, 64] in `do_pieces` + gamma per
    stage, plus the [Kd, 64] float32 output buffer, within the SMEM a block may use (Kd 256:
    one stage, 104 KiB (bf16) / 120 KiB (f32) + 64 KiB)."""
    stage = (KEY_PIECES * ROWS * kd + do_pieces * ROWS * BLOCK_V) * 2 + kd * 4
    fits = lambda s: s * stage + kd * BLOCK_V * 4 + _SMEM_SLACK <= SMEM_BYTES
    return 2 if fits(2) else 1


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
    dt = _piece_dtype(k.dtype)
    chunked = lambda x: _xla.to_chunks(x, chunk, padded)
    # q~ (q itself without gate or segments) is float32 (the scale is folded in): 3 pieces,
    # so the state cotangents keep float32 accuracy; a float32 do likewise. Of _gate_tiles'
    # tiles only q~ and gamma are read; XLA drops the rest (k~, D or A) under jit.
    do_pieces = _pieces(k.dtype, g is not None)["v"]
    if mode == "plain":
        args = _split(_pallas._to_tiles(chunked(q).astype(F32), geo, kd), dt, KEY_PIECES)
    else:
        extra = _gate_tiles(q, k, g, runs, geo, chunk, sub, padded, mode, dt,
                            query_pieces=KEY_PIECES)
        args = extra[:KEY_PIECES]
    args += _split(_pallas._to_tiles(chunked(do).astype(F32), geo, vd), dt, do_pieces)
    if mode != "plain":
        args.append(extra[-1])
    args.append(_pallas._state_in(dfinal.astype(F32), geo))
    ends, dh0 = _reverse_call(args, geo, mode, do_pieces, interpret, plgpu)
    bh = batch * heads
    ends = ends.reshape(bh, n, kd, vd)[:, :, :key_dim, :value_dim]
    ends = ends.reshape(batch, heads, n, key_dim, value_dim)
    dh0 = dh0[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    return ends, dh0


def _reverse_call(args, geo, mode, do_pieces, interpret, plgpu):
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
            query, dos = tiles[:KEY_PIECES], tiles[KEY_PIECES:KEY_PIECES + do_pieces]
            if mode != "plain":
                # Read before the fence below: with one stage the pipeline's next TMA write
                # into this buffer must come after it (a race in interpret mode otherwise).
                gamma = plgpu.load(tiles[-1], layout=wgmma_layout.reduce(1))
            t = n - 1 - idx[0]
            # One output buffer, rewritten once the previous chunk's copy has read it.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            end_s[...] = ds
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(end_s, ends_ref.at[i, pl.ds(t * kd, kd), cols])
            if mode != "plain":
                ds = ds * jax.lax.broadcast_in_dim(gamma, (kd, vb), [0])

            def local(acc):
                for a, b in _pairs(len(query), len(dos)):
                    plgpu.wgmma(acc, query[a].T, dos[b])
                return acc[...]

            return ds + pl.run_scoped(local, plgpu.ACC((kd, vb), F32))

        rev = lambda t: (n - 1 - t, 0)
        in_specs = [plgpu.BlockSpec((c, kd), rev, transforms=tf16)] * KEY_PIECES
        in_specs += [plgpu.BlockSpec((c, vb), rev, transforms=tf16)] * do_pieces
        refs_in = [r.at[i] for r in in_refs[:KEY_PIECES]]
        refs_in += [r.at[i, :, cols] for r in in_refs[KEY_PIECES:KEY_PIECES + do_pieces]]
        if mode != "plain":
            in_specs.append(plgpu.BlockSpec((kd,), lambda t: (n - 1 - t,)))
            refs_in.append(in_refs[KEY_PIECES + do_pieces].at[i])

        def walk(end_s):
            last = plgpu.emit_pipeline(
                functools.partial(chunk_body, end_s), grid=(n,), in_specs=in_specs,
                max_concurrent_steps=_backward_stages(kd, do_pieces), init_carry=ds0)(*refs_in)
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
