"""Models built from registered mixers.

`CausalLM`: token embedding, `num_layers` pre-norm residual blocks (norm -> mixer -> residual,
norm -> MLP -> residual), a final norm and a head tied to the embedding (or not). Each layer's
mixer is chosen by name from `memzoo.MIXERS` through a repeating pattern ("s4d" or
"s4d,s4d,s5"), so hybrid stacks need no code. The training issue grows this module (scan over
layers, remat, generation); the block structure here is the one it keeps.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from memzoo.registry import MIXERS


def layer_pattern(pattern: str, num_layers: int) -> list[str]:
    names = [p.strip() for p in pattern.split(",") if p.strip()]
    if not names:
        raise ValueError(f"CausalLM: `mixer` pattern must name at least one mixer, got {pattern!r}")
    for name in names:
        MIXERS[name]  # raises UnknownMixerError listing the known names
    return [names[i % len(names)] for i in range(num_layers)]


class Block(nnx.Module):
    def __init__(self, d_model: int, mixer: str, *, mixer_options: dict[str, Any], mlp_ratio: int,
                 norm: str, dtype, rngs: nnx.Rngs):
        self.mixer_norm = layers.norm(norm, d_model, dtype=dtype, rngs=rngs)
        self.mixer = MIXERS.build(mixer, d_model, rngs=rngs, **mixer_options)
        self.mlp = (layers.MLP(d_model, mlp_ratio * d_model, activation="silu", gated=True,
                               dtype=dtype, rngs=rngs) if mlp_ratio > 0 else None)
        self.mlp_norm = layers.norm(norm, d_model, dtype=dtype, rngs=rngs) if self.mlp else None

    def __call__(self, x):
        x = x + self.mixer(self.mixer_norm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class CausalLM(nnx.Module):
    """tokens [batch, time] int -> logits [batch, time, vocab] float32.

    >>> lm = CausalLM(vocab_size=16, d_model=8, num_layers=2, mixer="s4d", rngs=nnx.Rngs(0))
    >>> lm(jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 16)
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, mixer: str = "s4d",
                 mixer_options: dict[str, Any] | None = None, mlp_ratio: int = 2,
                 norm: str = "rmsnorm", tie_embeddings: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if vocab_size < 1 or d_model < 1 or num_layers < 1:
            raise ValueError("CausalLM: vocab_size, d_model and num_layers must be positive, got "
                             f"{vocab_size}, {d_model}, {num_layers}")
        self.vocab_size, self.dtype = vocab_size, dtype
        self.embed = layers.param(
            jax.random.normal(rngs.params(), (vocab_size, d_model), jnp.float32) * d_model ** -0.5,
            ("vocab", "embed"))
        self.blocks = nnx.List([
            Block(d_model, name, mixer_options=dict(mixer_options or {}), mlp_ratio=mlp_ratio,
                  norm=norm, dtype=dtype, rngs=rngs)
            for name in layer_pattern(mixer, num_layers)])
        self.final_norm = layers.norm(norm, d_model, dtype=dtype, rngs=rngs)
        self.head = None if tie_embeddings else layers.Linear(
            d_model, vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        if not hasattr(tokens, "dtype") or not jnp.issubdtype(tokens.dtype, jnp.integer) \
                or tokens.ndim != 2:
            raise ValueError("CausalLM: `tokens` must be an integer array [batch, time], got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.head is None:
            return jnp.einsum("btd,vd->btv", x, self.embed[...].astype(self.dtype)).astype(jnp.float32)
        return self.head(x).astype(jnp.float32)
