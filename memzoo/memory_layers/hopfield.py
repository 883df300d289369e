"""Modern Hopfield retrieval (Ramsauer et al., 2020, "Hopfield Networks is All You Need").

With stored patterns X = [x_1 .. x_N] (columns) and a state (query) pattern xi, one update is

    xi_new = X softmax(beta X^T xi)

which descends the energy E(xi) = -lse(beta, X^T xi) + xi^T xi / 2 (+ constants) and, for
well-separated patterns and large beta, retrieves the stored pattern nearest to xi in one step.
`hopfield_retrieve` is that update, `hopfield_energy` the energy (the tests check the descent).

`Hopfield` is the layer around it, in one of two modes:
  * stored (default): learned patterns [num_patterns, pattern_dim] are the memory; the token's
    query W_q x is updated `update_steps` times and projected back, W_o xi. A per-token layer.
  * over the input (`__call__(x, memory=y)` or `associate_input=True`): the patterns are the
    projected input tokens themselves, keys Y W_k and values Y W_v (Ramsauer's Hopfield layer,
    an associative attention with inverse temperature beta), causal by default so that a token
    reads only itself and earlier tokens.
beta defaults to 1 / sqrt(pattern_dim), the attention scaling.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers


def hopfield_retrieve(patterns, xi, beta, steps: int = 1):
    """patterns [..., N, d] (rows are the stored x_i), xi [..., d] -> xi after `steps` updates."""
    for _ in range(steps):
        p = jax.nn.softmax(beta * jnp.einsum("...nd,...d->...n", patterns, xi), axis=-1)
        xi = jnp.einsum("...n,...nd->...d", p, patterns)
    return xi


def hopfield_energy(patterns, xi, beta):
    """E(xi) = -lse(beta, X^T xi) / beta + xi^T xi / 2 (Ramsauer et al., eq. 2, constants dropped)."""
    scores = beta * jnp.einsum("...nd,...d->...n", patterns, xi)
    return -jax.nn.logsumexp(scores, axis=-1) / beta + 0.5 * jnp.sum(xi * xi, axis=-1)


class Hopfield(nnx.Module):
    """[..., d_model] -> [..., d_model] (module docstring).

    >>> hop = Hopfield(8, num_patterns=16, rngs=nnx.Rngs(0))
    >>> hop(jnp.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(self, d_model: int, *, num_patterns: int = 64, pattern_dim: int | None = None,
                 beta: float | None = None, update_steps: int = 1, associate_input: bool = False,
                 causal: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        for name, v in (("d_model", d_model), ("num_patterns", num_patterns),
                        ("update_steps", update_steps)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Hopfield: `{name}` must be an integer >= 1, got {v!r}")
        pattern_dim = pattern_dim or d_model
        if beta is not None and not beta > 0:
            raise ValueError(f"Hopfield: `beta` must be > 0, got {beta!r}")
        self.d_model, self.pattern_dim, self.update_steps = d_model, pattern_dim, update_steps
        self.beta = float(beta) if beta is not None else 1.0 / math.sqrt(pattern_dim)
        self.associate_input, self.causal, self.dtype = associate_input, causal, dtype
        lin = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.query = layers.Linear(d_model, pattern_dim, axes=("embed", "heads"), **lin)
        self.out = layers.Linear(pattern_dim, d_model, axes=("heads", "embed"), **lin)
        if associate_input:
            self.key = layers.Linear(d_model, pattern_dim, axes=("embed", "heads"), **lin)
            self.value = layers.Linear(d_model, pattern_dim, axes=("embed", "heads"), **lin)
            self.patterns = None
        else:
            # Unit-RMS rows: scores beta * x_i . xi start O(1) for O(1) queries.
            self.patterns = layers.param(
                jax.random.normal(rngs.params(), (num_patterns, pattern_dim), jnp.float32),
                (None, "heads"))

    def __call__(self, x, memory=None):
        """x [..., d_model]; over the input: x [batch, time, d_model] and memory (default x)
        [batch, source, d_model] (causal masking needs source == time)."""
        layers.check_input("Hopfield", "x", x, ndim=x.ndim, width=self.d_model,
                           legend="[..., d_model]")
        xi = self.query(x).astype(jnp.float32)
        if not self.associate_input and memory is None:
            xi = hopfield_retrieve(self.patterns[...], xi, self.beta, self.update_steps)
            return self.out(xi.astype(self.dtype))
        y = x if memory is None else memory
        if not self.associate_input:
            raise ValueError("Hopfield: `memory=` needs associate_input=True (key and value "
                             "projections of the input)")
        layers.check_input("Hopfield", "memory", y, ndim=3, width=self.d_model)
        keys = self.key(y).astype(jnp.float32)        # [b, s, p]
        values = self.value(y).astype(jnp.float32)
        scores = self.beta * jnp.einsum("btp,bsp->bts", xi, keys)
        if self.causal:
            if y.shape[1] != x.shape[1]:
                raise ValueError(f"Hopfield: causal association needs memory of the input's "
                                 f"length {x.shape[1]}, got {y.shape[1]}")
            t = x.shape[1]
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        out = jnp.einsum("bts,bsp->btp", jax.nn.softmax(scores, axis=-1), values)
        return self.out(out.astype(self.dtype))
