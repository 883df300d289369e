"""Hierarchical memory banks (Pouransari et al., 2025, "Pretraining with hierarchical memories:
separating long-tail and common knowledge"): a small anchor FFN plus a large bank of FFN blocks
organised as a tree (clusters of clusters); a context picks one block per level, and the picked
blocks' parameters are fetched and added to the anchor's FFN as extra hidden width.

The MLP slot `model.mlp="memory_bank"` (memzoo.models). For a block input h_t [d]:

  summary  m_t = sum_{s<=t} a^{t-s} h_s / sum_{s<=t} a^{t-s}     (within t's document; a = decay)
  key      r_t = W_r m_t                                          [key_dim]
  level l  (branching b_l; n_l = b_1 ... b_l blocks, centroids C_l [n_l, key_dim]):
           children of the block picked at level l-1, c = i_{l-1} b_l + j, j < b_l (i_0 = 0)
           p_l = softmax_j(r_t . C_l[c_j] / sqrt(key_dim));  i_l = c_argmax;  g_l = max_j p_l
  out      y_t = FFN_anchor(h_t) + sum_l g_l W_down[i_l]^T (act(W_gate[i_l]^T h_t) * W_up[i_l]^T h_t)

Each bank block is a SwiGLU (GeGLU with activation="gelu") of `block_width` hidden units, so a
token's active FLOPs are the anchor's plus levels x block_width units of width, plus the key
(d x key_dim) and sum_l b_l key scores. Every level's blocks live in two tables with one row per
block ([W_gate | W_up] flattened, and W_down flattened); a token's rows are fetched with
`pallas_kernels.memory_lookup` (a weighted row sum with one row per bag: the gate g_l rides on
W_down as the lookup weight, so its gradient reaches the router), so only the fetched blocks get
gradients. The tables are in the "memory_values" optimizer group (each row learns only when
fetched), axes ("memory_rows", "memory_dim") as the product-key values.

Differences from the paper, on purpose: the paper's retriever is fixed (hierarchical k-means of a
frozen encoder's document embedding) and it retrieves once per document from the whole document;
here the retrieval key is learned end to end (the sibling softmax gate carries its gradient,
Switch-style; `learn_route=False` instead keeps W_r and the centroids at their random
initialisation, a fixed retriever as in the paper, though not one clustered on the data),
and the summary is causal: the running mean of the block input over the document
so far (decay=1, the default: the prefix mean, the paper's "context" read as it grows), or an
exponential moving average (decay < 1: a recency-weighted context). Being causal, a decode step
needs only the summary's state: the cache is [sum_s a^{t-s} h_s | sum_s a^{t-s}], [batch, d + 1]
float32, advanced by the same `pallas_kernels.linear_scan` as the parallel form, so decoding
equals the parallel call. `segment_ids` restart the summary at every document start.

Load balancing (`sow_aux_loss=True`; Switch Transformer, Fedus et al., 2022, per tree level): a
learned route can crowd many contexts onto a few blocks (rich get richer through the gate), and
nothing else spreads it. For level l with n_l blocks, over the tokens of a call,
  f_i = the fraction of tokens that pick block i,  P_i = the mean of block i's sibling-softmax
  probability (0 for tokens whose parent is not i's),   L_l = n_l sum_i f_i P_i,
1 for a uniform route, up to n_l when every token takes the same path. `load_balancing_loss(x)`
returns [L_1 .. L_levels]; the parallel call (no cache) sows their mean with nnx.sow
(nnx.Intermediate, "aux_loss"), which the trainer adds with weight optim.aux_loss_weight.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo import layers
from pallas_kernels import linear_scan, memory_lookup


balance_loss = layers.balance_loss   # one home: memzoo.layers (MoM uses it too)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"MemoryBank: `{name}` must be an integer >= 1, got {v!r}")
    return v


class MemoryBank(nnx.Module):
    """[batch, time, d_model] -> [batch, time, d_model] (module docstring). Carries a cache:
    `__call__(x, cache=c)` -> (y, c) and `step(x_t, c)`; `stateful` tells memzoo.models.Block.

    >>> bank = MemoryBank(8, hidden=16, branching=(2, 3), block_width=4, rngs=nnx.Rngs(0))
    >>> bank(jnp.ones((2, 5, 8))).shape
    (2, 5, 8)
    """

    stateful = True

    def __init__(self, d_model: int, *, hidden: int = 0, branching: Sequence[int] = (8, 8),
                 block_width: int = 16, key_dim: int = 16, decay: float = 1.0,
                 learn_route: bool = True, activation: str = "silu", use_bias: bool = True,
                 sow_aux_loss: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        _positive_int("d_model", d_model)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"MemoryBank: `hidden` (the anchor FFN's width) must be an integer "
                             f">= 0 (0: no anchor), got {hidden!r}")
        if isinstance(branching, (str, bytes)) or not isinstance(branching, Sequence) \
                or not branching:
            raise ValueError(f"MemoryBank: `branching` must be a non-empty sequence of ints "
                             f">= 1 (children per node, one per level), got {branching!r}")
        branching = tuple(_positive_int("branching", b) for b in branching)
        _positive_int("block_width", block_width)
        _positive_int("key_dim", key_dim)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) \
                or not 0.0 < decay <= 1.0:
            raise ValueError(f"MemoryBank: `decay` must be a float in (0, 1] (1: the running "
                             f"mean of the document so far), got {decay!r}")
        if not isinstance(learn_route, bool):
            raise ValueError(f"MemoryBank: `learn_route` must be a bool (False: the retrieval "
                             f"key and centroids stay fixed), got {learn_route!r}")
        if not isinstance(sow_aux_loss, bool):
            raise ValueError(f"MemoryBank: `sow_aux_loss` must be a bool (True: sow the route's "
                             f"load-balancing loss), got {sow_aux_loss!r}")
        if activation not in layers.ACTIVATIONS:
            raise ValueError(f"MemoryBank: `activation` must be one of "
                             f"{tuple(layers.ACTIVATIONS)}, got {activation!r}")
        self.d_model, self.branching, self.block_width = d_model, branching, block_width
        self.key_dim, self.decay, self.dtype = key_dim, float(decay), dtype
        self.learn_route, self.sow_aux_loss = learn_route, sow_aux_loss
        self.act = layers.get_activation(activation)
        self.anchor = (layers.MLP(d_model, hidden, activation=activation, gated=True,
                                  use_bias=use_bias, dtype=dtype, rngs=rngs)
                       if hidden > 0 else None)
        self.key = layers.Linear(d_model, key_dim, axes=("embed", None), use_bias=False,
                                 dtype=jnp.float32, rngs=rngs)
        sizes = [math.prod(branching[:i + 1]) for i in range(len(branching))]
        # level l's blocks are rows offsets[l] .. offsets[l] + sizes[l] - 1 of every table
        self.level_sizes = tuple(sizes)
        self.offsets = tuple(int(sum(sizes[:i])) for i in range(len(sizes)))
        total = sum(sizes)
        self.centroids = layers.param(
            jax.random.normal(rngs.params(), (total, key_dim), jnp.float32), (None, None))
        w = block_width
        self.w_in = layers.param(
            d_model ** -0.5 * jax.random.normal(rngs.params(), (total, d_model * 2 * w)),
            ("memory_rows", "memory_dim"), group="memory_values")
        self.w_out = layers.param(
            w ** -0.5 * jax.random.normal(rngs.params(), (total, w * d_model)),
            ("memory_rows", "memory_dim"), group="memory_values")

    @property
    def num_blocks(self) -> int:
        return sum(self.level_sizes)

    def init_cache(self, batch_size: int):
        """[sum_s a^{t-s} h_s | sum_s a^{t-s}] over the tokens seen, zeros: nothing seen yet."""
        return jnp.zeros((batch_size, self.d_model + 1), jnp.float32)

    def summary(self, h, *, segment_ids=None, cache=None):
        """(m [b, t, d] float32: the causal context summary of each token, the new cache)."""
        h32 = h.astype(jnp.float32)
        ones = jnp.ones(h32.shape[:-1] + (1,), jnp.float32)
        b = jnp.concatenate([h32, ones], axis=-1)
        a = jnp.full_like(b, self.decay)
        s, last = linear_scan(a, b, initial_state=cache, segment_ids=segment_ids)
        return s[..., :-1] / s[..., -1:], last

    def route(self, m):
        """m [..., d] -> (rows [..., levels] int32 into the tables, gates [..., levels])."""
        rows, gates, _ = self._route(m)
        return rows, gates

    def _route(self, m):
        """route(m) and the levels' balance losses [levels] (module docstring)."""
        r = self.key(m.astype(jnp.float32))
        cents = self.centroids[...]
        if not self.learn_route:
            # the gate still scales each block, but moves neither the key nor the centroids
            r, cents = jax.lax.stop_gradient(r), jax.lax.stop_gradient(cents)
        scale = self.key_dim ** -0.5
        parent = jnp.zeros(r.shape[:-1], jnp.int32)
        rows, gates, balance = [], [], []
        for off, b, n in zip(self.offsets, self.branching, self.level_sizes):
            sibling = jnp.arange(b, dtype=jnp.int32).reshape((1,) * parent.ndim + (b,))
            children = parent[..., None] * b + sibling                           # [..., b]
            c = jnp.take(cents, off + children, axis=0)                          # [..., b, k]
            p = jax.nn.softmax(scale * jnp.einsum("...k,...jk->...j", r, c), axis=-1)
            j = jnp.argmax(p, axis=-1)
            parent = jnp.take_along_axis(children, j[..., None], axis=-1)[..., 0]
            rows.append(off + parent)
            gates.append(jnp.take_along_axis(p, j[..., None], axis=-1)[..., 0])
            # the siblings' probabilities spread over the level's n blocks (others' are 0)
            probs = jnp.einsum("...j,...jn->...n", p, jax.nn.one_hot(children, n, dtype=p.dtype))
            balance.append(balance_loss(jax.nn.one_hot(parent, n, dtype=p.dtype), probs))
        return jnp.stack(rows, -1), jnp.stack(gates, -1), jnp.stack(balance)

    def load_balancing_loss(self, x):
        """[levels] Switch balance losses of the route over the tokens of x [b, t, d]
        (module docstring): 1 each for a uniform route, n_l when collapsed."""
        layers.check_input("MemoryBank", "x", x, ndim=3, width=self.d_model)
        return self._route(self.summary(x)[0])[2]

    def _bank(self, h, m, sow: bool):
        rows, gates, balance = self._route(m)
        if sow:
            self.sow(nnx.Intermediate, "aux_loss", jnp.mean(balance))
        d, w = self.d_model, self.block_width
        one = jnp.ones_like(gates)
        # one row per bag (the trailing k = 1): the lookup is a gather, weighted for W_down
        w_in = memory_lookup(self.w_in[...], rows[..., None], one[..., None])
        w_out = memory_lookup(self.w_out[...], rows[..., None], gates[..., None])
        w_in = w_in.reshape(*rows.shape, d, 2 * w).astype(self.dtype)
        w_out = w_out.reshape(*rows.shape, w, d).astype(self.dtype)
        u = jnp.einsum("...d,...ldw->...lw", h.astype(self.dtype), w_in)
        z = self.act(u[..., :w]) * u[..., w:]
        return jnp.einsum("...lw,...lwd->...d", z, w_out)

    def __call__(self, x, *, segment_ids=None, cache=None):
        layers.check_input("MemoryBank", "x", x, ndim=3, width=self.d_model)
        m, last = self.summary(x, segment_ids=segment_ids, cache=cache)
        y = self._bank(x, m, self.sow_aux_loss and cache is None)
        if self.anchor is not None:
            y = y + self.anchor(x)
        y = y.astype(self.dtype)
        return y if cache is None else (y, last)

    def step(self, x_t, cache):
        y, cache = self(x_t[:, None], cache=cache)
        return y[:, 0], cache
