"""`chunked_linear_attention`: gated linear attention with a matrix state, chunked.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ;   o_t = scale * S_t^T q_t   (current token included)

Used by linear attention, RetNet, GLA, Mamba-2 SSD, Mixture-of-Memories and Hebbian memories.
The math lives in reference.py; xla.py and pallas.py must equal it (tests/pallas_kernels).

`bonus=u` ([heads, key_dim]) gives RWKV-6's read instead (Peng et al., 2024, "Eagle and Finch"):
the previous state plus a per-channel bonus for the current token,

    o_t = scale * (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t),   S_t as above.

It is a composition, not a kernel: the op run on k, v and g shifted one step later in time
(k'_t = k_{t-1}, v'_t = v_{t-1}, g'_t = g_{t-1}; k' = 0 at t = 0 and at each document start)
has S'_t = S_{t-1} exactly (S'_0 = initial_state, then the same recurrence one step behind;
a document's first S' is 0, as its S_{-1} is), so o'_t = scale S_{t-1}^T q_t; the bonus is
elementwise, and the final state is one more step, S_{T-1} = diag(exp g_{T-1}) S'_{T-1} +
k_{T-1} v_{T-1}^T. Every implementation, the VJPs, the partition rules and sequence
parallelism (the shift happens on the whole sequence, before any split) are inherited.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks, _dispatch, _validation
from pallas_kernels.chunked_linear_attention import pallas as _pallas
from pallas_kernels.chunked_linear_attention import reference as _reference
from pallas_kernels.chunked_linear_attention import xla as _xla
from pallas_kernels.chunked_linear_attention.pallas import BlockSizes

__all__ = ["chunked_linear_attention", "BlockSizes"]

_OP = "chunked_linear_attention"


def chunked_linear_attention(q, k, v, *, log_gate=None, initial_state=None, scale=None,
                             segment_ids=None, chunk_size=None, implementation: str = "auto",
                             bonus=None):
    """Causal linear attention with an optional data-dependent decay, over [B, T, H, dim].

        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T      (S_{-1} = initial_state, or 0)
        o_t = scale * S_t^T q_t                        (bonus None)
        o_t = scale * (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t)   (bonus=u: RWKV-6)

    Args:
      q, k: queries and keys [batch, time, heads, key_dim], real floating.
      v: values [batch, time, heads, value_dim], real floating.
      log_gate: None (no decay), [batch, time, heads] (one decay per head and step: RetNet,
        Mamba-2, simple GLA) or [batch, time, heads, key_dim] (a decay per key: GLA). Values
        must be <= 0 (the log of a decay in (0, 1]); any magnitude is safe (-1e4 works, the fast
        paths only exponentiate differences that are <= 0).
      initial_state: [batch, heads, key_dim, value_dim]; the state carried in from a previous call.
      scale: multiplies the queries; defaults to key_dim ** -0.5. A number or a 0-d array.
      segment_ids: [batch, time] integers; the state resets to zero where the id changes, so
        packed documents never mix. `initial_state` still enters the first step.
      chunk_size: tokens per chunk of the chunked forms (default 64 on the XLA path); any length
        works, padding happens inside.
      implementation: "auto" | "pallas" | "xla" | "reference" (pallas_kernels._dispatch).
      bonus: None, or u [heads, key_dim], real floating: RWKV-6's read of the previous state
        plus the current token weighted per key channel by u (module docstring). The final
        state is S_{T-1} either way, so calls continue one another.

    Returns:
      (o, final_state): o [batch, time, heads, value_dim] in the promoted dtype of q, k and v;
      final_state [batch, heads, key_dim, value_dim] in float32 (float64 for 64-bit inputs).

    >>> import jax.numpy as jnp
    >>> o, s = chunked_linear_attention(jnp.ones((1, 2, 1, 1)), jnp.ones((1, 2, 1, 1)),
    ...                                 jnp.ones((1, 2, 1, 1)), scale=1.0)
    >>> o[0, :, 0, 0].tolist()
    [1.0, 2.0]
    """
    kw = dict(initial_state=initial_state, scale=scale, segment_ids=segment_ids,
              chunk_size=chunk_size, implementation=implementation)
    if bonus is None:
        return _gated(q, k, v, log_gate=log_gate, **kw)
    return _with_bonus(q, k, v, log_gate, bonus, kw)


def _with_bonus(q, k, v, log_gate, bonus, kw):
    """RWKV-6's read by the shifted-input composition (module docstring)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _validation.check_array(_OP, name, x, ndim=4)
    if log_gate is not None:
        _validation.check_array(_OP, "log_gate", log_gate)
        if log_gate.ndim not in (3, 4):
            raise ValueError(f"{_OP}: `log_gate` must have shape [batch, time, heads] or "
                             f"[batch, time, heads, key_dim], got {tuple(log_gate.shape)}")
    _validation.check_array(_OP, "bonus", bonus, ndim=2)
    _check_real("bonus", bonus)
    batch, length, heads, kdim = q.shape
    _validation.check_shape(_OP, "bonus", bonus, (heads, kdim), "[heads, key_dim]")
    if length == 0:
        return _gated(q, k, v, log_gate=log_gate, **kw)

    def later(x):
        """x one step later in time, zero at t = 0 (and at document starts, for keys)."""
        return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)

    k_prev = later(k)
    if kw["segment_ids"] is not None:
        _validation.check_integer(_OP, "segment_ids", kw["segment_ids"], (batch, length),
                                  "[batch, time]")
        # Zero keys where a document starts: the op resets its state there and adds k' v'^T,
        # which must then be the previous document's nothing, not its last token.
        starts = _chunks.segment_starts(kw["segment_ids"])
        k_prev = jnp.where(starts[:, :, None, None], jnp.zeros_like(k_prev), k_prev)
    o, s = _gated(q, k_prev, later(v), log_gate=None if log_gate is None else later(log_gate),
                  **kw)
    acc = s.dtype
    dtype = o.dtype
    scale = kdim ** -0.5 if kw["scale"] is None else kw["scale"]
    scale = jnp.asarray(scale, acc)
    k_t, v_t = k.astype(acc), v.astype(acc)
    # Elementwise, not a dot: TPU dots default to bfloat16 passes.
    weight = jnp.sum(q.astype(acc) * bonus.astype(acc)[None, None] * k_t, axis=-1)
    o = (o.astype(acc) + scale * weight[..., None] * v_t).astype(dtype)
    # The last token's write: S_{T-1} = diag(exp g_{T-1}) S'_{T-1} + k_{T-1} v_{T-1}^T.
    if log_gate is not None:
        g_last = log_gate[:, -1].astype(acc)
        g_last = g_last[..., None] if g_last.ndim == 2 else g_last
        s = jnp.exp(g_last)[..., None] * s
    s = s + k_t[:, -1, :, :, None] * v_t[:, -1, :, None, :]
    return o, s


@_dispatch.sequence_parallel_op(_OP)
def _gated(q, k, v, *, log_gate=None, initial_state=None, scale=None, segment_ids=None,
           chunk_size=None, implementation: str = "auto"):
    """The op without the bonus (its docstring: `chunked_linear_attention`); sequence
    parallelism hooks in here, on the whole (already shifted) sequence."""
    _dispatch.check_implementation(implementation, _OP)
    _validation.check_array(_OP, "q", q, ndim=4)
    _validation.check_array(_OP, "k", k, ndim=4)
    _validation.check_array(_OP, "v", v, ndim=4)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_real(name, x)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"{_OP}: `k` must have the shape of `q` [batch, time, heads, key_dim] = "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    batch, length, heads, kdim = q.shape
    if tuple(v.shape[:3]) != (batch, length, heads):
        raise ValueError(f"{_OP}: `v` must have shape [batch, time, heads, value_dim] with "
                         f"[batch, time, heads] = {(batch, length, heads)}, got {tuple(v.shape)}")
    vdim = v.shape[3]
    dtype = _validation.result_dtype(q.dtype, k.dtype, v.dtype)
    acc = _validation.accum_dtype(dtype)

    g = None
    if log_gate is not None:
        _validation.check_array(_OP, "log_gate", log_gate)
        _check_real("log_gate", log_gate)
        if tuple(log_gate.shape) == (batch, length, heads):
            g = log_gate[..., None]
        elif tuple(log_gate.shape) == (batch, length, heads, kdim):
            g = log_gate
        else:
            raise ValueError(
                f"{_OP}: `log_gate` must have shape [batch, time, heads] = {(batch, length, heads)} "
                f"or [batch, time, heads, key_dim] = {(batch, length, heads, kdim)}, "
                f"got {tuple(log_gate.shape)}")
        g = g.astype(acc)

    if initial_state is None:
        h0 = jnp.zeros((batch, heads, kdim, vdim), acc)
    else:
        _validation.check_array(_OP, "initial_state", initial_state, ndim=4)
        _check_real("initial_state", initial_state)
        _validation.check_shape(_OP, "initial_state", initial_state, (batch, heads, kdim, vdim),
                                "[batch, heads, key_dim, value_dim]")
        h0 = initial_state.astype(acc)

    if scale is None:
        scale = kdim ** -0.5
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale = float(scale)
    elif not (hasattr(scale, "shape") and hasattr(scale, "dtype") and scale.ndim == 0
              and jnp.issubdtype(scale.dtype, jnp.floating)):
        raise ValueError(f"{_OP}: `scale` must be a real number or a 0-d floating array, "
                         f"got {getattr(scale, 'shape', type(scale).__name__)}")

    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral)
                                   or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{_OP}: `chunk_size` must be a positive integer, got {chunk_size!r}")

    starts = None
    if segment_ids is not None:
        _validation.check_integer(_OP, "segment_ids", segment_ids, (batch, length),
                                  "[batch, time]")
        starts = _chunks.segment_starts(segment_ids)

    # The scale is folded into the queries in the accumulation dtype: every implementation then
    # computes o_t = S_t^T q_t, and a traced scale gets its gradient from this product.
    q = q.astype(acc) * jnp.asarray(scale, acc)
    k = k.astype(dtype)
    v = v.astype(dtype)
    if length == 0:
        return jnp.zeros((batch, 0, heads, vdim), dtype), h0
    if implementation == "reference":
        # The specification, differentiated by JAX's autodiff: what the custom VJP is tested against.
        o, s = _reference.reference(q, k, v, g, h0, starts)
        return o.astype(dtype), s
    # The fast paths take the starts as int32 (an integer operand of the custom VJP, no
    # cotangent).
    reset = None if starts is None else starts.astype(jnp.int32)
    o, s = _attention(q, k, v, g, h0, reset, chunk_size, implementation)
    return o.astype(dtype), s


def _check_real(name, x):
    if _validation.is_complex(x.dtype):
        raise ValueError(f"{_OP}: `{name}` must have a real floating dtype, got {x.dtype}")


def _pallas_for(fn, h0, chunk_size, implementation):
    """The Pallas callable, except that "auto" keeps 64-bit inputs on the XLA path (the kernels
    accumulate in float32; "pallas" asked explicitly says so)."""
    if implementation == "auto" and h0.dtype != jnp.float32:
        return None
    return functools.partial(fn, chunk_size=chunk_size)


def _partition(g, reset, backward):
    """Batch, heads and value columns split (each column of the state is its own recurrence);
    time, key_dim and the chunk axis of the saved states stay whole. The key/gate gradients
    sum over the value columns (the partitioner adds the cross-shard sum)."""
    gate = None if g is None else ("b t h k" if g.shape[-1] > 1 else "b t h one")
    inputs = [("q", "b t h k"), ("k", "b t h k"), ("v", "b t h v"), ("log_gate", gate),
              ("initial_state", "b h k v"), ("segment_ids", None if reset is None else "b t")]
    if not backward:
        return _dispatch.Partition(tuple(inputs), ("b t h v", "b h k v", "b h n k v"),
                                   whole="t k n one")
    inputs += [("chunk_states", "b h n k v"), ("d_out", "b t h v"), ("d_final", "b h k v")]
    return _dispatch.Partition(
        tuple(inputs), ("b t h k", "b t h k", "b t h v", gate, "b h k v"), whole="t k n one")


def _forward(q, k, v, g, h0, reset, chunk_size, implementation):
    """(o, final_state, per-chunk start states) from the chosen fast path."""
    xla = functools.partial(_xla.forward_with_states, chunk_size=chunk_size)
    return _dispatch.dispatch(_OP, implementation, q, k, v, g, h0, reset, reference=xla, xla=xla,
                              pallas=_pallas_for(_pallas.forward, h0, chunk_size, implementation),
                              partition=_partition(g, reset, backward=False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, g, h0, reset, chunk_size, implementation):
    o, final, _ = _forward(q, k, v, g, h0, reset, chunk_size, implementation)
    return o, final


def _attention_fwd(q, k, v, g, h0, reset, chunk_size, implementation):
    o, final, starts = _forward(q, k, v, g, h0, reset, chunk_size, implementation)
    # Residuals: the inputs and the state entering each chunk; the intra-chunk matrices are
    # recomputed by the backward.
    return (o, final), (q, k, v, g, h0, reset, starts)


def _attention_bwd(chunk_size, implementation, residuals, cotangents):
    q, k, v, g, h0, reset, starts = residuals
    do, dfinal = cotangents
    xla_bwd = functools.partial(_xla.backward, chunk_size=chunk_size)
    # implementation="reference" never reaches the custom VJP (autodiff differentiates it).
    grads = _dispatch.dispatch(
        _OP, implementation, q, k, v, g, h0, reset, starts, do, dfinal, reference=xla_bwd,
        xla=xla_bwd, pallas=_pallas_for(_pallas.backward, h0, chunk_size, implementation),
        partition=_partition(g, reset, backward=True))
    return (*grads, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
