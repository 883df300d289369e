"""Autoregressive generation from a CausalLM: prefill the prompt, then decode one token at a
time inside `lax.scan`, so the whole loop is one compiled program (no Python per token).

>>> lm = CausalLM(vocab_size=16, d_model=8, num_layers=1, mixer="attention", rngs=nnx.Rngs(0))
>>> generate(lm, jnp.zeros((2, 3), jnp.int32), 4).shape
(2, 4)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.models import CausalLM, check_tokens  # noqa: F401  (CausalLM: the doctest)


def sample(logits: jax.Array, temperature: float, key: jax.Array | None) -> jax.Array:
    """[b, vocab] float -> [b] int32: argmax at temperature 0, else softmax(logits / T)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@nnx.jit(static_argnames=("num_tokens", "temperature", "max_len"))
def generate(model, prompt: jax.Array, num_tokens: int, *, temperature: float = 0.0,
             rng: jax.Array | None = None, max_len: int | None = None) -> jax.Array:
    """prompt [b, p] int -> the next `num_tokens` tokens [b, num_tokens] int32.

    Greedy at `temperature=0.0`; otherwise sampled with `rng` (a key, required). `num_tokens`,
    `temperature` and `max_len` are static (one compile per value). Caches that grow
    (attention's) are sized `max_len`, default p + num_tokens.
    """
    check_tokens("generate", prompt, legend="[batch, prompt_len]")
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"generate: num_tokens must be a non-negative int, got {num_tokens!r}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs `rng`, a jax.random key")
    b, p = prompt.shape
    if p < 1:
        raise ValueError("generate: the prompt needs at least one token")
    needed = p + num_tokens
    if max_len is not None and max_len < needed:
        raise ValueError(f"generate: max_len={max_len} < prompt length + num_tokens = {needed}")
    if num_tokens == 0:
        return jnp.zeros((b, 0), jnp.int32)
    keys = (jax.random.split(rng, num_tokens) if temperature > 0
            else jnp.zeros((num_tokens,), jnp.uint32))  # unused placeholders for the scan
    cache = model.init_cache(b, max_len or needed)
    logits, cache = model.prefill(prompt, cache)
    first = sample(logits[:, -1], temperature, keys[0] if temperature > 0 else None)

    # nnx.scan, not jax.lax.scan: the model (broadcast, in_axes None) enters the loop as an
    # argument, so the layer scan inside decode_step sees it at the loop's own trace level.
    @nnx.scan(in_axes=(nnx.Carry, None, 0), out_axes=(nnx.Carry, 0))
    def body(carry, model, key):
        token, cache = carry
        logits_t, cache = model.decode_step(token, cache)
        nxt = sample(logits_t, temperature, key if temperature > 0 else None)
        return (nxt, cache), nxt

    _, rest = body((first, cache), model, keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)
