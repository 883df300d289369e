"""The machinery the chunked matrix-state ops share (chunked_linear_attention, delta_rule,
dplr_delta_rule), and the one encoding of segment boundaries every op uses.

* Segments: `segment_starts` says where the id changes (the state is cut before that step);
  run numbers, per-chunk reset counts and sequence_parallel's shard-edge cuts all derive
  from it, so no op compares neighbouring ids itself.
* The XLA chunk layout: [B, T, H, ...] <-> chunks [B, H, N, C, ...] (or chunk-major
  [N, B, H, C, ...]), zero-padded at the end of time.
* The Pallas chunk layout (`Geometry`, `to_tiles`, ...): each of the op's chunks padded at its
  end to the hardware's tile, rows of all chunks stacked per (batch * head).
* `launch`: the one launcher of a chunk walk. Each program owns one (batch * head, value
  block) pair and walks the chunks in order (or in reverse), carrying a [Kd, block_v] float32
  tile: on TPU (Mosaic) a grid (batch * heads, value blocks, chunks) with the chunk axis
  sequential and the carry in VMEM scratch; on GPU (Triton) a grid (batch * heads, value
  blocks) whose programs walk the chunks in a fori_loop with the carry in registers (Triton
  has no cross-program scratch).
* The kernels' dot helpers, whose precision `launch` sets per target (`matmuls`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---------------------------------------------------------------------------------------------
# Segment boundaries.


def segment_starts(segment_ids, *, reverse: bool = False):
    """[B, T] bool: True where step t begins a new segment in the direction of the scan, i.e.
    where the state is cut before t (forward: ids[t] != ids[t-1]; reverse: ids[t] != ids[t+1]).
    The first step in the scan's direction is never a start: it continues the carried state."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    # The padding column is built from the batch size: change[:, :1] is empty when T = 1.
    edge = jnp.zeros((segment_ids.shape[0], 1), bool)
    return jnp.concatenate([change, edge] if reverse else [edge, change], axis=1)


def segment_runs(segment_ids, *, reverse: bool = False):
    """[B, T] int32: how many segments started before t (inclusive) in the scan's direction,
    0 in the first one. Two steps see each other's state exactly when their runs are equal."""
    starts = segment_starts(segment_ids, reverse=reverse).astype(jnp.int32)
    return jax.lax.cumsum(starts, axis=1, reverse=reverse)


def chunk_resets(starts, chunk: int):
    """[B, N, C] int32 from [B, T] starts: the segment starts since each chunk began (the
    chunk's first step included); T zero-padded to whole chunks. Token j reaches token i of the
    same chunk exactly when their counts are equal; the state entering a chunk reaches the
    tokens whose count is 0."""
    b, t = starts.shape
    n = -(-t // chunk)
    r = jnp.pad(starts.astype(jnp.int32), [(0, 0), (0, n * chunk - t)])
    return jnp.cumsum(r.reshape(b, n, chunk), axis=-1)


# ---------------------------------------------------------------------------------------------
# The XLA chunk layout.


def effective_chunk(length: int, chunk_size: int) -> int:
    """The chunk the forward and backward agree on: never longer than the sequence."""
    return max(1, min(chunk_size, length))


def to_chunks(x, chunk: int, padded: int | None = None, *, chunk_major: bool = False):
    """[B, T, H, ...] -> [B, H, N, C, ...] (chunk_major: [N, B, H, C, ...]), zero-padded at the
    end of time to `padded` (default: whole chunks). Padded steps with zero inputs leave every
    op's state as it is. None passes through."""
    if x is None:
        return None
    b, t, h = x.shape[:3]
    padded = -(-t // chunk) * chunk if padded is None else padded
    if padded != t:
        x = jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, padded // chunk, chunk) + x.shape[2:])
    rest = tuple(range(4, x.ndim))
    return x.transpose(((1, 0, 3, 2) if chunk_major else (0, 3, 1, 2)) + rest)


def from_chunks(x, length: int, *, chunk_major: bool = False):
    """[B, H, N, C, D] (chunk_major: [N, B, H, C, D]) -> [B, T, H, D], the padding dropped."""
    if chunk_major:
        x = jnp.moveaxis(x, 0, 2)
    b, h, n, c, d = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(b, n * c, h, d)[:, :length]


# ---------------------------------------------------------------------------------------------
# The Pallas chunk layout: [B*H, N*Cp, width], each chunk padded at its end to Cp rows.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_v: value columns per program (the state tile is key_dim x block_v). Each op has
    its subclass (its own defaults to override, its name in errors)."""

    block_v: int
    op = "chunked op"     # a class attribute, not a field

    @classmethod
    def get_default(cls, target: str) -> "BlockSizes":
        if target == "tpu":
            # 128 lanes: one full vreg width; K x 128 x 4 B of carry scratch per program.
            return cls(block_v=128)
        if target == "cuda":
            # 64 columns: at B4 H8 V128, 64 programs of a 64 x 64 state, about one per SM pair.
            return cls(block_v=64)
        raise ValueError(f"{cls.op}: unknown Pallas target {target!r}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    chunk: int        # the op's chunk (its XLA path's, so the chunk states agree)
    cp: int           # rows per chunk tile, after padding for the hardware
    n: int            # chunks
    kd: int           # key width of the tiles
    kg: int           # width of the per-chunk "total" columns (1 for scalar gates)
    block_v: int
    vd: int           # value width, padded to whole blocks

    @property
    def n_v(self):
        return self.vd // self.block_v


def tile_rows(chunk: int, target: str, *, sublanes: int = 8) -> int:
    """Rows of a chunk's tile: a multiple of the TPU's `sublanes` (16 where a 16-bit operand
    packs two rows per sublane), or a power of two >= 16 on GPU (Triton's tiles are powers
    of two, and its matmuls need every side >= 16)."""
    return round_up(chunk, sublanes) if target == "tpu" else max(16, pl.next_power_of_2(chunk))


def geometry(op: str, length: int, key_dim: int, value_dim: int, chunk: int, target: str,
             block_v: int, *, sublanes: int = 8, kg: int = 1) -> Geometry:
    """The tiles of a chunk walk over `length` steps in chunks of `chunk`; `block_v` the
    preferred value columns per program; `kg` the width of the per-chunk "total" columns
    (None: the key width)."""
    if target == "tpu":
        kd = key_dim
        block_v = min(block_v, value_dim)
    elif target == "cuda":
        kd = max(16, pl.next_power_of_2(key_dim))
        block_v = max(16, min(block_v, pl.next_power_of_2(value_dim)))
    else:
        raise ValueError(f"{op}: unknown Pallas target {target!r}")
    return Geometry(chunk=chunk, cp=tile_rows(chunk, target, sublanes=sublanes),
                    n=-(-length // chunk), kd=kd, kg=kd if kg is None else kg,
                    block_v=block_v, vd=round_up(value_dim, block_v))


def to_tiles(x, geo: Geometry, width: int, *, edge: bool = False):
    """Chunked [B, H, N, C, D] -> [B*H, N*Cp, width]; rows padded at each chunk's end (zeros, or
    the chunk's last row with edge=True), columns with zeros."""
    b, h, n, c, d = x.shape
    if geo.cp != c:
        x = jnp.pad(x, [(0, 0)] * 3 + [(0, geo.cp - c), (0, 0)],
                    mode="edge" if edge else "constant")
    if width != d:
        x = jnp.pad(x, [(0, 0)] * 4 + [(0, width - d)])
    return x.reshape(b * h, n * geo.cp, width)


def from_tiles(x, geo: Geometry, shape):
    """[B*H, N*Cp, width] -> [B, T, H, D] = `shape` (the inverse of to_chunks then to_tiles)."""
    b, t, h, d = shape
    x = x.reshape(b, h, geo.n, geo.cp, x.shape[-1])[:, :, :, :geo.chunk, :d]
    return from_chunks(x, t)


def rows(x, geo: Geometry, target: str):
    """[B*H, N*Cp, 1] -> per-chunk rows: [B*H, N, 1, Cp] (TPU) or [B*H, N, Cp] (GPU)."""
    x = x.reshape(x.shape[0], geo.n, geo.cp)
    return x[:, :, None, :] if target == "tpu" else x


def totals(total, geo: Geometry, target: str):
    """Per-chunk columns [B, H, N, w] (w <= kg) -> [B*H, N, kg, 1] (TPU) or [B*H, N*kg, 1]."""
    b, h, n, w = total.shape
    total = jnp.pad(total, [(0, 0)] * 3 + [(0, geo.kg - w)]).reshape(b * h, n, geo.kg, 1)
    return total if target == "tpu" else total.reshape(b * h, n * geo.kg, 1)


def state_in(x, geo: Geometry):
    """[B, H, K, V] -> [B*H, Kd, Vd], zero padded."""
    b, h, kdim, vdim = x.shape
    return jnp.pad(x, [(0, 0), (0, 0), (0, geo.kd - kdim), (0, geo.vd - vdim)]).reshape(
        b * h, geo.kd, geo.vd)


def states_in(x, geo: Geometry, target: str):
    """Per-chunk states [B, H, N, K, V] -> [B*H, N, Kd, Vd] (TPU) or [B*H, N*Kd, Vd] (GPU)."""
    b, h, n, kdim, vdim = x.shape
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, geo.kd - kdim), (0, geo.vd - vdim)])
    x = x.reshape(b * h, n, geo.kd, geo.vd)
    return x if target == "tpu" else x.reshape(b * h, n * geo.kd, geo.vd)


def states_out(x, geo: Geometry, shape):
    """The launch's per-chunk states -> [B, H, N, K, V] (`shape`), the padding dropped."""
    b, h, n, kdim, vdim = shape
    return x.reshape(b * h, n, geo.kd, geo.vd)[:, :, :kdim, :vdim].reshape(shape)


def state_out(x, shape):
    """[B*H, Kd, Vd] -> [B, H, K, V] (`shape`)."""
    b, h, kdim, vdim = shape
    return x[:, :kdim, :vdim].reshape(shape)


# ---------------------------------------------------------------------------------------------
# The dots of the kernel bodies. Their matmul algorithm is read when the bodies are traced
# (`launch` sets it): full float32 (HIGHEST) everywhere except compiled Triton, where HIGHEST
# means IEEE float32 dots that Triton expands into scalar FMA loops (minutes of compile time,
# 202 s for delta_rule's gated backward at head dim 64 on an H100, no tensor cores). There the
# dots are TF32x3 (three TF32 tensor-core products with the rounding errors fed back), about
# float32 accuracy: relative errors 1e-7 to 3e-6 against float64 on an H200. Interpreters run
# on the host's XLA, which takes HIGHEST.
_PRECISION = contextvars.ContextVar("memzoo_chunk_kernel_precision", default=_HIGHEST)


@contextlib.contextmanager
def matmuls(target: str, interpret):
    precision = (jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if target == "cuda" and not interpret
                 else _HIGHEST)
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


def dot_nt(a, b):
    """a @ b.T"""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


def dot_tn(a, b):
    """a.T @ b"""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_PRECISION.get(),
                               preferred_element_type=F32)


# ---------------------------------------------------------------------------------------------
# The launch: named operands, each of a kind that says how a chunk's tile is cut from it.
#   seq   [rows of every chunk, width]: the chunk's Cp rows
#   row   per-chunk rows [1, Cp]
#   total per-chunk columns [kg, 1]
#   state per-chunk states [Kd, Vb]
#   whole one tile for the whole walk (initial / final states)
# A width "v" means value columns: the program's block of them. On TPU the BlockSpecs cut the
# chunk's tile out; on GPU a program holds the whole sequence and slices it.


class Tiles:
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

        carry = step(Tiles(named, kinds, target, None, geo), scratch[...])
        scratch[...] = carry

        @pl.when(i == pl.num_programs(2) - 1)
        def _():
            named[finish][...] = carry.astype(named[finish].dtype)
    else:
        def body(i, carry):
            n = geo.n - 1 - i if reverse else i
            return step(Tiles(named, kinds, target, n, geo), carry)

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


def launch(step, inputs, outputs, *, init, finish, reverse, target, geo, bh, interpret, name,
           op):
    """Walk the chunks with `step(tiles, carry) -> carry` ([Kd, block_v] float32), the carry
    starting from input `init` and ending in output `finish` (both "whole").

    inputs: [(name, kind, width, array)]; outputs: [(name, kind, width, dtype, per_v_block)],
    per_v_block outputs get a leading value-block axis (what sums over V, summed outside).
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
        kinds=kinds, target=target, geo=geo, step=step, init=init, finish=finish,
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
        raise ValueError(f"{op}: unknown Pallas target {target!r}")
    with matmuls(target, interpret):
        return call(*[x for *_, x in inputs])


def forward(chunk_fn, inputs, h0, out_dtype, *, target, geo, bh, interpret, name, op):
    """The forward walk of a matrix-state op: `chunk_fn(tiles, s) -> (o, s_next)` per chunk from
    h0 [B*H, Kd, Vd]. Returns (o [B*H, N*Cp, Vd] in out_dtype, the final state [B*H, Kd, Vd],
    the state entering every chunk: the custom VJPs' residual)."""
    def step(t, s):
        t["states"] = s
        o, s_next = chunk_fn(t, s)
        t["o"] = o
        return s_next

    outputs = [("o", "seq", "v", out_dtype, False), ("final", "whole", "v", F32, False),
               ("states", "state", "v", F32, False)]
    return launch(step, inputs + [("h0", "whole", "v", h0)], outputs, init="h0", finish="final",
                  reverse=False, target=target, geo=geo, bh=bh, interpret=interpret, name=name,
                  op=op)


def float32_kernel(fn, h0, static):
    """fn with the op's static keywords for dispatch's `pallas=`, or None for 64-bit inputs (the
    kernels accumulate in float32, so "auto" keeps those on XLA; "pallas" refused them)."""
    if h0.dtype != F32:
        return None
    return functools.partial(fn, **static)


def split_16bit(x, dt, pieces):
    """float32 x as `pieces` terms in the 16-bit dtype dt, head first, each the rounding of what
    the previous ones leave (8 bits of mantissa each for bf16, 11 for f16): how the Mosaic GPU
    kernels feed float32 quantities to 16-bit WGMMAs."""
    out = []
    for _ in range(pieces):
        head = x.astype(dt)
        out.append(head)
        x = x - head.astype(jnp.float32)
    return out
