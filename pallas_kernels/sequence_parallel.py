"""Sequence parallelism for the state-carrying ops: the time axis split over a mesh axis.

Every op here carries a state whose map is affine in the initial state:

    final(S0) = M . S0 + final(0)          out_t(S0) = out_t(0) + (a term linear in S0)

so with time split into n shards, each shard runs its part from a zero state and computes its
transition M; the n pairs (M, final(0)) are all-gathered (small: one state each) and combined in
order (an exclusive scan over the shards, n steps of state size) into every shard's carried-in
state S_in; each shard then corrects its output:

    op                         M (per shard)                      output correction
    linear_scan                prod a_t  (segment starts: 0)      h_t += (prod_{s<=t} a_s) S_in
    chunked_linear_attention   exp(sum g_t), per key for vector   o_t += scale (q_t * exp(b_t)) . S_in,
                               gates (segment starts: 0)          b_t = sum_{s<=t} g_s
    delta_rule                 prod_t exp(g_t)(I - beta k k^T)    rerun the shard from S_in
                               (K x K): the final state of the
                               op on (k, v=0) from S0 = I
    dplr_delta_rule            prod_t (diag(e^w_t) + a_t b_t^T)   as delta_rule

Cost per shard, against the unsplit op on T/n steps: linear_scan one cumprod (elementwise) more;
linear attention one [T/n, K] x [K, V] product per head more (like one chunk of the op's own
intra-chunk work). The delta rule's M is not diagonal and its per-step prefix products would be
K x K per token, so its shard runs the op twice: once on v' = [v, 0] (V + K value columns) from
S0 = [0, I], whose final state holds both final(0) and M (value columns evolve independently),
and once on v from S_in for the output: (2V + K) / V op-runs of T/n steps, about 3x the work of
one shard for V = K, for a latency of T/n steps instead of T.

Segment ids work across shard boundaries: each shard also publishes its first and last id, and
the state carried into a shard is zeroed when its first id differs from the previous shard's
last (the next shard's first, for a reverse scan). The global `initial_state` enters shard 0.

The backward is JAX's autodiff through `shard_map`, `all_gather` and the ops' own custom VJPs
(the transposed collectives sum the cotangents of the carried states back onto their shards).

Two ways in:

* `sequence_parallel_linear_scan` / `..._chunked_linear_attention` / `..._delta_rule`: the op's
  own signature plus `axis_name=`, called inside a `shard_map` in which `axis_name` is manual
  and every time-indexed argument is the local shard (in order along the axis). The shard_map
  needs `check_vma=False`: Pallas calls carry no varying-axes types. The returned final state
  is the global one, the same on every shard (an out_spec without the axis).
* `with pallas_kernels.sequence_parallel("sequence"):` the public ops, traced inside while the
  current mesh (`jax.set_mesh`, or `mesh=`) has the axis with size > 1, run themselves through
  `jax.shard_map` over that axis only (batch and head axes stay automatic: GSPMD keeps them as
  the surrounding shardings say). The setting is read at trace time, like `pallas_interpret`:
  build fresh jitted functions inside the context.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import _chunks, _dispatch, _validation

__all__ = ["sequence_parallel", "sequence_parallel_linear_scan",
           "sequence_parallel_chunked_linear_attention", "sequence_parallel_delta_rule",
           "sequence_parallel_dplr_delta_rule",
           "sharded_calls"]


@dataclasses.dataclass(frozen=True)
class Setting:
    axis_name: str
    mesh: Any = None


@contextlib.contextmanager
def sequence_parallel(axis_name: str = "sequence", *, mesh=None):
    """Inside, the state-carrying public ops split time over mesh axis `axis_name` when the mesh
    (`mesh`, else the one set by `jax.set_mesh`) has that axis with size > 1; otherwise (no such
    axis, size 1, or already inside a shard_map over it) they run as usual."""
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"sequence_parallel: axis_name must be a mesh axis name, got "
                         f"{axis_name!r}")
    token = _dispatch.set_sequence_parallel(Setting(axis_name, mesh))
    try:
        yield
    finally:
        _dispatch.reset_sequence_parallel(token)


# How many times each op took the sharded path while being traced: tests read it to know the
# shard_map path ran rather than the plain op under GSPMD.
_SHARDED_CALLS: dict[str, int] = {}


def sharded_calls(op: str | None = None):
    return dict(_SHARDED_CALLS) if op is None else _SHARDED_CALLS.get(op, 0)


# --- the shared machinery ----------------------------------------------------------------------

def _raw(name: str) -> Callable:
    """The public op without the hook (the shards run it on local data)."""
    fn = getattr(importlib.import_module(f"pallas_kernels.{name}"), name)
    return getattr(fn, "__wrapped__", fn)


def _alive(segment_ids, length, batch, reverse=False):
    """[batch, time] float32: 1 while no segment has started since the shard's first step (in the
    direction of the scan), i.e. where the carried-in state still reaches."""
    if segment_ids is None:
        return jnp.ones((batch, length), jnp.float32)
    return (_chunks.segment_runs(segment_ids, reverse=reverse) == 0).astype(jnp.float32)


def _boundary_resets(segment_ids, axis_name, n, reverse):
    """[n, batch] bool: the state carried into shard j is cut (a new segment starts there)."""
    firsts = jax.lax.all_gather(segment_ids[:, 0], axis_name)
    lasts = jax.lax.all_gather(segment_ids[:, -1], axis_name)
    # The shards' edge ids in time order, [batch, 2n] = f0 l0 f1 l1 ...: a shard's start (its
    # first id; its last one for a reverse scan) is a segment start of that sequence.
    edges = jnp.stack([firsts, lasts], axis=1).reshape(2 * n, -1).T
    starts = _chunks.segment_starts(edges, reverse=reverse)
    return (starts[:, 1::2] if reverse else starts[:, 0::2]).T


def _carry_in(transition, final0, initial_state, combine, *, axis_name, segment_ids,
              reverse=False):
    """(this shard's carried-in state, the global final state).

    transition, final0: this shard's M and final state from zero; combine(M, S) = M . S.
    The combine runs over all shards on every device (n is small): an exclusive scan in the
    direction of time; the resulting global final state is made invariant over the axis.
    """
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    ms = jax.lax.all_gather(transition, axis_name)
    fs = jax.lax.all_gather(final0, axis_name)
    resets = (None if segment_ids is None
              else _boundary_resets(segment_ids, axis_name, n, reverse))
    carry = (jnp.zeros_like(final0) if initial_state is None
             else initial_state.astype(final0.dtype))
    ins = [None] * n
    for j in (reversed(range(n)) if reverse else range(n)):
        if resets is not None:
            cut = resets[j].reshape(resets.shape[1:] + (1,) * (carry.ndim - 1))
            carry = jnp.where(cut, jnp.zeros_like(carry), carry)
        ins[j] = carry
        carry = combine(ms[j], carry) + fs[j]
    mine = jax.lax.dynamic_index_in_dim(jnp.stack(ins), idx, axis=0, keepdims=False)
    # Every device computed the same total from the same gathered values: it leaves the
    # shard_map as a replicated output (check_vma=False divides its cotangent among the devices
    # and the all_gathers' transposes add the shares back up).
    return mine, carry


# --- per-op shard functions (inside a shard_map over axis_name) --------------------------------

def sequence_parallel_linear_scan(a, b, *, initial_state=None, reverse: bool = False,
                                  segment_ids=None, implementation: str = "auto",
                                  axis_name: str):
    """`linear_scan` on this device's shard of time; `initial_state` is the global one (the
    same on every shard). Returns (h of this shard, the global final state)."""
    op = _raw("linear_scan")
    h, final0 = op(a, b, reverse=reverse, segment_ids=segment_ids,
                   implementation=implementation)
    batch, length, _ = b.shape
    acc = final0.dtype
    alive = _alive(segment_ids, length, batch, reverse).astype(acc)
    # prod_{s<=t} a_s from the shard's first step: how S_in reaches h_t.
    reach = jax.lax.cumprod(a.astype(acc), axis=1, reverse=reverse) * alive[..., None]
    transition = reach[:, 0] if reverse else reach[:, -1]
    s_in, final = _carry_in(transition, final0, initial_state, jnp.multiply,
                            axis_name=axis_name, segment_ids=segment_ids, reverse=reverse)
    h = (h.astype(acc) + reach * s_in[:, None]).astype(h.dtype)
    return h, final


def sequence_parallel_chunked_linear_attention(q, k, v, *, log_gate=None, initial_state=None,
                                               scale=None, segment_ids=None, chunk_size=None,
                                               implementation: str = "auto", axis_name: str):
    """`chunked_linear_attention` on this device's shard of time (see the module docstring)."""
    op = _raw("chunked_linear_attention")
    o, final0 = op(q, k, v, log_gate=log_gate, scale=scale, segment_ids=segment_ids,
                   chunk_size=chunk_size, implementation=implementation)
    batch, length, heads, key_dim = q.shape
    acc = final0.dtype
    if scale is None:
        scale = key_dim ** -0.5
    alive = _alive(segment_ids, length, batch).astype(acc)
    if log_gate is None:
        reach = jnp.broadcast_to(alive[:, :, None, None], (batch, length, heads, 1))
    else:
        g = log_gate.astype(acc)
        g = g[..., None] if g.ndim == 3 else g
        reach = jnp.exp(jnp.cumsum(g, axis=1)) * alive[:, :, None, None]
    transition = reach[:, -1]                                  # [B, H, K or 1]
    s_in, final = _carry_in(transition, final0, initial_state,
                            lambda m, s: m[..., None] * s, axis_name=axis_name,
                            segment_ids=segment_ids)
    correction = jnp.einsum("bthk,bhkv->bthv", q.astype(acc) * reach, s_in,
                            precision=jax.lax.Precision.HIGHEST)
    o = (o.astype(acc) + scale * correction).astype(o.dtype)
    return o, final


def _matrix_state_shard(op, q, k, v, rest, *, initial_state, segment_ids, axis_name, out_dtype,
                        kw):
    """The delta-rule-like ops (a K x K transition of the state per token) on this device's
    shard of time. Value columns of the state evolve independently, so one run on [v, 0] from
    [0, I] gives final(0) in the first V columns and the transition M (= M . I) in the last K;
    a second run from the carried-in state gives the output."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    v_ext = jnp.concatenate(
        [v.astype(out_dtype), jnp.zeros((batch, length, heads, key_dim), out_dtype)], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(key_dim), (batch, heads, key_dim, key_dim))
    probe = jnp.concatenate([jnp.zeros((batch, heads, key_dim, value_dim)), eye], axis=-1)
    _, ext = op(q, k, v_ext, *rest, initial_state=probe, segment_ids=segment_ids, **kw)
    final0, transition = ext[..., :value_dim], ext[..., value_dim:]
    s_in, final = _carry_in(
        transition, final0, initial_state,
        lambda m, s: jnp.einsum("bhij,bhjv->bhiv", m, s, precision=jax.lax.Precision.HIGHEST),
        axis_name=axis_name, segment_ids=segment_ids)
    o, _ = op(q, k, v, *rest, initial_state=s_in, segment_ids=segment_ids, **kw)
    return o, final


def sequence_parallel_delta_rule(q, k, v, beta, *, log_gate=None, initial_state=None, scale=None,
                                 segment_ids=None, chunk_size=None, implementation: str = "auto",
                                 axis_name: str):
    """`delta_rule` on this device's shard of time (see the module docstring for the cost)."""
    return _matrix_state_shard(
        _raw("delta_rule"), q, k, v, (beta,), initial_state=initial_state,
        segment_ids=segment_ids, axis_name=axis_name,
        out_dtype=_validation.result_dtype(q.dtype, k.dtype, v.dtype),
        kw=dict(log_gate=log_gate, scale=scale, chunk_size=chunk_size,
                implementation=implementation))


def sequence_parallel_dplr_delta_rule(q, k, v, a, b, *, log_decay=None, initial_state=None,
                                      scale=None, segment_ids=None, chunk_size=None,
                                      implementation: str = "auto", axis_name: str):
    """`dplr_delta_rule` on this device's shard of time, as the delta rule."""
    return _matrix_state_shard(
        _raw("dplr_delta_rule"), q, k, v, (a, b), initial_state=initial_state,
        segment_ids=segment_ids, axis_name=axis_name,
        out_dtype=_validation.result_dtype(q.dtype, k.dtype, v.dtype, a.dtype, b.dtype),
        kw=dict(log_decay=log_decay, scale=scale, chunk_size=chunk_size,
                implementation=implementation))


# --- the hook: public ops under `sequence_parallel(...)` ----------------------------------------

# op -> (shard function, names of the time-indexed array arguments, of the replicated ones)
_OPS: dict[str, tuple[Callable, tuple[str, ...], tuple[str, ...]]] = {
    "linear_scan": (sequence_parallel_linear_scan, ("a", "b", "segment_ids"),
                    ("initial_state",)),
    "chunked_linear_attention": (sequence_parallel_chunked_linear_attention,
                                 ("q", "k", "v", "log_gate", "segment_ids"), ("initial_state",)),
    "delta_rule": (sequence_parallel_delta_rule,
                   ("q", "k", "v", "beta", "log_gate", "segment_ids"), ("initial_state",)),
    "dplr_delta_rule": (sequence_parallel_dplr_delta_rule,
                        ("q", "k", "v", "a", "b", "log_decay", "segment_ids"), ("initial_state",)),
}


def _usable_mesh(setting: Setting):
    mesh = setting.mesh if setting.mesh is not None else jax.sharding.get_abstract_mesh()
    name = setting.axis_name
    if mesh is None or name not in getattr(mesh, "axis_names", ()):
        return None
    if mesh.shape[name] <= 1:
        return None
    abstract = jax.sharding.get_abstract_mesh()
    if name in getattr(abstract, "manual_axes", ()):   # already inside a shard_map over it
        return None
    return mesh


def run(op: str, fn: Callable, setting: Setting, args, kwargs):
    """The hook's body (called by `_dispatch.sequence_parallel_op`): the op through shard_map,
    or NotImplemented when the current mesh does not split `setting.axis_name`."""
    mesh = _usable_mesh(setting)
    if mesh is None:
        return NotImplemented
    shard_fn, timed, replicated = _OPS[op]
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    # The op's own checks (ValueErrors naming the argument), at trace time, on the whole arrays.
    jax.eval_shape(functools.partial(fn, **bound.arguments))
    params = dict(bound.arguments)
    axis = setting.axis_name
    n = mesh.shape[axis]
    length = params[timed[0]].shape[1]
    if length % n:
        raise ValueError(f"{op}: under sequence_parallel({axis!r}) the time axis ({length}) must "
                         f"divide into the {n} shards of mesh axis {axis!r}")
    names = [k for k in (*timed, *replicated) if params.get(k) is not None]
    arrays = [params.pop(k) for k in names]
    specs = tuple(P(None, axis) if k in timed else P() for k in names)

    def body(*local):
        return shard_fn(**dict(zip(names, local)), **params, axis_name=axis)

    sharded = jax.shard_map(body, mesh=setting.mesh, in_specs=specs,
                            out_specs=(P(None, axis), P()), axis_names={axis},
                            check_vma=False)
    _SHARDED_CALLS[op] = _SHARDED_CALLS.get(op, 0) + 1
    return sharded(*arrays)
