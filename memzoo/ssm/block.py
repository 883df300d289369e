"""The block around an SSM core (S4D, S5): norm, core, activation, dropout, output map, residual.

    pre-norm:   y = x + drop(out(drop(act(core(norm(x))))))
    post-norm:  y = norm(x + drop(out(drop(act(core(x))))))

Everything but the core acts per token, so the block's `step` and prefill are the core's with
the same per-token maps around it. The core computes in float32 and returns `dtype`.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from memzoo import layers

NORM_PLACEMENTS = ("pre", "post", "none")
OUTPUTS = ("glu", "linear", "none")


class SSMBlock(nnx.Module):
    def __init__(self, d_model: int, core: nnx.Module, *, activation: str = "gelu",
                 output: str = "glu", dropout: float = 0.0, norm: str = "pre",
                 norm_type: str = "layernorm", residual: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"{type(self).__name__}: norm must be one of {NORM_PLACEMENTS}, "
                             f"got {norm!r}")
        if output not in OUTPUTS:
            raise ValueError(f"{type(self).__name__}: output must be one of {OUTPUTS}, "
                             f"got {output!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        self.d_model, self.norm_placement, self.residual, self.dtype = d_model, norm, residual, dtype
        self.core = core
        self.act = layers.get_activation(activation)
        self.norm = (layers.norm(norm_type, d_model, dtype=dtype, rngs=rngs) if norm != "none"
                     else None)
        if output == "glu":
            self.out = layers.GLU(d_model, d_model, activation="sigmoid", dtype=dtype, rngs=rngs)
        elif output == "linear":
            self.out = layers.Linear(d_model, d_model, axes=("embed", "embed"), dtype=dtype,
                                     rngs=rngs)
        else:
            self.out = None
        # Only built when used: an idle Dropout would still add an RNG stream to the state.
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    @property
    def bidirectional(self) -> bool:
        return self.core.bidirectional

    def _pre(self, x):
        return self.norm(x) if self.norm_placement == "pre" else x

    def _post(self, x, y):
        y = self.act(y)
        if self.dropout is not None:
            y = self.dropout(y)
        if self.out is not None:
            y = self.out(y)
        if self.dropout is not None:
            y = self.dropout(y)
        y = y.astype(self.dtype)
        if self.residual:
            y = y + x.astype(self.dtype)
        if self.norm_placement == "post":
            y = self.norm(y)
        return y

    def init_cache(self, batch_size: int):
        return self.core.init_cache(batch_size)

    def step(self, x_t, cache):
        name = type(self).__name__
        layers.check_input(f"{name}.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        y, cache = self.core.step(self._pre(x_t), cache)
        return self._post(x_t, y), cache

    def __call__(self, x, cache=None, *, segment_ids=None):
        layers.check_input(type(self).__name__, "x", x, ndim=3, width=self.d_model)
        if cache is None:
            return self._post(x, self.core(self._pre(x), segment_ids=segment_ids))
        y, cache = self.core(self._pre(x), cache=cache, segment_ids=segment_ids)
        return self._post(x, y), cache
