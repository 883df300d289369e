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
