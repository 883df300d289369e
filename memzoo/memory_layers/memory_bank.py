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

The paper's retriever (`retrieval="tokens"`): a frozen document embedding clustered by
hierarchical k-means, fitted once on training documents before training (`fit`; the trainer
calls it on a fresh run), as the paper clusters its corpus before pretraining. The embedding is
TF-IDF through a fixed random projection (a Johnson-Lindenstrauss sketch of the bag of words),
read from the token ids, not from the block input, so it does not drift while the model trains:

  features f_s = idf[x_s] R[x_s]         R [vocab, key_dim] ~ N(0, 1/key_dim), fixed (seeded)
  key      r_t = n(sum_{s<=t} a^{t-s} f_s)     (n: unit length; causal, within t's document;
           with retrieval_window = W > 0 only the document's first W tokens count, so the
           route is fixed after them: the paper retrieves once per document)
  level l  i_l = the child c of i_{l-1} maximising r_t . C_l[c];  g_l = 1
  fit      idf[v] = log((1 + N) / (1 + df_v)) over N documents (a token in every document, such
           as padding, weighs 0); C = balanced spherical k-means (k-means++ seeds) of the
           documents' keys as the route reads them at their last token, level by level: the
           b_1 roots over every document, then each node's b_l children over the documents
           routed to it

Nothing in the route is trained (the gate is 1); R, idf and C are `layers.Buffer`s: saved with
the model, never trained. The block reads the token ids through the model's side channel
(`reads_tokens`; memzoo.models passes them and the vocabulary size). Before `fit` the route is
the projection's random clusters. Contexts of one topic share their rare tokens, so they share
a leaf: on topic-pure factual recall the fitted route puts each topic on its own leaf and the
bank beats the dense MLP of equal active FLOPs (benchmarks/RESULTS.md, "The paper's
retriever").

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
import numpy as np
from flax import nnx

from memzoo import layers
from pallas_kernels import linear_scan, memory_lookup


balance_loss = layers.balance_loss   # one home: memzoo.layers (MoM uses it too)
RETRIEVALS = ("learned", "tokens")


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
                 sow_aux_loss: bool = False, retrieval: str = "learned", vocab_size: int = 0,
                 fit_documents: int = 4096, retrieval_seed: int = 0, retrieval_window: int = 0,
                 dtype=jnp.float32,
                 rngs: nnx.Rngs):
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
        if retrieval not in RETRIEVALS:
            raise ValueError(f"MemoryBank: `retrieval` must be one of {RETRIEVALS} (a key "
                             f"learned from the block input, or the paper's fitted retriever "
                             f"of the token ids), got {retrieval!r}")
        if retrieval == "tokens":
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
                raise ValueError(f"MemoryBank: retrieval='tokens' embeds the token ids and needs "
                                 f"`vocab_size` >= 1 (memzoo.models passes the model's), got "
                                 f"{vocab_size!r}")
            if sow_aux_loss or not learn_route:
                raise ValueError("MemoryBank: retrieval='tokens' routes by a fitted retriever "
                                 "with nothing learned, so `sow_aux_loss` (a balance loss for a "
                                 "learned route) and `learn_route=False` do not apply")
            _positive_int("fit_documents", fit_documents)
            if isinstance(retrieval_window, bool) or not isinstance(retrieval_window, int) \
                    or retrieval_window < 0:
                raise ValueError(f"MemoryBank: `retrieval_window` must be an int >= 0 (0: the "
                                 f"whole document so far; W: its first W tokens), got "
                                 f"{retrieval_window!r}")
            if isinstance(retrieval_seed, bool) or not isinstance(retrieval_seed, int):
                raise ValueError(f"MemoryBank: `retrieval_seed` must be an int, got "
                                 f"{retrieval_seed!r}")
        self.d_model, self.branching, self.block_width = d_model, branching, block_width
        self.key_dim, self.decay, self.dtype = key_dim, float(decay), dtype
        self.learn_route, self.sow_aux_loss = learn_route, sow_aux_loss
        self.act = layers.get_activation(activation)
        self.anchor = (layers.MLP(d_model, hidden, activation=activation, gated=True,
                                  use_bias=use_bias, dtype=dtype, rngs=rngs)
                       if hidden > 0 else None)
        self.retrieval, self.fit_documents = retrieval, fit_documents
        self.retrieval_window = retrieval_window
        # the model hands a bank that reads them the token ids (memzoo.models' side channel)
        self.reads_tokens = retrieval == "tokens"
        sizes = [math.prod(branching[:i + 1]) for i in range(len(branching))]
        # level l's blocks are rows offsets[l] .. offsets[l] + sizes[l] - 1 of every table
        self.level_sizes = tuple(sizes)
        self.offsets = tuple(int(sum(sizes[:i])) for i in range(len(sizes)))
        total = sum(sizes)
        if self.reads_tokens:
            # From a seed, not from rngs: every layer (and every repeat of a layer scan) has
            # the same retriever, so one fit serves them all, as the paper retrieves once
            # per document for every layer.
            kp, kc = jax.random.split(jax.random.key(retrieval_seed))
            self.projection = layers.Buffer(
                key_dim ** -0.5 * jax.random.normal(kp, (vocab_size, key_dim), jnp.float32))
            self.idf = layers.Buffer(jnp.ones((vocab_size,), jnp.float32))
            self.centroids = layers.Buffer(_unit(jax.random.normal(kc, (total, key_dim))))
        else:
            self.key = layers.Linear(d_model, key_dim, axes=("embed", None), use_bias=False,
                                     dtype=jnp.float32, rngs=rngs)
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
        """[sum_s a^{t-s} h_s | sum_s a^{t-s}] over the tokens seen (f_s for h_s with
        retrieval='tokens'), zeros: nothing seen yet."""
        width = self.key_dim if self.reads_tokens else self.d_model
        return jnp.zeros((batch_size, width + 1), jnp.float32)

    def token_summary(self, tokens, *, segment_ids=None, cache=None):
        """(r [b, t, key_dim]: the retriever's unit key of each token's context, the new cache
        [sum_s a^{t-s} f_s | tokens seen in the document])."""
        f = self.token_features(tokens)
        ones = jnp.ones(f.shape[:-1] + (1,), jnp.float32)
        n0 = None if cache is None else cache[:, -1:]
        if self.retrieval_window:
            # only the document's first W tokens count: the route is fixed after them
            seen, _ = linear_scan(ones, ones, initial_state=n0, segment_ids=segment_ids)
            f = jnp.where(seen <= self.retrieval_window, f, 0.0)
        a = jnp.concatenate([jnp.full_like(f, self.decay), ones], axis=-1)
        s, last = linear_scan(a, jnp.concatenate([f, ones], axis=-1), initial_state=cache,
                              segment_ids=segment_ids)
        return _unit(s[..., :-1]), last

    def token_features(self, tokens):
        """tokens [...] int -> f [..., key_dim]: idf[x] R[x], the retriever's frozen embedding."""
        return (jnp.take(self.idf[...], tokens, axis=0)[..., None]
                * jnp.take(self.projection[...], tokens, axis=0))

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
        if self.reads_tokens:
            return self._retrieve(m) + (None,)
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

    def _retrieve(self, m):
        """The fitted retriever's route of the token summaries m [..., key_dim]: the tree walk
        to the most similar child at every level, gates 1 (module docstring)."""
        r = m.astype(jnp.float32)
        cents = self.centroids[...]
        parent = jnp.zeros(r.shape[:-1], jnp.int32)
        rows = []
        for off, b in zip(self.offsets, self.branching):
            sibling = jnp.arange(b, dtype=jnp.int32).reshape((1,) * parent.ndim + (b,))
            children = parent[..., None] * b + sibling
            scores = jnp.einsum("...k,...jk->...j", r, jnp.take(cents, off + children, axis=0))
            parent = jnp.take_along_axis(children, jnp.argmax(scores, -1)[..., None], -1)[..., 0]
            rows.append(off + parent)
        rows = jnp.stack(rows, -1)
        return rows, jnp.ones(rows.shape, jnp.float32)

    def fit(self, tokens, *, segment_ids=None, iterations: int = 30, seed: int = 0) -> dict:
        """Fit the retriever (retrieval='tokens') on documents: tokens [n, t] int, one document
        per row, or per segment with `segment_ids` [n, t]. Sets idf and the centroids (module
        docstring) in place, on the host; returns {"documents": N, "leaf_sizes": documents per
        leaf}. Layer-scanned banks (a leading repeat axis) get the same fit in every repeat."""
        if not self.reads_tokens:
            raise ValueError("MemoryBank.fit: only retrieval='tokens' has a retriever to fit "
                             f"(this bank's retrieval is {self.retrieval!r})")
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"MemoryBank.fit: `tokens` must be int [documents, time], got "
                             f"{tokens.dtype} {tokens.shape}")
        proj = np.asarray(self.projection[...], np.float64)
        proj = proj.reshape(-1, *proj.shape[-2:])[0]      # the repeats are identical (seeded)
        vocab = proj.shape[0]
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"MemoryBank.fit: `tokens` must lie in [0, vocab_size={vocab})")
        if segment_ids is None:
            doc = np.repeat(np.arange(tokens.shape[0]), tokens.shape[1])
        else:
            segment_ids = np.asarray(segment_ids)
            if segment_ids.shape != tokens.shape:
                raise ValueError(f"MemoryBank.fit: `segment_ids` must have the shape of "
                                 f"`tokens` {tokens.shape}, got {segment_ids.shape}")
            new = np.ones(tokens.shape, bool)
            new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            doc = np.cumsum(new.reshape(-1)) - 1
        tok = tokens.reshape(-1)
        n = int(doc[-1]) + 1 if doc.size else 0
        if n == 0:
            raise ValueError("MemoryBank.fit: no documents given")
        df = np.bincount(np.unique(doc * vocab + tok) % vocab, minlength=vocab)
        idf = np.log((1.0 + n) / (1.0 + df))
        # each document's key as the route reads it at its last counted token: the whole
        # document, or its first W tokens, decay-weighted from there
        start = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
        pos = np.arange(doc.size) - start[doc]
        length = np.bincount(doc)
        last = length[doc] - 1 if not self.retrieval_window else \
            np.minimum(length[doc], self.retrieval_window) - 1
        weight = np.where(pos <= last, float(self.decay) ** np.maximum(last - pos, 0), 0.0)
        keys = np.zeros((n, proj.shape[1]))
        np.add.at(keys, doc, (weight * idf[tok])[:, None] * proj[tok])
        keys = _unit_np(keys)
        cents, leaves = _hierarchical_kmeans(keys, self.branching, iterations,
                                             np.random.default_rng(seed))
        for var, value in ((self.idf, idf), (self.centroids, cents)):
            var.set_value(jnp.broadcast_to(jnp.asarray(value, jnp.float32), var[...].shape))
        return {"documents": n, "leaf_sizes": np.bincount(leaves, minlength=self.level_sizes[-1])}

    def load_balancing_loss(self, x):
        """[levels] Switch balance losses of the route over the tokens of x [b, t, d]
        (module docstring): 1 each for a uniform route, n_l when collapsed."""
        layers.check_input("MemoryBank", "x", x, ndim=3, width=self.d_model)
        if self.reads_tokens:
            raise ValueError("MemoryBank.load_balancing_loss: retrieval='tokens' has no learned "
                             "route to balance")
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

    def __call__(self, x, *, segment_ids=None, cache=None, tokens=None):
        """`tokens` [batch, time] int: the token ids at x's positions, read (and required) by
        retrieval='tokens' only."""
        layers.check_input("MemoryBank", "x", x, ndim=3, width=self.d_model)
        if self.reads_tokens:
            if tokens is None or getattr(tokens, "shape", None) != x.shape[:2] \
                    or not jnp.issubdtype(tokens.dtype, jnp.integer):
                raise ValueError(f"MemoryBank: retrieval='tokens' needs `tokens`, int [batch, "
                                 f"time] = {tuple(x.shape[:2])} (the ids at x's positions), got "
                                 f"{None if tokens is None else (tokens.dtype, tokens.shape)}")
            m, last = self.token_summary(tokens, segment_ids=segment_ids, cache=cache)
        else:
            if tokens is not None:
                raise ValueError("MemoryBank: `tokens` are read only with retrieval='tokens'")
            m, last = self.summary(x, segment_ids=segment_ids, cache=cache)
        y = self._bank(x, m, self.sow_aux_loss and cache is None)
        if self.anchor is not None:
            y = y + self.anchor(x)
        y = y.astype(self.dtype)
        return y if cache is None else (y, last)

    def step(self, x_t, cache, tokens=None):
        """One token: x_t [batch, d_model], `tokens` [batch] (retrieval='tokens')."""
        y, cache = self(x_t[:, None], cache=cache,
                        tokens=None if tokens is None else tokens[:, None])
        return y[:, 0], cache


def _unit(x):
    """x / |x| over the last axis (0 stays 0: a context of weightless tokens)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-30))


def _unit_np(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-15)


def _balanced_assign(sims):
    """Each row of sims [n, k] to a column, most similar pairs first, no column taking more
    than ceil(n / k) rows."""
    n, k = sims.shape
    cap, load = -(-n // k), np.zeros(k, np.int64)
    assign = np.full(n, -1, np.int64)
    for flat in np.argsort(-sims, axis=None, kind="stable"):
        i, j = divmod(int(flat), k)
        if assign[i] < 0 and load[j] < cap:
            assign[i], load[j] = j, load[j] + 1
    return assign


def _spherical_kmeans(x, k, iterations, rng, restarts: int = 8):
    """`_kmeans_once` from `restarts` seedings, the one whose rows sit closest to their
    centroids (k-means finds a local optimum: two clusters merged, another split)."""
    best, best_fit = None, -np.inf
    for _ in range(restarts):
        cents, assign = _kmeans_once(x, k, iterations, rng)
        fit = float((x * cents[assign]).sum()) if len(x) else 0.0
        if fit > best_fit:
            best, best_fit = (cents, assign), fit
    return best


def _kmeans_once(x, k, iterations, rng):
    """(centroids [k, d] of unit length, assignment [n]) of unit rows x [n, d] by cosine
    similarity: k-means++ seeds, then Lloyd steps with balanced assignments (no cluster over
    ceil(n / k) rows). Balanced, because the tree's branching is fixed: a node given more
    clusters of documents than it has children would have to merge them one level down (an
    unbalanced 2 x 4 split of 8 equal topics does exactly that). The route itself is the plain
    nearest centroid. Fewer rows than k: the missing centroids are random."""
    n, d = x.shape
    cents = _unit_np(rng.standard_normal((k, d)))
    if n == 0:
        return cents, np.zeros(0, np.int64)
    cents[0] = x[rng.integers(n)]
    for j in range(1, min(k, n)):
        dist = np.clip(1.0 - (x @ cents[:j].T).max(1), 0.0, None)
        total = dist.sum()
        cents[j] = x[rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)]
    assign = _balanced_assign(x @ cents.T)
    for _ in range(iterations):
        sums = np.zeros_like(cents)
        np.add.at(sums, assign, x)
        cents = np.where(np.linalg.norm(sums, axis=1, keepdims=True) > 0, _unit_np(sums), cents)
        new = _balanced_assign(x @ cents.T)
        if np.array_equal(new, assign):
            break
        assign = new
    return cents, assign


def _hierarchical_kmeans(x, branching, iterations, rng):
    """(centroids [sum_l n_l, d] in the bank's row order, each row's leaf [n]): level 1's b_1
    centroids over every row, then each node's b_l children over the rows routed to it."""
    node = np.zeros(len(x), np.int64)
    levels = []
    for level, b in enumerate(branching):
        parents = math.prod(branching[:level])
        cents = np.zeros((parents * b, x.shape[1]))
        child = np.zeros_like(node)
        for p in range(parents):
            rows = np.flatnonzero(node == p)
            c, _ = _spherical_kmeans(x[rows], b, iterations, rng)
            cents[p * b:(p + 1) * b] = c
            # the rows go on as the route will send them: to the nearest child
            child[rows] = p * b + np.argmax(x[rows] @ c.T, 1)
        levels.append(cents)
        node = child
    return np.concatenate(levels), node
