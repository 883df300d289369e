"""Jitted entry points for tests: one XLA compile per module and shape costs far less CPU than
eager op-by-op dispatch, which on the shared 2-core machine dominated the suite's time."""
from flax import nnx


@nnx.jit
def forward(mixer, x):
    return mixer(x)


@nnx.jit
def prefill(mixer, x, cache):
    return mixer(x, cache=cache)


@nnx.jit
def step(mixer, x_t, cache):
    return mixer.step(x_t, cache)


def prefill_then_decode(mixer, x, t1, cache):
    """Prefill x[:, :t1] from `cache`, then decode the rest token by token: [b, t, d] out."""
    import jax.numpy as jnp
    y_prefill, cache = prefill(mixer, x[:, :t1], cache)
    decoded = []
    for t in range(t1, x.shape[1]):
        y_t, cache = step(mixer, x[:, t], cache)
        decoded.append(y_t)
    return jnp.concatenate([y_prefill, *[y[:, None] for y in decoded]], axis=1)
