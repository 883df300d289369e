"""Token cross-entropy without [batch, time, vocab] logits.

A language model's loss is usually computed from the full float32 logits: at B8 T4096 and a
128k vocabulary that is 16 GiB per step before the backward pass keeps its own copy, more than
the rest of a 1B model's activations. `cross_entropy_sums` cuts the time axis into chunks: each
chunk's logits are made from the final hidden states, reduced to its loss and its count of
correct predictions, and dropped; the backward pass makes them again (jax.checkpoint), so the
peak holds one chunk's [batch, chunk, vocab]. Same value and gradient as the plain loss
(tests/memzoo/test_losses.py), at the price of the vocabulary projection's forward computed twice.

z-loss (PaLM, Chowdhery et al. 2022, section 5): z_loss * logsumexp(logits)^2 per token, which
keeps the softmax normaliser near 1 and the logits from drifting in bfloat16 training.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_losses(logits, targets, z_loss: float = 0.0):
    """(CE + z_loss * lse^2, argmax) per token of float32 logits [..., V] against int targets
    [...]: the one home of the loss's math."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = lse - picked
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)
    return loss, jnp.argmax(logits, axis=-1)


def logit_sums(logits, targets, mask, z_loss: float = 0.0):
    """(sum of mask * (CE + z_loss * lse^2), sum of mask * [argmax == target]) of float32
    logits [..., V] against int targets [...]."""
    loss, prediction = token_losses(logits, targets, z_loss)
    correct = (prediction == targets).astype(jnp.float32)
    return jnp.sum(loss * mask), jnp.sum(correct * mask)


def cross_entropy_per_token(hidden: jax.Array, project: Callable[[jax.Array], jax.Array],
                            targets: jax.Array, *, chunk_size: int | None = None):
    """(CE [B, T] float32, argmax [B, T] int32) of every position, for evaluation: the same
    math as `cross_entropy_sums` without the reduction (and without z-loss, which is a training
    penalty, not part of a likelihood). chunk_size as there: [B, T, V] logits never exist when
    it is set, which matters at evaluation lengths many times the training one."""
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"cross_entropy_per_token: hidden [batch, time, d_model] and targets "
                         f"[batch, time], got {hidden.shape} and {targets.shape}")
    b, t, _ = hidden.shape
    if not chunk_size or chunk_size >= t:
        loss, prediction = token_losses(project(hidden), targets)
        return loss, prediction.astype(jnp.int32)
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))

    def chunks(x):   # [B, n*C, ...] -> [n, B, C, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk_size, *x.shape[2:]), 0, 1)

    def one(xs):
        loss, prediction = token_losses(project(xs[0]), xs[1])
        return loss, prediction.astype(jnp.int32)

    loss, prediction = jax.lax.map(one, (chunks(hidden), chunks(targets)))
    unchunk = lambda x: jnp.swapaxes(x, 0, 1).reshape(b, n * chunk_size)[:, :t]
    return unchunk(loss), unchunk(prediction)


def cross_entropy_sums(hidden: jax.Array, project: Callable[[jax.Array], jax.Array],
                       targets: jax.Array, mask: jax.Array | None = None, *,
                       chunk_size: int | None = None, z_loss: float = 0.0):
    """(loss sum, correct sum) of next-token cross-entropy over the unmasked positions.

    hidden [B, T, D]: what the vocabulary projection reads; `project` maps [B, C, D] to float32
    logits [B, C, V] (CausalLM.project). targets [B, T] int; mask [B, T] (1 counts, 0 not;
    None: all count). chunk_size None or 0: the plain loss on the whole sequence; otherwise
    that many time steps per chunk (T need not be a multiple: the last chunk is padded and
    masked). Sums, not means, so micro-batches add up exactly.
    """
    if hidden.ndim != 3:
        raise ValueError(f"cross_entropy_sums: hidden must be [batch, time, d_model], got shape "
                         f"{hidden.shape}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"cross_entropy_sums: targets must be [batch, time] = "
                         f"{hidden.shape[:2]}, got {targets.shape}")
    if mask is None:
        mask = jnp.ones(targets.shape, jnp.float32)
    elif mask.shape != targets.shape:
        raise ValueError(f"cross_entropy_sums: mask must have the targets' shape {targets.shape}, "
                         f"got {mask.shape}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError(f"cross_entropy_sums: chunk_size must be None or an int >= 0, got "
                         f"{chunk_size!r}")
    if not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise ValueError(f"cross_entropy_sums: z_loss must be a number >= 0, got {z_loss!r}")
    mask = mask.astype(jnp.float32)
    b, t, _ = hidden.shape
    if not chunk_size or chunk_size >= t:
        return logit_sums(project(hidden), targets, mask, z_loss)

    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def chunks(x):   # [B, n*C, ...] -> [n, B, C, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk_size, *x.shape[2:]), 0, 1)

    # Checkpointed: the backward pass recomputes a chunk's logits instead of keeping all n.
    @jax.checkpoint
    def one(h, y, m):
        return logit_sums(project(h), y, m, z_loss)

    def body(carry, xs):
        loss, correct = one(*xs)
        return (carry[0] + loss, carry[1] + correct), None

    xs = (chunks(hidden), chunks(targets), chunks(mask))
    sums = jax.eval_shape(one, *(x[0] for x in xs))
    (loss, correct), _ = jax.lax.scan(body, tuple(jnp.zeros((), s.dtype) for s in sums), xs)
    return loss, correct
