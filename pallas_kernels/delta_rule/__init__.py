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
        _validation.check_real(_OP, name, x)
    batch, length, heads, key_dim = q.shape
    _validation.check_shape(_OP, "k", k, q.shape, "[batch, time, heads, key_dim] like q")
    _validation.check_values(_OP, v, batch, length, heads)
    value_dim = v.shape[3]
    _validation.check_array(_OP, "beta", beta, ndim=3)
    _validation.check_shape(_OP, "beta", beta, (batch, length, heads), "[batch, time, heads]")
    _validation.check_real(_OP, "beta", beta)
    dtypes = [q.dtype, k.dtype, v.dtype, beta.dtype]
    if log_gate is not None:
        _validation.check_array(_OP, "log_gate", log_gate, ndim=3)
        _validation.check_shape(_OP, "log_gate", log_gate, (batch, length, heads),
                                "[batch, time, heads]")
        _validation.check_real(_OP, "log_gate", log_gate)
        dtypes.append(log_gate.dtype)
    out_dtype = _validation.result_dtype(q.dtype, k.dtype, v.dtype)
    acc = _validation.accum_dtype(_validation.result_dtype(*dtypes))
    _validation.check_pallas_accumulation(_OP, implementation, acc)
    h0, scale, chunk_size, reset = _validation.matrix_state_arguments(
        _OP, length=length, state_shape=(batch, heads, key_dim, value_dim), acc=acc,
        initial_state=initial_state, scale=scale, chunk_size=chunk_size,
        default_chunk_size=DEFAULT_CHUNK_SIZE, segment_ids=segment_ids)

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
        pallas=_chunks.float32_kernel(_pallas.delta_rule_forward, args[5], static),
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
        pallas=_chunks.float32_kernel(_pallas.delta_rule_backward, args[5], static),
        partition=_partition(backward=True))
    return tuple(grads) + (jnp.zeros_like(args[6]),)


_delta.defvjp(_delta_fwd, _delta_bwd)
