"""The specification of `causal_conv1d`: the one-token update, scanned over time.

    window_t = [x_{t-W+1}, ..., x_t]      (the W-1 older entries come from the carried state)
    y_t      = act(sum_i weight[i] * window_t[i] + bias)
    state_t  = window_t[1:]               (the last W-1 inputs)

`conv_step` is also the arithmetic of the public `causal_conv1d_update` (one home for it).
A segment start empties the carried window, so inputs of earlier segments are never seen.
"""
import jax
import jax.numpy as jnp


def apply_activation(y, activation):
    if activation is None:
        return y
    return jax.nn.silu(y)  # "silu" / "swish": validated by the public op


def conv_step(x_t, state, weight, bias, activation):
    """x_t [B, C]; state [B, W-1, C] in the accumulation dtype; weight [W, C]; bias [C] or None.

    Returns (y_t [B, C] in the accumulation dtype, new state [B, W-1, C]).
    """
    acc = state.dtype
    window = jnp.concatenate([state, x_t.astype(acc)[:, None, :]], axis=1)
    y = jnp.sum(window * weight.astype(acc)[None], axis=1)
    if bias is not None:
        y = y + bias.astype(acc)[None, :]
    return apply_activation(y, activation), window[:, 1:]


def causal_conv1d_reference(x, weight, bias, state, reset, *, activation, out_dtype):
    """x [B, T, C]; state [B, W-1, C] (accumulation dtype); reset [B, T] bool or None."""
    if reset is None:
        reset = jnp.zeros(x.shape[:2], bool)

    def step(state, inputs):
        x_t, reset_t = inputs
        state = jnp.where(reset_t[:, None, None], jnp.zeros_like(state), state)
        y, state = conv_step(x_t, state, weight, bias, activation)
        return state, y.astype(out_dtype)

    final, ys = jax.lax.scan(step, state, (jnp.swapaxes(x, 0, 1), jnp.swapaxes(reset, 0, 1)))
    return jnp.swapaxes(ys, 0, 1), final
