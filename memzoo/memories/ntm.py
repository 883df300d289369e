"""Neural Turing Machine (Graves, Wayne and Danihelka, 2014, "Neural Turing Machines"), the
"ntm" mixer.

A memory M [N slots, W] is read and written through soft attention over its slots. A
feed-forward controller (one tanh layer, the paper's feed-forward variant; no LSTM) sees the
token and the previous reads, h_t = tanh(W_c [x_t; r_{t-1}] + b_c), and emits for every head

    key k, strength beta = softplus(.), gate g = sigmoid(.), shift weighting s = softmax(.) over
    the shifts (-1, 0, +1), sharpening gamma = 1 + softplus(.) >= 1,
    and for a write head also the erase vector e = sigmoid(.) and the add vector a (linear).

Addressing (section 3.3), per head from its previous weighting w_{t-1}:

    content      w^c(i)  = softmax_i(beta K[k, M(i)]),  K = cosine similarity
    interpolate  w^g     = g w^c + (1 - g) w_{t-1}
    shift        w~(i)   = sum_j w^g(j) s(i - j)         (circular convolution over the slots)
    sharpen      w(i)    = w~(i)^gamma / sum_j w~(j)^gamma

Write (erase, then add; every write head erases before any adds):

    M_t = M_{t-1} prod_h (1 - w_h e_h^T) + sum_h w_h a_h^T

Read (from the memory after this token's write, so a token can be read back at once):
r_t = w^T M_t per read head. The mixer's output is y_t = W_o [h_t; r_t].

M_0 is learned, the initial weightings are learned (softmax of per-head logits, started focused
on slot 0 so that location shifts can index the slots from the first token) and
r_0 = w_0^T M_0; all three return at each document start (segment_ids).

The recurrence is nonlinear: the parallel form is a lax.scan of the one-token step that decoding
uses (one home for the math). The cache (`NTMCache`): memory, every head's last weighting and the
last reads, all float32 (the controller and the heads' projections run in the compute dtype, the
addressing in float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from memzoo import layers
from memzoo.attention import check_segment_ids, segment_starts
from memzoo.linear_attention.common import check_positive_int
from memzoo.memories.ttm import keep_where
from memzoo.registry import register_mixer

# Cosine similarity: |u| = sqrt(sum u^2 + eps), so a zero row has a finite gradient.
NORM_EPS = 1e-8
# w~^gamma as exp(gamma log w~): the floor keeps log finite where a weight underflows to 0 (its
# gamma gradient would be 0 * -inf).
WEIGHT_FLOOR = 1e-30
# Initial weighting logits: slot 0 ahead of the others by this much (~0.8 of the mass at N=16).
FOCUS_LOGIT = 4.0
SHIFTS = (-1, 0, 1)


@struct.dataclass
class NTMCache:
    """memory [b, N, W]; weights [b, read_heads + write_heads, N] (the last weightings, read heads
    first); reads [b, read_heads, W]. All float32."""
    memory: jax.Array
    weights: jax.Array
    reads: jax.Array


def address(memory, w_prev, key, beta, gate, shift, gamma):
    """One head's addressing (the paper's four stages), float32. memory [b, N, W]; w_prev [b, h, N];
    key [b, h, W]; beta, gate, gamma [b, h]; shift [b, h, 3] over SHIFTS -> w [b, h, N]."""
    m = memory * jax.lax.rsqrt(jnp.sum(memory * memory, -1, keepdims=True) + NORM_EPS)
    k = key * jax.lax.rsqrt(jnp.sum(key * key, -1, keepdims=True) + NORM_EPS)
    w_c = jax.nn.softmax(beta[..., None] * jnp.einsum("bhw,bnw->bhn", k, m), axis=-1)
    w_g = gate[..., None] * w_c + (1 - gate[..., None]) * w_prev
    # roll(w, d)[i] = w[i - d]: the mass at slot j moves to j + d with probability s(d).
    w_s = sum(shift[..., i, None] * jnp.roll(w_g, d, axis=-1) for i, d in enumerate(SHIFTS))
    w = jnp.exp(gamma[..., None] * jnp.log(jnp.maximum(w_s, WEIGHT_FLOOR)))
    return w / jnp.sum(w, -1, keepdims=True)


@register_mixer("ntm")
class NeuralTuringMachine(nnx.Module):
    """Neural Turing Machine with a feed-forward controller: [b, t, d] -> [b, t, d].

    Options: memory_slots (N), memory_width (W), read_heads, write_heads, controller_dim (the
    controller's hidden width, default d_model).

    >>> ntm = NeuralTuringMachine(8, memory_slots=6, memory_width=4, rngs=nnx.Rngs(0))
    >>> ntm(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, memory_slots: int = 32, memory_width: int = 16,
                 read_heads: int = 1, write_heads: int = 1, controller_dim: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        controller_dim = d_model if controller_dim is None else controller_dim
        for name, value in (("d_model", d_model), ("memory_slots", memory_slots),
                            ("memory_width", memory_width), ("read_heads", read_heads),
                            ("write_heads", write_heads), ("controller_dim", controller_dim)):
            check_positive_int("NeuralTuringMachine", name, value)
        self.d_model, self.slots, self.width = d_model, memory_slots, memory_width
        self.read_heads, self.write_heads, self.dtype = read_heads, write_heads, dtype
        N, W, R, H = memory_slots, memory_width, read_heads, read_heads + write_heads
        self.initial_memory = layers.param(
            0.5 * jax.random.normal(rngs.params(), (N, W), jnp.float32), (None, None))
        self.initial_logits = layers.param(
            jnp.zeros((H, N), jnp.float32).at[:, 0].set(FOCUS_LOGIT), (None, None))
        kw = dict(dtype=dtype, rngs=rngs)
        self.controller = layers.Linear(d_model + R * W, controller_dim, axes=("embed", "mlp"),
                                        **kw)
        # per head: key W, beta, gate, 3 shifts, gamma; a write head adds erase W and add W
        self.head_params = layers.Linear(controller_dim, H * (W + 6) + write_heads * 2 * W,
                                         axes=("mlp", None), **kw)
        self.out = layers.Linear(controller_dim + R * W, d_model, axes=("mlp", "embed"), **kw)

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> NTMCache:
        """The machine before any token (`max_len` ignored: the state does not grow)."""
        del max_len
        memory = self.initial_memory[...]
        weights = jax.nn.softmax(self.initial_logits[...], axis=-1)
        reads = weights[:self.read_heads] @ memory

        def rows(a):
            return jnp.broadcast_to(a, (batch_size,) + a.shape)
        return NTMCache(rows(memory), rows(weights), rows(reads))

    def _heads(self, h):
        """Controller state [b, C] -> per-head addressing terms (float32) and erase / add."""
        W, H = self.width, self.read_heads + self.write_heads
        p = self.head_params(h).astype(jnp.float32)
        b = p.shape[0]
        addr, rest = p[:, :H * (W + 6)].reshape(b, H, W + 6), p[:, H * (W + 6):]
        key, beta, gate = addr[..., :W], addr[..., W], addr[..., W + 1]
        shift, gamma = addr[..., W + 2:W + 5], addr[..., W + 5]
        terms = (key, jax.nn.softplus(beta), jax.nn.sigmoid(gate), jax.nn.softmax(shift, -1),
                 1 + jax.nn.softplus(gamma))
        rest = rest.reshape(b, self.write_heads, 2, W)
        return terms, jax.nn.sigmoid(rest[:, :, 0]), rest[:, :, 1]

    def _step(self, cache: NTMCache, x_t, start):
        """One token: x_t [b, d]; start [b] bool (a document begins here)."""
        b, R = x_t.shape[0], self.read_heads
        cache = jax.tree.map(lambda new, old: keep_where(start, new, old), self.init_cache(b),
                             cache)
        inp = jnp.concatenate([x_t.astype(self.dtype),
                               cache.reads.reshape(b, -1).astype(self.dtype)], -1)
        h = jnp.tanh(self.controller(inp))
        terms, erase, add = self._heads(h)
        read_terms = [t[:, :R] for t in terms]
        write_terms = [t[:, R:] for t in terms]
        w_write = address(cache.memory, cache.weights[:, R:], *write_terms)
        keep = jnp.prod(1 - w_write[..., None] * erase[:, :, None, :], axis=1)
        memory = cache.memory * keep + jnp.einsum("bhn,bhw->bnw", w_write, add)
        w_read = address(memory, cache.weights[:, :R], *read_terms)
        reads = jnp.einsum("bhn,bnw->bhw", w_read, memory)
        y = self.out(jnp.concatenate([h, reads.reshape(b, -1).astype(self.dtype)], -1))
        return NTMCache(memory, jnp.concatenate([w_read, w_write], 1), reads), y

    def step(self, x_t, cache: NTMCache):
        layers.check_input("NeuralTuringMachine.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        cache, y = self._step(cache, x_t, jnp.zeros((x_t.shape[0],), bool))
        return y, cache

    def __call__(self, x, cache: NTMCache | None = None, *, segment_ids=None):
        """Parallel form (a scan of the step), or with `cache` the prefill that continues from
        it: (y, cache). `segment_ids` [b, t] (parallel form only): memory, weightings and reads
        restart from their learned values at each document."""
        layers.check_input("NeuralTuringMachine", "x", x, ndim=3, width=self.d_model)
        b, T, _ = x.shape
        if segment_ids is not None:
            check_segment_ids("NeuralTuringMachine", segment_ids, (b, T))
            if cache is not None:
                raise ValueError("NeuralTuringMachine: `segment_ids` applies to the parallel "
                                 "form only; a cache holds one document per batch row")
            starts = segment_starts(segment_ids)
        else:
            starts = jnp.zeros((b, T), bool)
        if cache is not None:
            self._check_cache(cache, b)
        graphdef, state = nnx.split(self)

        def body(carry, inputs):
            return nnx.merge(graphdef, state)._step(carry, *inputs)

        final, ys = jax.lax.scan(body, self.init_cache(b) if cache is None else cache,
                                 (jnp.swapaxes(x, 0, 1), jnp.swapaxes(starts, 0, 1)))
        y = jnp.swapaxes(ys, 0, 1)
        return y if cache is None else (y, final)

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, self.slots, self.width)
        if not isinstance(cache, NTMCache) or tuple(cache.memory.shape) != want:
            got = tuple(cache.memory.shape) if isinstance(cache, NTMCache) \
                else type(cache).__name__
            raise ValueError(f"NeuralTuringMachine: `cache` must be an NTMCache with memory "
                             f"{want} (from init_cache({batch})), got {got}")
