"""Pallas kernels for `chunked_linear_attention`: one chunk body per direction, two launches.

Each program owns one (batch * head, value block) pair and walks the chunks in order (the
backward: in reverse), carrying a key_dim x block_v state (the backward: its cotangent) in
float32. Value columns of the state evolve independently, so splitting V over programs is exact;
what sums over V (dq, dk, the gate gradients) is written per value block and summed outside.

* TPU (Mosaic): grid (batch * heads, value blocks, chunks); the chunk axis is sequential
  ("arbitrary") and the carry lives in a VMEM scratch between chunks.
* GPU (Triton): grid (batch * heads, value blocks); each program walks all chunks in a fori_loop
  with the carry in registers (Triton has no cross-program scratch).

The chunks are those of xla.py (`xla.chunk_geometry`), so the per-chunk start states the forward
writes have the XLA path's shape (platform_dependent needs every branch to agree). Each chunk is
padded at its end to the hardware's tile (a multiple of 8 or 16 rows on TPU, a power of two >= 16
on GPU) with zero q, k, v and the last token's cumulative gate and segment: such tokens change
neither the state nor any real output, so any `chunk_size` works on both targets.

The math is xla.py's: cumulative log gates b (inclusive prefix sums), to_end (suffix sums) and
the chunk's total come from `xla._cumulative` outside the kernels (clamped at xla.GATE_FLOOR),
and inside only differences <= 0 are exponentiated. A scalar gate's pair decays
exp(b_i - b_j) are one [C, C] tile; a vector gate's are walked one query row at a time (a
[C, K] tile per row), so no [C, C, K] tensor exists and no exponent is positive. The diagonal
of the intra-chunk scores carries a constant decay of 1 and is kept out of the gate gradient
(as in xla._pair_decay), so strong decays keep accurate, tiny gate gradients.

The backward (a custom VJP in __init__.py) reads the inputs and the chunk start states, carries
dS from the end, recomputes each chunk's scores, and writes dq, dk, dv and the cotangents of b,
to_end and the chunk totals; the gate gradient is then the VJP of `xla._cumulative` (reverse and
forward cumulative sums), outside the kernel.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._dispatch import cuda_compute_capability, triton_interpret, use_mosaic_gpu
from pallas_kernels.chunked_linear_attention import xla as _xla

F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
_OP = "chunked_linear_attention"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_v: value columns per program (the state tile is key_dim x block_v)."""

    block_v: int

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            # 128 lanes: one full vreg width; K x 128 x 4 B of carry scratch per program.
            return cls(block_v=128)
        if target == "cuda":
            # 64 columns: at B4 H8 V128, 64 programs of a 64 x 64 state, about one per SM pair.
            return cls(block_v=64)
        raise ValueError(f"{_OP}: unknown Pallas target {target!r}")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# The matmul algorithm of the kernel bodies, read when they are traced (set by `_launch`). Full
# float32 (HIGHEST) everywhere except compiled Triton, where HIGHEST means IEEE float32 dots that
# Triton expands into scalar FMA loops (slow to compile, no tensor cores); there the dots are
# TF32x3 (three TF32 tensor-core products with the rounding errors fed back), about float32
# accuracy: relative errors 1e-7 to 3e-6 against float64 on an H200 at B2 T2048 H8 d64 / d128.
_PRECISION = contextvars.ContextVar("memzoo_cla_precision", default=_HIGHEST)

# Key dims above this run the XLA path on GPU (the same chunks and chunk states): the Triton
# kernels ask 262,144 bytes of shared memory at K = 256 (H100 / H200: 232,448 per block).
GPU_MAX_KEY_DIM = 128
# Before Hopper (no wgmma: TF32x3 is three passes of warp-level mma.sync) the vector-gated
# backward kernel above this key dim took 37 s of CPU to compile for the A100 at d128 in
# bfloat16 (the H200: under 18 s for the whole fwd+bwd), over the 30 s a kernel may take:
# there that backward runs on the XLA path (delta_rule has the same rule for its backward).
GPU_PRE_HOPPER_VECTOR_BACKWARD_MAX_KEY_DIM = 64


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


def _dot_nt(a, b):
    """a @ b.T"""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


def _dot_tn(a, b):
    """a.T @ b"""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


def _scale(x, factor):
    return x if factor is None else x * factor


def _rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# The chunk bodies. Tiles: q, k [C, K]; v, do [C, Vb]; s, ds [K, Vb]; gate None or a dict with
# b, e (to_end) [C, Kg], brow [1, C] (scalar gates: b as a row) and total [Kg, 1];
# seg None or (counts [C, 1], counts [1, C]): resets since the chunk start, per token.


def _masks(c, seg):
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    m = dict(eye=row == col, strict=row > col, incl=row >= col, cid=None,
             from_start=None, to_end=None, keep=None)
    if seg is not None:
        ccol, crow = seg
        same = ccol == crow
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)
        # The last token's count as [1, 1], by a masked sum (Triton cannot slice values).
        clast = jnp.sum(jnp.where(lane == c - 1, crow, 0.0), axis=1, keepdims=True)
        m.update(strict=m["strict"] & same, incl=m["incl"] & same, cid=ccol,
                 from_start=(ccol == 0).astype(F32), to_end=(ccol == clast).astype(F32),
                 keep=(clast == 0).astype(F32))
    return m


def _factors(gate, m):
    """exp(b) (queries to the chunk start), exp(to_end) (keys to the chunk end), each [C, Kg]
    and 0 across a reset; the chunk's decay of the state [Kg, 1] (0 across a reset). None
    stands for 1."""
    eb, ee, dec = m["from_start"], m["to_end"], m["keep"]
    if gate is not None:
        eb = _scale(jnp.exp(gate["b"]), eb)
        ee = _scale(jnp.exp(gate["e"]), ee)
        dec = _scale(jnp.exp(gate["total"]), dec)
    return eb, ee, dec


def _pair_decay(gate, m):
    """Scalar gates: exp(b_i - b_j) on the strict lower triangle (same segment), else 0."""
    strict = m["strict"]
    return jnp.where(strict, jnp.exp(jnp.where(strict, gate["b"] - gate["brow"], 0.0)), 0.0)


def _vector_rows(q, k, b, m, dat=None):
    """Vector gates, one query row i at a time: A^T with at[j, i] = A_ij =
    sum_k q_ik k_jk exp(b_ik - b_jk) (j <= i, same segment), and, given dat = dA^T, the strict
    parts dq_s = (dA o P) k and dk_s = (dA o P)^T q, P_ijk = exp(b_ik - b_jk) for j < i."""
    c, kdim = q.shape
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    cid = m["cid"]

    def row(i, carry):
        sel = rows == i
        pick = lambda x: jnp.sum(jnp.where(sel, x, 0.0), axis=0, keepdims=True)   # [1, .]
        q_i = pick(q)
        before = rows < i
        if cid is not None:
            before = before & (cid == pick(cid))
        e = jnp.where(before, jnp.exp(jnp.where(before, pick(b) - b, 0.0)), 0.0)   # [C, K]
        at = jnp.where(cols == i, _rowsum(q_i * k * e), carry[0])
        if dat is None:
            return (at,)
        x = _rowsum(jnp.where(cols == i, dat, 0.0)) * e          # dA_ij P_ijk over j
        dq = jnp.where(sel, jnp.sum(x * k, axis=0, keepdims=True), carry[1])
        return at, dq, carry[2] + x * q_i

    zeros = jnp.zeros((c, kdim), F32)
    init = (jnp.zeros((c, c), F32),) + (() if dat is None else (zeros, zeros))
    at, *grads = jax.lax.fori_loop(0, c, row, init)
    # The rows wrote only j < i: the diagonal (decay exactly 1) is added once, here.
    return (at + jnp.where(m["eye"], _rowsum(q * k), 0.0), *grads)


def chunk_forward(q, k, v, s, gate, seg, *, vector):
    """One chunk: (o [C, Vb], the state leaving the chunk [K, Vb]) from the state entering it."""
    m = _masks(q.shape[0], seg)
    eb, ee, dec = _factors(gate, m)
    if vector:
        (at,) = _vector_rows(q, k, gate["b"], m)
        o = _dot_tn(at, v)
    else:
        a = _dot_nt(q, k)
        if gate is None:
            a = jnp.where(m["incl"], a, 0.0)
        else:
            a = a * _pair_decay(gate, m) + jnp.where(m["eye"], a, 0.0)
        o = _dot(a, v)
    o = o + _dot(_scale(q, eb), s)
    return o, _scale(s, dec) + _dot_tn(_scale(k, ee), v)


def chunk_backward(q, k, v, s, do, ds, gate, seg, *, vector):
    """One chunk's VJP given its start state s and the cotangent ds of its end state.

    Returns (dq, dk, dv, db, de, dtotal, ds_start): db, de [C, Kg] and dtotal [Kg, 1] are the
    cotangents of b, to_end and the chunk total (None without a gate)."""
    m = _masks(q.shape[0], seg)
    eb, ee, dec = _factors(gate, m)
    if vector:
        dat = _dot_nt(v, do)                               # dA^T: [j, i] = v_j . do_i
        at, dq_s, dk_s = _vector_rows(q, k, gate["b"], m, dat)
        ddiag = _rowsum(jnp.where(m["eye"], dat, 0.0))
        dv = _dot(at, do)
        dq, dk = dq_s + ddiag * k, dk_s + ddiag * q
        db = q * dq_s - k * dk_s
    else:
        a = _dot_nt(q, k)
        da = _dot_nt(do, v)
        if gate is None:
            a = jnp.where(m["incl"], a, 0.0)
            da = jnp.where(m["incl"], da, 0.0)
            dq, dk, db = _dot(da, k), _dot_tn(da, q), None
        else:
            p = _pair_decay(gate, m)
            ddiag = _rowsum(jnp.where(m["eye"], da, 0.0))
            a = a * p + jnp.where(m["eye"], a, 0.0)
            dap = da * p
            dq_s, dk_s = _dot(dap, k), _dot_tn(dap, q)
            dq, dk = dq_s + ddiag * k, dk_s + ddiag * q
            # b enters A only through b_i - b_j off the diagonal: +q.dq_s at i, -k.dk_s at j.
            db = _rowsum(q * dq_s - k * dk_s)
        dv = _dot_tn(a, do)
    qd, kd = _scale(q, eb), _scale(k, ee)
    dqd, dkd = _dot_nt(do, s), _dot_nt(v, ds)
    dq = dq + _scale(dqd, eb)
    dk = dk + _scale(dkd, ee)
    dv = dv + _dot(kd, ds)
    if eb is None:
        # q^T do with q itself as the transposed operand (no gate, no segments: qd is q) fails
        # in libtpu's v6e backend ("Using both transposed and non-transposed gain latches in the
        # same sequence", or a register-allocation RET_CHECK), beside q's other two products;
        # (do^T q)^T is the same product and compiles on every target.
        ds_start = _dot_tn(do, qd).T + _scale(ds, dec)
    else:
        ds_start = _dot_tn(qd, do) + _scale(ds, dec)
    if gate is None:
        return dq, dk, dv, None, None, None, ds_start
    reduce = (lambda x: x) if vector else _rowsum
    db = db + reduce(dqd * qd)
    de = reduce(dkd * kd)
    sds = _rowsum(s * ds)                                     # [K, 1]
    dtotal = dec * (sds if vector else jnp.sum(sds, axis=0, keepdims=True))
    return dq, dk, dv, db, de, dtotal, ds_start


# ---------------------------------------------------------------------------------------------
# The launch: named operands, each of a kind that says how a chunk's tile is cut from it.
#   seq   [rows of every chunk, width]: the chunk's Cp rows
#   row   per-chunk rows [1, Cp]
#   total per-chunk columns [Kg, 1]
#   state per-chunk states [Kd, Vb]
#   whole one tile for the whole walk (initial / final states)
# On TPU the BlockSpecs cut the chunk's tile out; on GPU a program holds the whole sequence and
# slices it.


@dataclasses.dataclass(frozen=True)
class _Geometry:
    chunk: int        # the op's chunk (xla.chunk_geometry)
    cp: int           # rows per chunk tile, after padding for the hardware
    n: int            # chunks
    kd: int           # key width of the tiles
    kg: int           # gate width (1 for scalar gates)
    block_v: int
    vd: int           # value width, padded to whole blocks

    @property
    def n_v(self):
        return self.vd // self.block_v


class _Tiles:
    """tiles[name] reads chunk n's tile of an operand (as float32); tiles[name] = x writes it."""

    def __init__(self, refs, kinds, target, n, geo):
        self.refs, self.kinds, self.target, self.n, self.geo = refs, kinds, target, n, geo

    def _index(self, name):
        if self.target == "tpu" or self.kinds[name] == "whole":
            return ...
        n, geo = self.n, self.geo
        kind = self.kinds[name]
        if kind == "seq":
            return (pl.ds(n * geo.cp, geo.cp), slice(None))
        if kind == "row":
            return (pl.ds(n, 1), slice(None))
        if kind == "total":
            return (pl.ds(n * geo.kg, geo.kg), slice(None))
        return (pl.ds(n * geo.kd, geo.kd), slice(None))

    def __getitem__(self, name):
        return self.refs[name][self._index(name)].astype(F32)

    def __setitem__(self, name, value):
        ref = self.refs[name]
        ref[self._index(name)] = value.astype(ref.dtype)


def _kernel(*refs, in_names, out_names, kinds, target, geo, step, init, finish, reverse):
    named = dict(zip(in_names + out_names, refs))
    if target == "tpu":
        scratch = refs[len(in_names) + len(out_names)]
        i = pl.program_id(2)

        @pl.when(i == 0)
        def _():
            scratch[...] = named[init][...].astype(F32)

        carry = step(_Tiles(named, kinds, target, None, geo), scratch[...])
        scratch[...] = carry

        @pl.when(i == pl.num_programs(2) - 1)
        def _():
            named[finish][...] = carry.astype(named[finish].dtype)
    else:
        def body(i, carry):
            n = geo.n - 1 - i if reverse else i
            return step(_Tiles(named, kinds, target, n, geo), carry)

        carry = jax.lax.fori_loop(0, geo.n, body, named[init][...].astype(F32))
        named[finish][...] = carry.astype(named[finish].dtype)


def _spec(kind, width, target, geo, reverse, *, per_v_block=False):
    """The BlockSpec of an operand of `kind` whose tiles are `width` wide ("v": a value block)."""
    v_cols = width == "v"
    w = geo.block_v if v_cols else width
    # Outputs written per value block (summed outside) lead with that block's index.
    lead = (None, None) if per_v_block else (None,)
    pre = (lambda b, j: (j, b)) if per_v_block else (lambda b, j: (b,))
    last = (lambda j: j) if v_cols else (lambda j: 0)
    if target == "tpu":
        chunk = (lambda n: geo.n - 1 - n) if reverse else (lambda n: n)
        shape, index = {
            "seq": ((geo.cp, w), lambda b, j, n: (*pre(b, j), chunk(n), last(j))),
            "row": ((None, 1, geo.cp), lambda b, j, n: (*pre(b, j), chunk(n), 0, 0)),
            "total": ((None, geo.kg, 1), lambda b, j, n: (*pre(b, j), chunk(n), 0, 0)),
            "state": ((None, geo.kd, w), lambda b, j, n: (*pre(b, j), chunk(n), 0, last(j))),
            "whole": ((geo.kd, w), lambda b, j, n: (*pre(b, j), 0, last(j))),
        }[kind]
        return pl.BlockSpec(lead + shape, index)
    rows = {"seq": geo.n * geo.cp, "row": geo.n, "total": geo.n * geo.kg,
            "state": geo.n * geo.kd, "whole": geo.kd}[kind]
    cols = {"row": geo.cp, "total": 1}.get(kind, w)
    return pl.BlockSpec(lead + (rows, cols), lambda b, j: (*pre(b, j), 0, last(j)))


def _array_shape(kind, width, target, geo, bh):
    """The full array shape of an operand of `kind` ("v": the padded value width)."""
    w = geo.vd if width == "v" else width
    if target == "tpu":
        return {"seq": (bh, geo.n * geo.cp, w), "row": (bh, geo.n, 1, geo.cp),
                "total": (bh, geo.n, geo.kg, 1), "state": (bh, geo.n, geo.kd, w),
                "whole": (bh, geo.kd, w)}[kind]
    return {"seq": (bh, geo.n * geo.cp, w), "row": (bh, geo.n, geo.cp),
            "total": (bh, geo.n * geo.kg, 1), "state": (bh, geo.n * geo.kd, w),
            "whole": (bh, geo.kd, w)}[kind]


def _launch(kernel_step, inputs, outputs, *, init, finish, reverse, target, geo, bh, interpret,
            name):
    """inputs: [(name, kind, width, array)]; outputs: [(name, kind, width, dtype, per_v_block)].
    Returns the outputs, in order."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    kinds = {n: kd for n, kd, *_ in inputs}
    kinds.update({n: kd for n, kd, *_ in outputs})
    in_specs = [_spec(kd, w, target, geo, reverse) for _, kd, w, _ in inputs]
    out_specs = [_spec(kd, w, target, geo, reverse, per_v_block=pv)
                 for _, kd, w, _, pv in outputs]
    out_shape = [jax.ShapeDtypeStruct(((geo.n_v,) if pv else ()) + _array_shape(kd, w, target,
                                                                                 geo, bh), dt)
                 for _, kd, w, dt, pv in outputs]
    kernel = functools.partial(
        _kernel, in_names=[n for n, *_ in inputs], out_names=[n for n, *_ in outputs],
        kinds=kinds, target=target, geo=geo, step=kernel_step, init=init, finish=finish,
        reverse=reverse)
    interpret = interpret if interpret is not None else False
    if target == "tpu":
        call = pl.pallas_call(
            kernel, grid=(bh, geo.n_v, geo.n), out_shape=out_shape, in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=[pltpu.VMEM((geo.kd, geo.block_v), F32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name=name)
    elif target == "cuda":
        call = pl.pallas_call(
            kernel, grid=(bh, geo.n_v), out_shape=out_shape, in_specs=in_specs,
            out_specs=out_specs,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret, name=name)
    else:
        raise ValueError(f"{_OP}: unknown Pallas target {target!r}")
    precision = (jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if target == "cuda" and not interpret
                 else _HIGHEST)
    token = _PRECISION.set(precision)
    try:
        return call(*[x for *_, x in inputs])
    finally:
        _PRECISION.reset(token)


# ---------------------------------------------------------------------------------------------
# Layout: [B, T, H, D] -> [B*H, N*Cp, width] (chunks padded at their ends) and back.


def geometry(length, key_dim, value_dim, vector, chunk_size, target, dtypes,
             block_sizes: BlockSizes | None = None) -> _Geometry:
    chunk, _, padded = _xla.chunk_geometry(length, chunk_size, vector)
    bs = block_sizes or BlockSizes.get_default(target)
    if target == "tpu":
        # 8 rows a sublane tile, 16 when a 16-bit operand packs two rows per sublane.
        rows = 16 if min(jnp.dtype(d).itemsize for d in dtypes) < 4 else 8
        cp = _round_up(chunk, rows)
        kd = key_dim
        block_v = min(bs.block_v, value_dim)
    elif target == "cuda":
        # Triton tiles are powers of two, and its matmuls need every side >= 16.
        cp = max(16, pl.next_power_of_2(chunk))
        kd = max(16, pl.next_power_of_2(key_dim))
        block_v = max(16, min(bs.block_v, pl.next_power_of_2(value_dim)))
    else:
        raise ValueError(f"{_OP}: unknown Pallas target {target!r}")
    return _Geometry(chunk=chunk, cp=cp, n=padded // chunk, kd=kd, kg=kd if vector else 1,
                     block_v=block_v, vd=_round_up(value_dim, block_v))


def _to_tiles(x, geo, width, *, edge=False):
    """Chunked [B, H, N, C, D] -> [B*H, N*Cp, width]; rows padded at each chunk's end (zeros, or
    the chunk's last row with edge=True), columns with zeros."""
    b, h, n, c, d = x.shape
    if geo.cp != c:
        x = jnp.pad(x, [(0, 0)] * 3 + [(0, geo.cp - c), (0, 0)],
                    mode="edge" if edge else "constant")
    if width != d:
        x = jnp.pad(x, [(0, 0)] * 4 + [(0, width - d)])
    return x.reshape(b * h, n * geo.cp, width)


def _from_tiles(x, geo, shape):
    """[B*H, N*Cp, width] -> [B, T, H, D] (the inverse of to_chunks then _to_tiles)."""
    b, t, h, d = shape
    x = x.reshape(b, h, geo.n, geo.cp, x.shape[-1])[:, :, :, :geo.chunk, :d]
    return _xla.from_chunks(x, t)


def _rows(x, geo, target):
    """[B*H, N*Cp, 1] -> per-chunk rows: [B*H, N, 1, Cp] (TPU) or [B*H, N, Cp] (GPU)."""
    x = x.reshape(x.shape[0], geo.n, geo.cp)
    return x[:, :, None, :] if target == "tpu" else x


def _totals(total, geo, target):
    """Chunk totals [B, H, N, Kg] -> [B*H, N, Kg, 1] (TPU) or [B*H, N*Kg, 1] (GPU)."""
    b, h, n, kg = total.shape
    total = jnp.pad(total, [(0, 0)] * 3 + [(0, geo.kg - kg)]).reshape(b * h, n, geo.kg, 1)
    return total if target == "tpu" else total.reshape(b * h, n * geo.kg, 1)


def _states_in(x, geo, target):
    """[B, H, N, K, V] -> [B*H, N, Kd, Vd] (TPU) or [B*H, N*Kd, Vd] (GPU)."""
    b, h, n, kdim, vdim = x.shape
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, geo.kd - kdim), (0, geo.vd - vdim)])
    x = x.reshape(b * h, n, geo.kd, geo.vd)
    return x if target == "tpu" else x.reshape(b * h, n * geo.kd, geo.vd)


def _state_in(x, geo):
    b, h, kdim, vdim = x.shape
    return jnp.pad(x, [(0, 0), (0, 0), (0, geo.kd - kdim), (0, geo.vd - vdim)]).reshape(
        b * h, geo.kd, geo.vd)


def _operands(q, k, v, g, runs, geo, target):
    """The kernels' shared inputs: [(name, kind, width, array)], and the chunked gate."""
    batch, length, heads, _ = q.shape
    padded = geo.n * geo.chunk
    chunked = lambda x: _xla.to_chunks(x, geo.chunk, padded)
    ops = [("q", "seq", geo.kd, _to_tiles(chunked(q), geo, geo.kd)),
           ("k", "seq", geo.kd, _to_tiles(chunked(k), geo, geo.kd)),
           ("v", "seq", "v", _to_tiles(chunked(v), geo, geo.vd))]
    gc = None
    if g is not None:
        gc = chunked(g).astype(F32)
        b, to_end, total = _xla._cumulative(gc)
        # Edge padding: a padded row's cumulative gate is its chunk's last, so every exponent
        # it meets stays <= 0 (a zero there could overflow against strongly decayed rows).
        bt = _to_tiles(b, geo, geo.kg, edge=True)
        ops += [("b", "seq", geo.kg, bt),
                ("e", "seq", geo.kg, _to_tiles(to_end, geo, geo.kg, edge=True)),
                ("total", "total", geo.kg, _totals(total, geo, target))]
        if geo.kg == 1:
            ops.append(("brow", "row", geo.cp, _rows(bt, geo, target)))
    if runs is not None:
        if padded != length:
            runs = jnp.pad(runs, [(0, 0), (0, padded - length)], mode="edge")
        r = runs.reshape(batch, geo.n, geo.chunk)
        # Resets since the chunk start: the state entering a chunk belongs to the previous
        # chunk's last token (xla.segment_masks' r_in), 0 at the start.
        r_in = jnp.concatenate([jnp.zeros_like(r[:, :1, -1]), r[:, :-1, -1]], axis=1)
        counts = (r - r_in[..., None]).astype(F32)
        counts = jnp.broadcast_to(counts[:, None, :, :, None], (batch, heads, geo.n, geo.chunk, 1))
        ct = _to_tiles(counts, geo, 1, edge=True)
        ops += [("c", "seq", 1, ct), ("crow", "row", geo.cp, _rows(ct, geo, target))]
    return ops, gc


def _chunk_args(t, names):
    gate = None
    if "b" in names:
        gate = {"b": t["b"], "e": t["e"], "total": t["total"]}
        if "brow" in names:
            gate["brow"] = t["brow"]
    seg = (t["c"], t["crow"]) if "c" in names else None
    return gate, seg


def _check_dtype(h0):
    if h0.dtype != F32:
        raise ValueError(f"{_OP}: the Pallas kernels accumulate in float32, got {h0.dtype} "
                         "(64-bit inputs take implementation='xla')")


def forward(q, k, v, g, h0, runs, *, chunk_size=None, target: str, interpret=None,
            block_sizes: BlockSizes | None = None):
    """`xla.forward_with_states` in Pallas: (o [B,T,H,V] in v's dtype, final state [B,H,K,V],
    the state entering every chunk [B,H,N,K,V])."""
    _check_dtype(h0)
    if target == "cuda" and use_mosaic_gpu(interpret):
        from pallas_kernels.chunked_linear_attention import mosaic_gpu   # imports this module
        if mosaic_gpu.supports(q, k, v, g, runs, chunk_size):
            return mosaic_gpu.forward(q, k, v, g, h0, runs, chunk_size=chunk_size,
                                      interpret=interpret)
        interpret = triton_interpret(interpret)
    if target == "cuda" and q.shape[-1] > GPU_MAX_KEY_DIM:
        return _xla.forward_with_states(q, k, v, g, h0, runs, chunk_size=chunk_size)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    vector = g is not None and g.shape[-1] > 1
    geo = geometry(length, key_dim, value_dim, vector, chunk_size, target,
                   (q.dtype, k.dtype, v.dtype), block_sizes)
    bh = batch * heads
    inputs, _ = _operands(q, k, v, g, runs, geo, target)
    names = [n for n, *_ in inputs]
    inputs.append(("h0", "whole", "v", _state_in(h0, geo)))

    def step(t, s):
        gate, seg = _chunk_args(t, names)
        o, s_next = chunk_forward(t["q"], t["k"], t["v"], s, gate, seg, vector=vector)
        t["o"] = o
        t["states"] = s
        return s_next

    outputs = [("o", "seq", "v", v.dtype, False), ("final", "whole", "v", F32, False),
               ("states", "state", "v", F32, False)]
    o, final, states = _launch(step, inputs, outputs, init="h0", finish="final", reverse=False,
                               target=target, geo=geo, bh=bh, interpret=interpret,
                               name="memzoo_chunked_linear_attention_fwd")
    o = _from_tiles(o, geo, (batch, length, heads, value_dim))
    final = final[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    states = states.reshape(bh, geo.n, geo.kd, geo.vd)[:, :, :key_dim, :value_dim]
    return o, final, states.reshape(batch, heads, geo.n, key_dim, value_dim)


def backward(q, k, v, g, h0, runs, starts, do, dfinal, *, chunk_size=None, target: str,
             interpret=None, block_sizes: BlockSizes | None = None):
    """`xla.backward` in Pallas: (dq, dk, dv, dg, dh0) from the inputs and the chunk states."""
    _check_dtype(h0)
    interpret = triton_interpret(interpret)    # no Mosaic GPU backward yet
    vector = g is not None and g.shape[-1] > 1
    if target == "cuda" and (q.shape[-1] > GPU_MAX_KEY_DIM or (
            vector and q.shape[-1] > GPU_PRE_HOPPER_VECTOR_BACKWARD_MAX_KEY_DIM
            and (cuda_compute_capability() or 90) < 90)):
        return _xla.backward(q, k, v, g, h0, runs, starts, do, dfinal, chunk_size=chunk_size)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    geo = geometry(length, key_dim, value_dim, vector, chunk_size, target,
                   (q.dtype, k.dtype, v.dtype, do.dtype), block_sizes)
    bh = batch * heads
    inputs, gc = _operands(q, k, v, g, runs, geo, target)
    names = [n for n, *_ in inputs]
    padded = geo.n * geo.chunk
    inputs += [("starts", "state", "v", _states_in(starts.astype(F32), geo, target)),
               ("do", "seq", "v", _to_tiles(_xla.to_chunks(do, geo.chunk, padded), geo, geo.vd)),
               ("dfinal", "whole", "v", _state_in(dfinal.astype(F32), geo))]
    gated = g is not None

    def step(t, ds):
        gate, seg = _chunk_args(t, names)
        dq, dk, dv, db, de, dtotal, ds_start = chunk_backward(
            t["q"], t["k"], t["v"], t["starts"], t["do"], ds, gate, seg, vector=vector)
        t["dq"], t["dk"], t["dv"] = dq, dk, dv
        if gated:
            t["db"], t["de"], t["dtotal"] = db, de, dtotal
        return ds_start

    outputs = [("dq", "seq", geo.kd, F32, True), ("dk", "seq", geo.kd, F32, True),
               ("dv", "seq", "v", F32, False)]
    if gated:
        outputs += [("db", "seq", geo.kg, F32, True), ("de", "seq", geo.kg, F32, True),
                    ("dtotal", "total", geo.kg, F32, True)]
    outputs.append(("dh0", "whole", "v", F32, False))
    results = _launch(step, inputs, outputs, init="dfinal", finish="dh0", reverse=True,
                      target=target, geo=geo, bh=bh, interpret=interpret,
                      name="memzoo_chunked_linear_attention_bwd")
    shape_k = (batch, length, heads, key_dim)
    # What sums over V was written per value block.
    dq = _from_tiles(jnp.sum(results[0], axis=0), geo, shape_k)
    dk = _from_tiles(jnp.sum(results[1], axis=0), geo, shape_k)
    dv = _from_tiles(results[2], geo, v.shape)
    dh0 = results[-1][:, :key_dim, :value_dim].reshape(h0.shape)
    dg = None
    if gated:
        kg = gc.shape[-1]
        tiles = lambda x: x.reshape(batch, heads, geo.n, geo.cp, geo.kg)[:, :, :, :geo.chunk, :kg]
        db, de = tiles(jnp.sum(results[3], axis=0)), tiles(jnp.sum(results[4], axis=0))
        dtotal = jnp.sum(results[5], axis=0).reshape(batch, heads, geo.n, geo.kg)[..., :kg]
        # The chain through the prefix / suffix sums (and the clamp) is xla.py's own.
        _, cumulative_vjp = jax.vjp(_xla._cumulative, gc)
        (dgc,) = cumulative_vjp((db, de, dtotal))
        dg = _xla.from_chunks(dgc, length).astype(g.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dh0.astype(h0.dtype))
