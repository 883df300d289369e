"""`linear_scan`: the diagonal linear recurrence h_t = a_t * h_{t-1} + b_t.

Used by S4D's recurrent mode, S5, the HiPPO cells and (later) Titans' momentum and decay scans.
The math lives in reference.py; xla.py and pallas.py must equal it (tests/pallas_kernels).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks, _dispatch, _validation
from pallas_kernels.linear_scan import pallas as _pallas
from pallas_kernels.linear_scan import reference as _reference
from pallas_kernels.linear_scan import xla as _xla
from pallas_kernels.linear_scan.pallas import BlockSizes

__all__ = ["linear_scan", "BlockSizes"]

_OP = "linear_scan"


@_dispatch.sequence_parallel_op(_OP)
def linear_scan(a, b, *, initial_state=None, reverse: bool = False, segment_ids=None,
                implementation: str = "auto"):
    """Diagonal linear recurrence over time, real or complex.

        h_t = a_t * h_{t-1} + b_t      (h_{-1} = initial_state, or 0)
        reverse=True:  h_t = a_t * h_{t+1} + b_t  (h_T = initial_state)

    Args:
      a: decays, [batch, time, channels] (b t d), floating or complex.
      b: inputs, [batch, time, channels], floating or complex.
      initial_state: [batch, channels]; the state carried in from a previous call.
      reverse: run from the last step to the first.
      segment_ids: [batch, time] integers; the state resets to zero where the id changes from
        one step to the next (in the direction of the scan), so packed documents never mix.
        `initial_state` still enters the first step: it is the carry of that first segment.
      implementation: "auto" | "pallas" | "xla" | "reference" (pallas_kernels._dispatch).

    Returns:
      (h, final_state): h [batch, time, channels] in the promoted dtype of a and b; final_state
      [batch, channels] in float32 (complex64; 64-bit inputs keep 64 bits): the state after the
      last step of the scan (t = T-1, or t = 0 when reverse), ready to be passed on.

    >>> import jax.numpy as jnp
    >>> h, last = linear_scan(jnp.full((1, 3, 1), 0.5), jnp.ones((1, 3, 1)))
    >>> h[0, :, 0].tolist()
    [1.0, 1.5, 1.75]
    """
    _dispatch.check_implementation(implementation, _OP)
    _validation.check_array(_OP, "a", a, ndim=3)
    _validation.check_array(_OP, "b", b, ndim=3)
    if a.shape != b.shape:
        raise ValueError(f"{_OP}: `a` and `b` must have the same shape [batch, time, channels], "
                         f"got a {tuple(a.shape)} and b {tuple(b.shape)}")
    batch, length, width = b.shape
    dtype = _validation.result_dtype(a.dtype, b.dtype)
    acc = _validation.accum_dtype(dtype)
    if initial_state is None:
        h0 = jnp.zeros((batch, width), acc)
    else:
        _validation.check_array(_OP, "initial_state", initial_state, ndim=2)
        _validation.check_shape(_OP, "initial_state", initial_state, (batch, width),
                                "[batch, channels]")
        if _validation.is_complex(initial_state.dtype) and not _validation.is_complex(dtype):
            raise ValueError(f"{_OP}: `initial_state` is complex but `a` and `b` are real")
        h0 = initial_state.astype(acc)
    a = a.astype(dtype)
    b = b.astype(dtype)
    if segment_ids is not None:
        _validation.check_integer(_OP, "segment_ids", segment_ids, (batch, length),
                                  "[batch, time]")
        # A segment start in the scan's direction cuts a_t: the carry does not reach step t.
        a = jnp.where(_chunks.segment_starts(segment_ids, reverse=reverse)[..., None],
                      jnp.zeros_like(a), a)
    if length == 0 or width == 0:
        # Nothing to scan: an empty time axis, or no channels (e.g. a memory whose flattened
        # leaves are empty), which would give the kernels a zero-width block.
        return b, h0
    if implementation == "reference":
        # The specification, differentiated by JAX's autodiff: what the custom VJP is tested against.
        return _reference.linear_scan_reference(a, b, h0, reverse=reverse)
    return _scan(a, b, h0, reverse, implementation)


def _forward(a, b, h0, reverse, implementation):
    return _dispatch.dispatch(
        _OP, implementation, a, b, h0,
        reference=functools.partial(_reference.linear_scan_reference, reverse=reverse),
        xla=functools.partial(_xla.linear_scan_forward, reverse=reverse),
        pallas=functools.partial(_pallas.linear_scan_forward, reverse=reverse),
        partition=_dispatch.Partition(
            (("a", "b t c"), ("b", "b t c"), ("initial_state", "b c")),
            ("b t c", "b c"), whole="t"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(a, b, h0, reverse, implementation):
    return _forward(a, b, h0, reverse, implementation)


def _scan_fwd(a, b, h0, reverse, implementation):
    h, h_final = _forward(a, b, h0, reverse, implementation)
    # Residuals: the inputs' decays and the output itself; the backward needs h_{t-1}, which is
    # the output shifted by one, so nothing beyond the primal output is kept.
    return (h, h_final), (a, h, h0)


def _scan_bwd(reverse, implementation, residuals, cotangents):
    a, h, h0 = residuals
    dh, dh_final = cotangents
    dh = dh.astype(h.dtype)
    dh_final = dh_final.astype(h0.dtype)
    xla_bwd = functools.partial(_xla.linear_scan_backward, reverse=reverse)
    # implementation="reference" never reaches the custom VJP (autodiff differentiates it).
    return _dispatch.dispatch(
        _OP, implementation, a, h, h0, dh, dh_final, reference=xla_bwd, xla=xla_bwd,
        pallas=functools.partial(_pallas.linear_scan_backward, reverse=reverse),
        partition=_dispatch.Partition(
            (("a", "b t c"), ("h", "b t c"), ("initial_state", "b c"), ("dh", "b t c"),
             ("dh_final", "b c")),
            ("b t c", "b t c", "b c"), whole="t"))


_scan.defvjp(_scan_fwd, _scan_bwd)
