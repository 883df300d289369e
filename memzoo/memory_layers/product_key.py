"""Product-key memory (Lample et al., 2019) with the options of "Memory Layers at Scale"
(Berges et al., 2024).

A per-token layer [..., d_model] -> [..., d_model] with n_keys^2 value slots but the compute of
2 * n_keys key scores and k row reads per head:

  q = norm(W_q x)                       [..., heads, key_dim], split into halves q1, q2
  s1 = q1 K1^T, s2 = q2 K2^T            [..., heads, n_keys] each (two sub-key sets)
  top-k of s1 and of s2, then the top-k of their k x k sums s1[a] + s2[b]; the slot of (a, b)
  is a * n_keys + b (the product key), so the k best of all n_keys^2 sums are found exactly:
  any pair in the global top-k has both halves in their halves' top-k.
  w = softmax over the k scores (per head); m = sum_heads sum_k w values[slot]   (memory_lookup)
  out = m                                        (Lample; value_dim == d_model)
      = W_o (m * silu(W_g x))                    (gated=True, memory layers at scale)

Options from memory layers at scale:
  * `values=`: a `MemoryValues` table shared by several layers of one model (the layers keep
    their own keys and query networks); `memzoo.models` builds one per model when
    `mlp_options["shared_values"]` is set.
  * `qk_norm=True`: the query halves and the sub-keys are RMS-normalised before scoring (scores
    bounded by key_dim / 2), which keeps softmax temperatures sane as keys train.
  * `gated=True`: the silu-gated output above.
  * The value table's axes are ("memory_rows", "memory_dim"); train/mesh.py maps
    "memory_dim" to the "tensor" mesh axis, so under a mesh the table is sharded along its
    embedding dimension and the lookup (a gather of row slices) runs on each device's columns.
  * The table's parameter is tagged with its own optimizer group, "memory_values"
    (memzoo.layers.PARAM_GROUPS; a separate learning rate via optim.lr_multipliers).

Query normalisation (`query_norm`): "batchnorm" (Lample; nnx.BatchNorm over the flattened
query, batch statistics in training, running averages after `model.eval()`), "layernorm"
(the default: per token, so the layer stays exactly per-token and causal) or "none".
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from pallas_kernels import memory_lookup

QUERY_NORMS = ("layernorm", "batchnorm", "none")


class MemoryValues(nnx.Module):
    """The value table [n_keys^2, value_dim], float32, N(0, value_dim^-1/2) as in Lample et al.
    (so a softmax-weighted sum of rows starts at the scale of a unit-variance activation / k)."""

    def __init__(self, num_rows: int, value_dim: int, *, init_std: float | None = None,
                 rngs: nnx.Rngs):
        if num_rows < 1 or value_dim < 1:
            raise ValueError(f"MemoryValues: `num_rows` and `value_dim` must be >= 1, got "
                             f"{num_rows} and {value_dim}")
        std = value_dim ** -0.5 if init_std is None else init_std
        self.num_rows, self.value_dim = num_rows, value_dim
        self.memory_values = layers.param(
            std * jax.random.normal(rngs.params(), (num_rows, value_dim), jnp.float32),
            ("memory_rows", "memory_dim"), group="memory_values")


def _rms_normalise(x, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def product_key_topk(q1, q2, keys1, keys2, topk: int):
    """The exact top-k of the n_keys^2 sums s1[a] + s2[b] from the two halves' top-k.

    q1, q2 [..., heads, half]; keys1, keys2 [heads, n_keys, half].
    Returns (scores [..., heads, topk] float32, slots [..., heads, topk] int32, slot =
    a * n_keys + b), best first.
    """
    n_keys = keys1.shape[1]
    s1 = jnp.einsum("...hd,hnd->...hn", q1, keys1, preferred_element_type=jnp.float32)
    s2 = jnp.einsum("...hd,hnd->...hn", q2, keys2, preferred_element_type=jnp.float32)
    v1, i1 = jax.lax.top_k(s1, topk)
    v2, i2 = jax.lax.top_k(s2, topk)
    sums = (v1[..., :, None] + v2[..., None, :]).reshape(*v1.shape[:-1], topk * topk)
    slots = (i1[..., :, None] * n_keys + i2[..., None, :]).reshape(sums.shape)
    scores, best = jax.lax.top_k(sums, topk)
    return scores, jnp.take_along_axis(slots, best, axis=-1).astype(jnp.int32)


class ProductKeyMemory(nnx.Module):
    """[..., d_model] -> [..., d_model] (module docstring).

    >>> pkm = ProductKeyMemory(16, n_keys=8, num_heads=2, topk=4, rngs=nnx.Rngs(0))
    >>> pkm(jnp.ones((2, 3, 16))).shape
    (2, 3, 16)
    """

    def __init__(self, d_model: int, *, n_keys: int = 32, num_heads: int = 4, topk: int = 8,
                 key_dim: int | None = None, value_dim: int | None = None,
                 query_norm: str = "layernorm", qk_norm: bool = False, gated: bool = False,
                 values: MemoryValues | None = None, value_init_std: float | None = None,
                 implementation: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        owner = "ProductKeyMemory"
        for name, v in (("d_model", d_model), ("n_keys", n_keys), ("num_heads", num_heads),
                        ("topk", topk)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{owner}: `{name}` must be an integer >= 1, got {v!r}")
        if topk > n_keys:
            raise ValueError(f"{owner}: `topk` must be <= n_keys = {n_keys}, got {topk}")
        key_dim = key_dim or max(2, 2 * (d_model // 4))
        if key_dim % 2:
            raise ValueError(f"{owner}: `key_dim` must be even (two halves), got {key_dim}")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"{owner}: `query_norm` must be one of {QUERY_NORMS}, got "
                             f"{query_norm!r}")
        if values is None:
            value_dim = value_dim or d_model
            values = MemoryValues(n_keys * n_keys, value_dim, init_std=value_init_std, rngs=rngs)
        elif values.num_rows != n_keys * n_keys or (value_dim and value_dim != values.value_dim):
            raise ValueError(f"{owner}: shared `values` must have n_keys^2 = {n_keys * n_keys} "
                             f"rows{f' and value_dim {value_dim}' if value_dim else ''}, got "
                             f"[{values.num_rows}, {values.value_dim}]")
        value_dim = values.value_dim
        if not gated and value_dim != d_model:
            raise ValueError(f"{owner}: without `gated`, `value_dim` must equal d_model = "
                             f"{d_model} (the memory's output is the layer's), got {value_dim}")
        self.d_model, self.n_keys, self.num_heads, self.topk = d_model, n_keys, num_heads, topk
        self.key_dim, self.value_dim, self.qk_norm, self.gated = key_dim, value_dim, qk_norm, gated
        self.implementation, self.dtype = implementation, dtype
        half = key_dim // 2
        self.query = layers.Linear(d_model, num_heads * key_dim, axes=("embed", "heads"),
                                   use_bias=False, dtype=dtype, rngs=rngs)
        self.query_norm_kind = query_norm
        if query_norm == "layernorm":
            self.query_norm = layers.LayerNorm(num_heads * key_dim, dtype=jnp.float32)
        elif query_norm == "batchnorm":
            self.query_norm = nnx.BatchNorm(num_heads * key_dim, momentum=0.99, epsilon=1e-5,
                                            dtype=jnp.float32, rngs=rngs)
        else:
            self.query_norm = None
        # Sub-keys uniform in +-1/sqrt(half) (Lample et al.): scores start O(1) for O(1) queries.
        bound = 1.0 / math.sqrt(half)
        self.keys = layers.param(
            jax.random.uniform(rngs.params(), (num_heads, 2, n_keys, half), jnp.float32,
                               -bound, bound), ("heads", None, None, None))
        self.values = values
        if gated:
            self.gate = layers.Linear(d_model, value_dim, axes=("embed", "memory_dim"),
                                      use_bias=False, dtype=dtype, rngs=rngs)
            self.out = layers.Linear(value_dim, d_model, axes=("memory_dim", "embed"),
                                     use_bias=False, dtype=dtype, rngs=rngs)

    def lookup(self, x):
        """(scores [..., heads, topk] softmax weights, slots [..., heads, topk]) for x."""
        lead = x.shape[:-1]
        q = self.query(x)
        if self.query_norm is not None:
            flat = q.reshape(-1, q.shape[-1]).astype(jnp.float32)
            q = self.query_norm(flat).reshape(*lead, -1)
        q = q.astype(jnp.float32).reshape(*lead, self.num_heads, self.key_dim)
        q1, q2 = jnp.split(q, 2, axis=-1)
        keys = self.keys[...]
        k1, k2 = keys[:, 0], keys[:, 1]
        if self.qk_norm:
            q1, q2, k1, k2 = map(_rms_normalise, (q1, q2, k1, k2))
        scores, slots = product_key_topk(q1, q2, k1, k2, self.topk)
        return jax.nn.softmax(scores, axis=-1), slots

    def __call__(self, x):
        layers.check_input("ProductKeyMemory", "x", x, ndim=x.ndim if x.ndim >= 1 else 1,
                           width=self.d_model, legend="[..., d_model]")
        weights, slots = self.lookup(x)
        lead = x.shape[:-1]
        k = self.num_heads * self.topk
        # Heads add up into one read of num_heads * topk rows (Lample et al. sum the heads).
        m = memory_lookup(self.values.memory_values[...], slots.reshape(*lead, k),
                          weights.reshape(*lead, k), implementation=self.implementation)
        m = m.astype(self.dtype)
        if self.gated:
            m = self.out(m * jax.nn.silu(self.gate(x)))
        return m

    def init_cache(self, batch_size: int):
        """Per-token: nothing to carry (the decoding protocol's empty cache)."""
        del batch_size
        return ()

    def step(self, x_t, cache=()):
        return self(x_t), cache
