"""`causal_conv1d`: the depthwise causal convolution in front of Mamba's, Mamba-2's and the
linear-attention layers' mixers, with the carried window that decoding continues from.

    y_t = act(bias + sum_{i<W} weight[i] * x_{t-W+1+i})      (weight[W-1] multiplies x_t)

`causal_conv1d_update` is the same arithmetic for one token (reference.conv_step). The math lives
in reference.py; xla.py and pallas.py must equal it (tests/pallas_kernels/test_causal_conv1d.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _chunks, _dispatch, _validation
from pallas_kernels.causal_conv1d import pallas as _pallas
from pallas_kernels.causal_conv1d import reference as _reference
from pallas_kernels.causal_conv1d import xla as _xla
from pallas_kernels.causal_conv1d.pallas import BlockSizes

__all__ = ["causal_conv1d", "causal_conv1d_update", "ACTIVATIONS", "BlockSizes"]

_OP = "causal_conv1d"
ACTIVATIONS = (None, "silu", "swish")


def _check_real(op, name, x, ndim):
    _validation.check_array(op, name, x, ndim=ndim)
    if _validation.is_complex(x.dtype):
        raise ValueError(f"{op}: `{name}` must be real floating, got {x.dtype}")


def _check_common(op, weight, bias, activation, channels):
    _check_real(op, "weight", weight, 2)
    if weight.shape[1] != channels or weight.shape[0] < 1:
        raise ValueError(f"{op}: `weight` must have shape [width, channels] = (W, {channels}) "
                         f"with W >= 1, got {tuple(weight.shape)}")
    if bias is not None:
        _check_real(op, "bias", bias, 1)
        _validation.check_shape(op, "bias", bias, (channels,), "[channels]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
    dtypes = [weight.dtype] + ([bias.dtype] if bias is not None else [])
    return dtypes


def causal_conv1d(x, weight, *, bias=None, initial_state=None, activation=None, segment_ids=None,
                  implementation: str = "auto"):
    """Depthwise causal 1-D convolution over time with a carried window.

    Args:
      x: [batch, time, channels] (b t c), real floating.
      weight: [width, channels] (w c); weight[W-1] multiplies the current token.
      bias: [channels] or None.
      initial_state: [batch, width-1, channels]: the last W-1 inputs before x (zeros if None).
      activation: None | "silu" (alias "swish"), applied after the bias.
      segment_ids: [batch, time] integers; where the id changes a new document starts and
        inputs of earlier segments (and the initial state) leave the window. `initial_state`
        belongs to the first segment.
      implementation: "auto" | "pallas" | "xla" | "reference" (pallas_kernels._dispatch).

    Returns:
      (y, final_state): y [batch, time, channels] in the promoted dtype of x, weight and bias;
      final_state [batch, width-1, channels] in that dtype promoted to float32 at least: the last
      W-1 inputs of the last segment (zeros where that segment is shorter), ready for
      `causal_conv1d_update` or the next call's `initial_state`.
    """
    _dispatch.check_implementation(implementation, _OP)
    _check_real(_OP, "x", x, 3)
    batch, length, channels = x.shape
    dtypes = [x.dtype] + _check_common(_OP, weight, bias, activation, channels)
    width = weight.shape[0]
    out_dtype = _validation.result_dtype(*dtypes)
    acc = _validation.accum_dtype(out_dtype)
    if initial_state is None:
        state = jnp.zeros((batch, width - 1, channels), acc)
    else:
        _check_real(_OP, "initial_state", initial_state, 3)
        _validation.check_shape(_OP, "initial_state", initial_state, (batch, width - 1, channels),
                                "[batch, width-1, channels]")
        state = initial_state.astype(acc)
    back = None
    if segment_ids is not None:
        _validation.check_integer(_OP, "segment_ids", segment_ids, (batch, length),
                                  "[batch, time]")
    if length == 0:
        return jnp.zeros((batch, 0, channels), out_dtype), state
    if implementation == "reference":
        reset = None if segment_ids is None else _chunks.segment_starts(segment_ids)
        return _reference.causal_conv1d_reference(x, weight, bias, state, reset,
                                                  activation=activation, out_dtype=out_dtype)
    if segment_ids is not None:
        back = _xla.visible_history(segment_ids, width)
    final = _xla.final_window(x, state, back)
    if implementation == "xla":
        # Autodiff of the taps stores nothing per step: no custom VJP needed.
        y = _xla.causal_conv1d_forward(x, weight, bias, state, back, activation=activation,
                                       out_dtype=out_dtype)
    else:
        y = _conv(x, weight, bias, state, back, activation, out_dtype, implementation)
    return y, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _conv(x, weight, bias, state, back, activation, out_dtype, implementation):
    xla = functools.partial(_xla.causal_conv1d_forward, activation=activation,
                            out_dtype=out_dtype)
    pallas = functools.partial(_pallas.causal_conv1d_forward, activation=activation,
                               out_dtype=out_dtype)
    # Batch and channels split (a depthwise filter); time and the taps stay whole.
    partition = _dispatch.Partition(
        (("x", "b t c"), ("weight", "w c"), ("bias", None if bias is None else "c"),
         ("initial_state", "b s c"), ("segment_ids", None if back is None else "b t")),
        "b t c", whole="t w s")
    return _dispatch.dispatch(_OP, implementation, x, weight, bias, state, back,
                              reference=xla, xla=xla, pallas=pallas, partition=partition)


def _conv_fwd(x, weight, bias, state, back, activation, out_dtype, implementation):
    y = _conv(x, weight, bias, state, back, activation, out_dtype, implementation)
    return y, (x, weight, bias, state, back)


def _conv_bwd(activation, out_dtype, implementation, residuals, dy):
    # The backward on every platform: autodiff of the XLA taps (recomputed, nothing stored).
    x, weight, bias, state, back = residuals
    _, vjp = jax.vjp(lambda x, w, b, s: _xla.causal_conv1d_forward(
        x, w, b, s, back, activation=activation, out_dtype=out_dtype), x, weight, bias, state)
    return vjp(dy) + (None,)


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_conv1d_update(x, state, weight, *, bias=None, activation=None):
    """One decoding step of `causal_conv1d`: equal to it called on one token.

    Args:
      x: [batch, channels], the new token.
      state: [batch, width-1, channels], the last W-1 inputs (a `final_state`).
      weight, bias, activation: as in `causal_conv1d`.

    Returns:
      (y [batch, channels] in the promoted dtype of x, weight and bias, new_state
      [batch, width-1, channels] in that dtype promoted to float32 at least).
    """
    op = "causal_conv1d_update"
    _check_real(op, "x", x, 2)
    batch, channels = x.shape
    dtypes = [x.dtype] + _check_common(op, weight, bias, activation, channels)
    width = weight.shape[0]
    out_dtype = _validation.result_dtype(*dtypes)
    acc = _validation.accum_dtype(out_dtype)
    _check_real(op, "state", state, 3)
    _validation.check_shape(op, "state", state, (batch, width - 1, channels),
                            "[batch, width-1, channels]")
    y, new_state = _reference.conv_step(x, state.astype(acc), weight, bias, activation)
    return y.astype(out_dtype), new_state
