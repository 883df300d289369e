"""`selective_scan`: Mamba-1's selective state-space recurrence (S6), discretisation fused in.

    dt_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias without delta_softplus)
    h_t  = exp(dt_t A) h_{t-1} + dt_t B_t u_t
    y_t  = (C_t . h_t + D u_t) * silu(z_t)

The [batch, time, channels, state] tensors exp(dt A) and dt B u are never materialised for the
whole sequence: every implementation forms them one step (or one block of steps) at a time.
The math lives in reference.py; xla.py and pallas.py must equal it
(tests/pallas_kernels/test_selective_scan.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks, _dispatch, _validation
from pallas_kernels.selective_scan import reference as _reference
from pallas_kernels.selective_scan import pallas as _pallas_mod
from pallas_kernels.selective_scan import xla as _xla
from pallas_kernels.selective_scan.pallas import BlockSizes

__all__ = ["selective_scan", "BlockSizes"]

_OP = "selective_scan"


def _check_real(name, x, ndim=None):
    _validation.check_array(_OP, name, x, ndim=ndim)
    if _validation.is_complex(x.dtype):
        raise ValueError(f"{_OP}: `{name}` must be real floating, got {x.dtype}")


def selective_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                   delta_softplus: bool = False, initial_state=None, segment_ids=None,
                   implementation: str = "auto"):
    """The selective scan of Mamba-1, per batch, channel and state entry.

    Args:
      u: inputs, [batch, time, channels] (b t c), real floating.
      delta: discretisation steps before bias and softplus, [batch, time, channels].
      A: [channels, state] (c n) real, negative for a stable recurrence.
      B, C: input and output projections, [batch, time, state] or grouped
        [batch, time, groups, state] (b t g n); channel c uses group c // (channels / groups).
      D: [channels] skip weights, or None.
      z: [batch, time, channels] gate, or None: the output is multiplied by silu(z).
      delta_bias: [channels] added to delta, or None.
      delta_softplus: apply softplus to delta + delta_bias.
      initial_state: [batch, channels, state]; the state carried in (zeros if None).
      segment_ids: [batch, time] integers; the state resets to zero where the id changes, so
        packed documents never mix. `initial_state` enters the first segment only.
      implementation: "auto" | "pallas" | "xla" | "reference" (pallas_kernels._dispatch).

    Returns:
      (y, final_state): y [batch, time, channels] in the promoted dtype of u, delta, B, C and z
      (parameters A, D, delta_bias do not widen it); final_state [batch, channels, state] in
      float32 (float64 when the inputs are 64-bit).
    """
    _dispatch.check_implementation(implementation, _OP)
    _check_real("u", u, 3)
    batch, length, channels = u.shape
    legend = "[batch, time, channels]"
    _check_real("delta", delta, 3)
    _validation.check_shape(_OP, "delta", delta, u.shape, legend)
    _check_real("A", A, 2)
    if A.shape[0] != channels:
        raise ValueError(f"{_OP}: `A` must have shape [channels, state] = ({channels}, N), "
                         f"got {tuple(A.shape)}")
    state = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        _check_real(name, x)
        if x.ndim == 3:
            expected = (batch, length, state)
        elif x.ndim == 4:
            expected = (batch, length, x.shape[2], state)
        else:
            raise ValueError(f"{_OP}: `{name}` must have shape [batch, time, state] or "
                             f"[batch, time, groups, state], got {tuple(x.shape)}")
        if tuple(x.shape) != expected or (x.ndim == 4 and (
                x.shape[2] < 1 or channels % x.shape[2])):
            raise ValueError(
                f"{_OP}: `{name}` must have shape [batch, time, state] = {(batch, length, state)} "
                f"or [batch, time, groups, state] with groups dividing channels={channels}, "
                f"got {tuple(x.shape)}")
    b = B if B.ndim == 4 else B[:, :, None, :]
    c = C if C.ndim == 4 else C[:, :, None, :]
    if b.shape[2] != c.shape[2]:
        raise ValueError(f"{_OP}: `B` and `C` must have the same number of groups, got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    activations = [u.dtype, delta.dtype, B.dtype, C.dtype]
    params = [A.dtype]
    if D is not None:
        _check_real("D", D, 1)
        _validation.check_shape(_OP, "D", D, (channels,), "[channels]")
        params.append(D.dtype)
    if delta_bias is not None:
        _check_real("delta_bias", delta_bias, 1)
        _validation.check_shape(_OP, "delta_bias", delta_bias, (channels,), "[channels]")
        params.append(delta_bias.dtype)
    if z is not None:
        _check_real("z", z, 3)
        _validation.check_shape(_OP, "z", z, u.shape, legend)
        activations.append(z.dtype)
    if not isinstance(delta_softplus, bool):
        raise ValueError(f"{_OP}: `delta_softplus` must be a bool, got {delta_softplus!r}")
    out_dtype = _validation.result_dtype(*activations)
    acc = _validation.accum_dtype(_validation.result_dtype(*activations, *params))
    if initial_state is None:
        h0 = jnp.zeros((batch, channels, state), acc)
    else:
        _check_real("initial_state", initial_state, 3)
        _validation.check_shape(_OP, "initial_state", initial_state, (batch, channels, state),
                                "[batch, channels, state]")
        h0 = initial_state.astype(acc)
    keep = jnp.ones((batch, length), acc)
    if segment_ids is not None:
        _validation.check_integer(_OP, "segment_ids", segment_ids, (batch, length),
                                  "[batch, time]")
        keep = jnp.where(_chunks.segment_starts(segment_ids), 0.0, 1.0).astype(acc)
    if length == 0:
        return jnp.zeros((batch, 0, channels), out_dtype), h0

    dt = delta.astype(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(acc)[None, None, :]
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    uf = u.astype(acc)
    args = (dt, uf, b.astype(acc), c.astype(acc), A.astype(acc), h0, keep)
    if implementation == "reference":
        # The specification, differentiated by JAX's autodiff: what the custom VJP is tested against.
        y, h_final = _reference.selective_scan_reference(*args)
    else:
        # u, B, C of one 16-bit dtype reach the Mosaic GPU kernel in it (their float32 copies are
        # exact widenings, which XLA folds away), halving its reads of them; dt is formed in
        # float32 and stays so.
        tiles = (jnp.dtype(u.dtype) if jnp.dtype(u.dtype).itemsize == 2
                 and u.dtype == B.dtype == C.dtype and acc == jnp.float32 else None)
        y, h_final = _scan(*args, implementation, tiles)
    if D is not None:
        y = y + D.astype(acc)[None, None, :] * uf
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    return y.astype(out_dtype), h_final


def _pallas(dt, u, b, c, a, h0, keep, *, target, interpret, tiles=None):
    if target == "cuda" and _dispatch.use_mosaic_gpu(interpret):
        from pallas_kernels.selective_scan import mosaic_gpu   # Hopper: TMA-pipelined walk
        if mosaic_gpu.supports(u, b, h0):
            if tiles is not None:
                u, b, c = (x.astype(tiles) for x in (u, b, c))
            return mosaic_gpu.selective_scan_forward(dt, u, b, c, a, h0, keep, interpret=interpret)
        interpret = _dispatch.triton_interpret(interpret)
    if not _pallas_mod.supported(target, u.shape[2], b.shape[2]):
        # Groups too narrow for the target's channel tiling (TPU: 128 lanes per group).
        return _xla.selective_scan_forward(dt, u, b, c, a, h0, keep, save_states=True)
    return _pallas_mod.selective_scan_forward(dt, u, b, c, a, h0, keep, target=target,
                                              interpret=interpret)


def _xla_with_states(*args):
    return _xla.selective_scan_forward(*args, save_states=True)


def _forward_with_states(args, implementation, tiles=None):
    return _dispatch.dispatch(_OP, implementation, *args, reference=_xla_with_states,
                              xla=_xla_with_states, pallas=functools.partial(_pallas, tiles=tiles),
                              partition=_PARTITION)


# Batch and channels split (every channel is its own recurrence); the groups of B and C follow
# the channels (channel c reads group c // (channels / groups)); time, state and the segment
# axis of the checkpoints stay whole.
_PARTITION = _dispatch.Partition(
    (("delta", "b t c"), ("u", "b t c"), ("B", "b t g n"), ("C", "b t g n"), ("A", "c n"),
     ("initial_state", "b c n"), ("segment_ids", "b t")),
    ("b t c", "b c n", "b s n c"), whole="t n s", tied=(("g", "c"),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _scan(dt, u, b, c, a, h0, keep, implementation, tiles):
    args = (dt, u, b, c, a, h0, keep)
    if implementation == "xla":
        return _xla.selective_scan_forward(*args)
    return _forward_with_states(args, implementation, tiles)[:2]


def _scan_fwd(dt, u, b, c, a, h0, keep, implementation, tiles):
    # Residuals: the inputs and the state at the start of every segment (xla.py), never the
    # per-step states. Every implementation's forward writes the same checkpoints.
    y, h_final, saved = _forward_with_states((dt, u, b, c, a, h0, keep), implementation, tiles)
    return (y, h_final), (dt, u, b, c, a, keep, saved)


def _scan_bwd(implementation, tiles, residuals, cotangents):
    # The backward is the XLA pass on every platform (no Pallas backward kernel yet).
    dt, u, b, c, a, keep, saved = residuals
    dy, dh_final = cotangents
    grads = _xla.selective_scan_backward(dt, u, b, c, a, keep, saved, dy.astype(u.dtype),
                                         dh_final.astype(saved.dtype))
    return grads + (jnp.zeros_like(keep),)


_scan.defvjp(_scan_fwd, _scan_bwd)
