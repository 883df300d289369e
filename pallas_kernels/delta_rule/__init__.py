"""`delta_rule`: the (gated) delta rule, the fast-weight memory of DeltaNet, Gated DeltaNet and
the linear memories of Titans / Miras.

    S'_t = exp(g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T  = (I - beta_t k_t k_t^T) S'_t + beta_t k_t v_t^T
    o_t  = scale * S_t^T q_t

The math lives in reference.py; xla.py (chunked WY / UT form) and pallas.py must equal it
(tests/pallas_kernels/test_delta_rule.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks, _dispatch, _validation
from pallas_kernels.delta_rule import pallas as _pallas
from pallas_kernels.delta_rule import reference as _reference
from pallas_kernels.delta_rule import xla as _xla
from pallas_kernels.delta_rule.pallas import BlockSizes

__all__ = ["delta_rule", "BlockSizes", "DEFAULT_CHUNK_SIZE"]

_OP = "delta_rule"

DEFAULT_CHUNK_SIZE = 64


@_dispatch.sequence_parallel_op(_OP)
def delta_rule(q, k, v, beta, *, log_gate=None, initial_state=None, scale=None, segment_ids=None,
               chunk_size=None, implementation: str = "auto"):
    """The delta rule over time, per batch and head, with an optional scalar decay per head.

        S'_t = exp(g_t) S_{t-1}                 (g = log_gate, 0 when None)
        S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T
        o_t  = scale * S_t^T q_t                (the current token is included)

    The op does not normalise k: modules L2-normalise keys (with |k| = 1, beta in [0, 2] keeps
    the transition I - beta k k^T a contraction; beta > 1 is DeltaNet's negative-eigenvalue range).

    Args:
      q, k: [batch, time, heads, key_dim] (b t h k), floating.
      v: [batch, time, heads, value_dim] (b t h v), floating.
      beta: [batch, time, heads] writing strengths.
      log_gate: None or [batch, time, heads], values <= 0: the log of the decay in (0, 1]
        (Gated DeltaNet's alpha_t = exp(g_t)).
      initial_state: [batch, heads, key_dim, value_dim]; the state carried in (zeros if None).
      scale: the output scale; default key_dim ** -0.5.
      segment_ids: [batch, time] integers; the state resets to zero where the id changes, so
        packed documents never mix. `initial_state` enters the first segment only.
      chunk_size: the chunk length of the chunked forms (default 64); any positive integer,
        the sequence needs no padding by the caller.
      implementation: "auto" | "pallas" | "xla" | "reference" (pallas_kernels._dispatch).
        The Pallas kernels accumulate in float32: "auto" keeps 64-bit inputs on the XLA path,
        "pallas" with 64-bit inputs raises a ValueError.

    Returns:
      (o, final_state): o [batch, time, heads, value_dim] in the promoted dtype of q, k, v;
      final_state [batch, heads, key_dim, value_dim] in float32 (float64 for 64-bit inputs).
    """
    _dispatch.check_implementation(implementation, _OP)
    _validation.check_array(_OP, "q", q, ndim=4)
    _validation.check_array(_OP, "k", k, ndim=4)
    _validation.check_array(_OP, "v", v, ndim=4)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if _validation.is_complex(x.dtype):
            raise ValueError(f"{_OP}: `{name}` must be real floating, got {x.dtype}")
    batch, length, heads, key_dim = q.shape
    _validation.check_shape(_OP, "k", k, q.shape, "[batch, time, heads, key_dim] like q")
    if v.shape[:3] != (batch, length, heads):
        raise ValueError(f"{_OP}: `v` must have shape [batch, time, heads, value_dim] = "
                         f"{(batch, length, heads)} + (value_dim,), got {tuple(v.shape)}")
    value_dim = v.shape[3]
    _validation.check_array(_OP, "beta", beta, ndim=3)
    _validation.check_shape(_OP, "beta", beta, (batch, length, heads), "[batch, time, heads]")
    if _validation.is_complex(beta.dtype):
        raise ValueError(f"{_OP}: `beta` must be real floating, got {beta.dtype}")
    dtypes = [q.dtype, k.dtype, v.dtype, beta.dtype]
    if log_gate is not None:
        _validation.check_array(_OP, "log_gate", log_gate, ndim=3)
        _validation.check_shape(_OP, "log_gate", log_gate, (batch, length, heads),
                                "[batch, time, heads]")
        if _validation.is_complex(log_gate.dtype):
            raise ValueError(f"{_OP}: `log_gate` must be real floating, got {log_gate.dtype}")
        dtypes.append(log_gate.dtype)
    out_dtype = _validation.result_dtype(q.dtype, k.dtype, v.dtype)
    acc = _validation.accum_dtype(_validation.result_dtype(*dtypes))
    if implementation == "pallas" and acc != jnp.float32:
        raise ValueError(f"{_OP}: implementation='pallas' runs the Pallas kernels, which "
                         f"accumulate in float32; these inputs accumulate in {jnp.dtype(acc).name} "
                         "(64-bit inputs take implementation='auto' or 'xla')")
    if initial_state is None:
        h0 = jnp.zeros((batch, heads, key_dim, value_dim), acc)
    else:
        _validation.check_array(_OP, "initial_state", initial_state, ndim=4)
        _validation.check_shape(_OP, "initial_state", initial_state,
                                (batch, heads, key_dim, value_dim),
                                "[batch, heads, key_dim, value_dim]")
        if _validation.is_complex(initial_state.dtype):
            raise ValueError(f"{_OP}: `initial_state` must be real floating, "
                             f"got {initial_state.dtype}")
        h0 = initial_state.astype(acc)
    if scale is None:
        scale = key_dim ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{_OP}: `scale` must be a Python float, got {type(scale).__name__}")
    scale = float(scale)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{_OP}: `chunk_size` must be a positive int, got {chunk_size!r}")
    if segment_ids is not None:
        _validation.check_integer(_OP, "segment_ids", segment_ids, (batch, length),
                                  "[batch, time]")
        reset = _chunks.segment_starts(segment_ids)
    else:
        reset = jnp.zeros((batch, length), bool)

    q, k, v = (x.astype(out_dtype) for x in (q, k, v))
    gated = log_gate is not None
    g = log_gate.astype(acc) if gated else jnp.zeros((batch, length, heads), acc)
    beta = beta.astype(acc)
    if length == 0:
        return jnp.zeros((batch, 0, heads, value_dim), out_dtype), h0
    if implementation == "reference":
        # The specification, differentiated by JAX's autodiff: what the custom VJP is tested against.
        return _reference.delta_rule_reference(q, k, v, beta, g, h0, reset, scale=scale)
    return _delta(q, k, v, beta, g, h0, reset.astype(acc), scale, chunk_size, gated,
                  segment_ids is not None, implementation)


def _static(scale, chunk_size, gated, segmented):
    return dict(scale=scale, chunk_size=chunk_size, gated=gated, segmented=segmented)


def _pallas_for(fn, h0, static):
    """The Pallas callable, or None (the XLA path under "auto") for 64-bit inputs: the kernels
    accumulate in float32 ("pallas" with 64-bit inputs was refused by `delta_rule`)."""
    if h0.dtype != jnp.float32:
        return None
    return functools.partial(fn, **static)


_INPUTS = (("q", "b t h k"), ("k", "b t h k"), ("v", "b t h v"), ("beta", "b t h"),
           ("log_gate", "b t h"), ("initial_state", "b h k v"), ("segment_ids", "b t"))


def _partition(backward):
    """Batch, heads and value columns split (the delta update mixes key rows, never value
    columns); time, key_dim and the chunk axis stay whole. The q/k/beta/gate gradients sum over
    the value columns (the partitioner adds the cross-shard sum)."""
    if not backward:
        return _dispatch.Partition(_INPUTS, ("b t h v", "b h k v", "b h n k v"), whole="t k n")
    inputs = _INPUTS + (("chunk_states", "b h n k v"), ("d_out", "b t h v"),
                        ("d_final", "b h k v"))
    return _dispatch.Partition(
        inputs, ("b t h k", "b t h k", "b t h v", "b t h", "b t h", "b h k v"), whole="t k n")


def _forward(args, scale, chunk_size, gated, segmented, implementation):
    static = _static(scale, chunk_size, gated, segmented)
    return _dispatch.dispatch(
        _OP, implementation, *args,
        reference=functools.partial(_xla.delta_rule_forward, **static),
        xla=functools.partial(_xla.delta_rule_forward, **static),
        pallas=_pallas_for(_pallas.delta_rule_forward, args[5], static),
        partition=_partition(backward=False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _delta(q, k, v, beta, g, h0, reset, scale, chunk_size, gated, segmented, implementation):
    o, final, _ = _forward((q, k, v, beta, g, h0, reset), scale, chunk_size, gated, segmented,
                           implementation)
    return o, final


def _delta_fwd(q, k, v, beta, g, h0, reset, scale, chunk_size, gated, segmented, implementation):
    args = (q, k, v, beta, g, h0, reset)
    o, final, states = _forward(args, scale, chunk_size, gated, segmented, implementation)
    # Residuals: the inputs and the state entering each chunk; the backward rebuilds the
    # intra-chunk T, W, U~ rather than keeping them.
    return (o, final), (args, states)


def _delta_bwd(scale, chunk_size, gated, segmented, implementation, residuals, cotangents):
    args, states = residuals
    do, dfinal = cotangents
    static = _static(scale, chunk_size, gated, segmented)
    xla_bwd = functools.partial(_xla.delta_rule_backward, **static)
    # Each path's backward takes the chunk states its own forward wrote (the Pallas kernels run
    # the op's chunks, padded at their ends: the same states).
    grads = _dispatch.dispatch(
        _OP, implementation, *args, states, do, dfinal,
        reference=xla_bwd, xla=xla_bwd,
        pallas=_pallas_for(_pallas.delta_rule_backward, args[5], static),
        partition=_partition(backward=True))
    return tuple(grads) + (jnp.zeros_like(args[6]),)


_delta.defvjp(_delta_fwd, _delta_bwd)
