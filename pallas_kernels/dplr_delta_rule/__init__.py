"""`dplr_delta_rule`: the diagonal-plus-low-rank (generalised delta rule) recurrence, the memory of
RWKV-7 and of fla's generalized delta rule.

    S_t = (diag(exp(w_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

The delta rule is the special case a_t = -beta_t k_t, b_t = exp(g_t) k_t, a written key
beta_t k_t and w_t = g_t on every channel (tests/pallas_kernels/test_dplr_delta_rule.py checks it
against `delta_rule`). The math lives in reference.py; xla.py (chunked WY / UT form with
per-channel decays) and pallas.py must equal it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks, _dispatch, _validation
from pallas_kernels.dplr_delta_rule import pallas as _pallas
from pallas_kernels.dplr_delta_rule import reference as _reference
from pallas_kernels.dplr_delta_rule import xla as _xla
from pallas_kernels.dplr_delta_rule.pallas import BlockSizes

__all__ = ["dplr_delta_rule", "BlockSizes", "DEFAULT_CHUNK_SIZE"]

_OP = "dplr_delta_rule"

DEFAULT_CHUNK_SIZE = 64


@_dispatch.sequence_parallel_op(_OP)
def dplr_delta_rule(q, k, v, a, b, *, log_decay=None, initial_state=None, scale=None,
                    segment_ids=None, chunk_size=None, implementation: str = "auto"):
    """The diagonal-plus-low-rank delta rule over time, per batch and head.

        S'_t = 0 where a segment starts, else S_{t-1}
        S_t  = diag(exp(w_t)) S'_t + a_t (b_t^T S'_t) + k_t v_t^T     (w = log_decay, 0 if None)
        o_t  = scale * S_t^T q_t                                         (the current token included)

    The op normalises nothing; the transition diag(exp(w)) + a b^T is stable where the caller
    makes it so (RWKV-7: a = -eta * kappa, b = kappa with |kappa| = 1, eta in [0, 1]; fla's
    kernel contracts its `a` with the state, so its a / b appear swapped against this op's).

    Args:
      q, k, a, b: [batch, time, heads, key_dim] (b t h k), real floating.
      v: [batch, time, heads, value_dim] (b t h v), real floating.
      log_decay: None, [batch, time, heads, key_dim] or [batch, time, heads] (one decay per
        head, broadcast over key_dim): the log of the per-key-channel decay, values <= 0.
      initial_state: [batch, heads, key_dim, value_dim]; the state carried in (zeros if None).
      scale: the output scale; default key_dim ** -0.5.
      segment_ids: [batch, time] integers; the state resets to zero where the id changes, so
        packed documents never mix. `initial_state` enters the first segment only.
      chunk_size: the chunk length of the chunked forms (default 64); any positive integer,
        the sequence needs no padding by the caller.
      implementation: "auto" | "pallas" | "xla" | "reference" (pallas_kernels._dispatch).
        The Pallas kernels accumulate in float32: "auto" keeps 64-bit inputs on the XLA path,
        "pallas" with 64-bit inputs raises a ValueError. The backward runs on XLA, from the
        chunk states the forward (kernel or XLA) wrote.

    Returns:
      (o, final_state): o [batch, time, heads, value_dim] in the promoted dtype of q, k, v, a, b;
      final_state [batch, heads, key_dim, value_dim] in float32 (float64 for 64-bit inputs).
    """
    _dispatch.check_implementation(implementation, _OP)
    _validation.check_array(_OP, "q", q, ndim=4)
    for name, x in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b)):
        _validation.check_array(_OP, name, x, ndim=4)
        _validation.check_real(_OP, name, x)
    batch, length, heads, key_dim = q.shape
    for name, x in (("k", k), ("a", a), ("b", b)):
        _validation.check_shape(_OP, name, x, q.shape, "[batch, time, heads, key_dim] like q")
    _validation.check_values(_OP, v, batch, length, heads)
    value_dim = v.shape[3]
    dtypes = [q.dtype, k.dtype, v.dtype, a.dtype, b.dtype]
    if log_decay is not None:
        _validation.check_array(_OP, "log_decay", log_decay)
        _validation.check_real(_OP, "log_decay", log_decay)
        if log_decay.shape not in ((batch, length, heads, key_dim), (batch, length, heads)):
            raise ValueError(f"{_OP}: `log_decay` must have shape [batch, time, heads, key_dim] "
                             f"= {(batch, length, heads, key_dim)} or [batch, time, heads] = "
                             f"{(batch, length, heads)}, got {tuple(log_decay.shape)}")
        dtypes.append(log_decay.dtype)
    out_dtype = _validation.result_dtype(*dtypes[:5])
    acc = _validation.accum_dtype(_validation.result_dtype(*dtypes))
    _validation.check_pallas_accumulation(_OP, implementation, acc)
    h0, scale, chunk_size, reset = _validation.matrix_state_arguments(
        _OP, length=length, state_shape=(batch, heads, key_dim, value_dim), acc=acc,
        initial_state=initial_state, scale=scale, chunk_size=chunk_size,
        default_chunk_size=DEFAULT_CHUNK_SIZE, segment_ids=segment_ids)

    q, k, v, a, b = (x.astype(out_dtype) for x in (q, k, v, a, b))
    if log_decay is None:
        w = jnp.zeros(q.shape, acc)
    else:
        w = log_decay.astype(acc)
        if w.ndim == 3:
            w = jnp.broadcast_to(w[..., None], q.shape)
    if length == 0:
        return jnp.zeros((batch, 0, heads, value_dim), out_dtype), h0
    if implementation == "reference":
        # The specification, differentiated by JAX's autodiff: what the custom VJP is tested against.
        return _reference.dplr_reference(q, k, v, a, b, w, h0, reset, scale=scale)
    return _dplr(q, k, v, a, b, w, h0, reset.astype(acc), scale, chunk_size,
                 segment_ids is not None, implementation)


def _static(scale, chunk_size, segmented):
    return dict(scale=scale, chunk_size=chunk_size, segmented=segmented)


_INPUTS = (("q", "b t h k"), ("k", "b t h k"), ("v", "b t h v"), ("a", "b t h k"),
           ("b", "b t h k"), ("log_decay", "b t h k"), ("initial_state", "b h k v"),
           ("segment_ids", "b t"))


def _partition():
    """Batch, heads and value columns split (the transition mixes key rows, never value
    columns); time, key_dim and the chunk axis stay whole."""
    return _dispatch.Partition(_INPUTS, ("b t h v", "b h k v", "b h n k v"), whole="t k n")


def _forward(args, scale, chunk_size, segmented, implementation):
    static = _static(scale, chunk_size, segmented)
    xla = functools.partial(_xla.dplr_forward, **static)
    return _dispatch.dispatch(_OP, implementation, *args, reference=xla, xla=xla,
                              pallas=_chunks.float32_kernel(_pallas.dplr_forward, args[6], static),
                              partition=_partition())


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _dplr(q, k, v, a, b, w, h0, reset, scale, chunk_size, segmented, implementation):
    o, final, _ = _forward((q, k, v, a, b, w, h0, reset), scale, chunk_size, segmented,
                           implementation)
    return o, final


def _dplr_fwd(q, k, v, a, b, w, h0, reset, scale, chunk_size, segmented, implementation):
    args = (q, k, v, a, b, w, h0, reset)
    o, final, states = _forward(args, scale, chunk_size, segmented, implementation)
    # Residuals: the inputs and the state entering each chunk; the backward rebuilds every
    # chunk's T, W, U~ and pair matrices rather than keeping them.
    return (o, final), (args, states)


def _dplr_bwd(scale, chunk_size, segmented, implementation, residuals, cotangents):
    args, states = residuals
    do, dfinal = cotangents
    # The backward is the XLA pass on every platform, from the chunk states of whichever
    # forward ran (the Pallas kernels run the op's chunks: the same states).
    grads = _xla.dplr_backward(*args, states, do, dfinal, **_static(scale, chunk_size, segmented))
    return tuple(grads) + (jnp.zeros_like(args[7]),)


_dplr.defvjp(_dplr_fwd, _dplr_bwd)
