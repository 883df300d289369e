"""`NeuralMemory`: Titans' long-term memory (Behrouz et al., 2024) as a mixer, and the Miras
variants (Moneta, Yaad, Memora) as configurations of it. The math is in core.py.

  x -> q, k, v projections [b, t, H, K] -> short causal conv (SiLU) -> L2 norm of q and k
    -> memory: H memory MLPs (one per head, K -> hidden ... -> K, `memory_layers` >= 1 layers),
       written with (k_t, v_t) by the rule (attentional bias x retention x learning rule) and
       read at q_t after token t's write
    -> per-head RMSNorm -> W_o

theta_t (learning rate: `max_lr` times a sigmoid; 0.1 by default), eta_t (momentum) and alpha_t (forgetting) are
sigmoid projections of x per head, in float32. alpha's logit is clamped at ALPHA_LOGIT_MAX: total
forgetting (alpha = 1) would divide by zero in the delta-rule form below and is never needed.
The gates' biases (`gate_proj.bias`) are tagged "ssm_dynamics" (memzoo.layers.param).

Stability of a deep memory: with every gradient of a chunk taken at the chunk-start weights, a
chunk moves the weights by about C theta / (1 - eta) gradients of the sum-of-squares loss, whose
curvature grows with the weights; for a 2-layer memory at theta = 0.1 (the cap) that step is
past the gradient-descent stability bound and the weights grow geometrically, to inf in float32
within 128 tokens even at eta = 0.5 (at the initial theta 0.03 they stay O(1)). Training pushes
theta to its cap, so the 2-layer NIAH MAG run diverged. `max_grad_norm` clips each token's
gradient (the per-sample clipping titans-pytorch offers): every write is then at most
theta * max_grad_norm, so the weights grow at most polynomially in the length whatever the
gates learn. Off by default, which keeps the linear memory on the exact delta-rule path.

The linear memory (memory_layers=1) with the l2 bias, l2 retention and plain gradient descent
is the gated delta rule (core.linear_memory_delta_rule): it runs on pallas_kernels.delta_rule,
which computes the exact per-token online update (what chunk_size=1 gives on the general path)
at chunked speed; `use_delta_rule=False` sends it down the general path instead.

Decoding (`NeuralMemoryCache`): the accumulator and momentum after the last token, the
accumulator at the start of the current chunk (the weights every gradient of that chunk is
taken at), the conv window, the token count, and per row the position in its current document
and that document's id. `step` re-anchors where a row's document begins a chunk, so
token-by-token decoding reproduces the chunked parallel form exactly. A prefill continues each
row's document wherever it is in its chunk (core.chunk_update_segments).

Packed documents (`segment_ids`, also for prefill and step, memzoo.registry): at each document's
first token the memory weights return to the learned initial ones, the momentum and the conv
window to zero, and the document is chunked from its own first token, so it gets, to float32
rounding, what it gets alone; on the delta-rule path the restart to the initial weights rides on
the kernel's zero restarts (core.linear_memory_delta_rule).
"""
from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

import pallas_kernels
from memzoo import layers
from memzoo.attention import check_segment_ids, segment_positions, segment_starts
from memzoo.linear_attention.common import check_positive_int, l2_normalize, normal_init
from memzoo.neural_memory import core
from memzoo.registry import register_mixer

ALPHA_LOGIT_MAX = 10.0   # alpha <= sigmoid(10) = 0.99995
# Initial gates (sigmoid of the bias): small steps, strong momentum, slow forgetting.
THETA_INIT, ETA_INIT, ALPHA_INIT = 0.3, 0.5, 0.01   # theta: a fraction of max_lr


@struct.dataclass
class NeuralMemoryCache:
    """anchor, weights, momentum: tuples of [b, H, in, out] float32 (momentum None for the
    "gd" rule); conv [b, conv_size - 1, 3 H K] or None; index int32: tokens seen; position [b]
    int32: tokens of each row's current document seen (its chunks start at the document's first
    token); segment [b] int32: that document's id (a different id starts a new document)."""
    anchor: tuple
    weights: tuple
    momentum: tuple | None
    conv: jax.Array | None
    index: jax.Array
    position: jax.Array
    segment: jax.Array


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class NeuralMemory(nnx.Module):
    """Test-time neural memory: [b, t, d] -> [b, t, d].

    Options: num_heads, head_dim (default d_model / num_heads), memory_layers (L_M >= 1),
    memory_expansion (hidden width = expansion x head_dim), chunk_size (C >= 1; 1 = per-token
    online), conv_size (0 or >= 2), attentional_bias / retention / learning_rule and their
    exponents (core.MemoryRule), max_lr, max_grad_norm (per-token clipping of the inner
    gradient, core.MemoryRule; None: off; a deep memory at max_lr 0.1 needs it, see the module
    docstring), use_delta_rule, remat (checkpoint every chunk).

    >>> mem = NeuralMemory(8, num_heads=2, chunk_size=4, rngs=nnx.Rngs(0))
    >>> mem(jnp.ones((1, 6, 8))).shape
    (1, 6, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 memory_layers: int = 2, memory_expansion: int = 2, chunk_size: int = 16,
                 conv_size: int = 4, attentional_bias: str = "l2", retention: str = "l2",
                 learning_rule: str = "momentum", p: float = 3.0, huber_delta: float = 1.0,
                 q: float = 4.0, kl_scale: float = 1.0, activation: str = "silu",
                 max_lr: float = 0.1, max_grad_norm: float | None = None,
                 use_delta_rule: bool = True, remat: bool = True,
                 implementation: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        owner = type(self).__name__
        check_positive_int(owner, "d_model", d_model)
        check_positive_int(owner, "num_heads", num_heads)
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"{owner}: d_model={d_model} is not divisible by "
                                 f"`num_heads`={num_heads}; pass `head_dim`")
            head_dim = d_model // num_heads
        check_positive_int(owner, "head_dim", head_dim)
        check_positive_int(owner, "memory_layers", memory_layers)
        check_positive_int(owner, "memory_expansion", memory_expansion)
        check_positive_int(owner, "chunk_size", chunk_size)
        if not (isinstance(conv_size, int) and not isinstance(conv_size, bool)
                and (conv_size == 0 or conv_size >= 2)):
            raise ValueError(f"{owner}: `conv_size` must be 0 (no convolution) or an integer "
                             f">= 2, got {conv_size!r}")
        if not (isinstance(max_lr, (int, float)) and max_lr > 0):
            raise ValueError(f"{owner}: `max_lr` must be > 0, got {max_lr!r}")
        if implementation not in pallas_kernels.IMPLEMENTATIONS:
            raise ValueError(f"{owner}: `implementation` must be one of "
                             f"{tuple(pallas_kernels.IMPLEMENTATIONS)}, got {implementation!r}")
        self.rule = core.MemoryRule(attentional_bias=attentional_bias, retention=retention,
                                    learning_rule=learning_rule, p=p, huber_delta=huber_delta,
                                    q=q, kl_scale=kl_scale, activation=activation,
                                    max_grad_norm=max_grad_norm)
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.memory_layers, self.chunk_size, self.conv_size = memory_layers, chunk_size, conv_size
        self.max_lr, self.remat, self.implementation, self.dtype = max_lr, remat, implementation, dtype
        self.delta_path = (use_delta_rule and memory_layers == 1 and attentional_bias == "l2"
                           and retention == "l2" and learning_rule == "gd"
                           and max_grad_norm is None)

        H, K = num_heads, head_dim
        self.wq = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wk = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wv = normal_init(rngs, (d_model, H, K), d_model, ("embed", "heads", "kv"))
        self.wo = normal_init(rngs, (H, K, d_model), H * K, ("heads", "kv", "embed"))
        bound = 1.0 / math.sqrt(max(conv_size, 1))
        self.conv_weight = layers.param(
            jax.random.uniform(rngs.params(), (conv_size, 3 * H * K), jnp.float32, -bound, bound),
            (None, None)) if conv_size else None
        # theta, eta, alpha logits per head. A zero kernel: the gates start at their biases for
        # every token (a fan-in init gave theta 0.6 with eta 0.95 on some tokens, which made a
        # 2-layer memory diverge to inf within 256 tokens) and become data-dependent in training.
        self.gate_proj = layers.Linear(d_model, 3 * H, axes=("embed", None),
                                       kernel_init=nnx.initializers.zeros, rngs=rngs)
        # The biases set the memory's time scales when the kernel is small (its step size, the
        # momentum's memory and the forgetting rate: alpha plays the part of Mamba's A and theta
        # of its dt), so they get the SSM dynamics' optimizer treatment: no weight decay, which
        # would pull every gate towards 0.5, and the SSM learning rate.
        self.gate_proj.bias = layers.param(jnp.repeat(jnp.asarray(
            [_logit(THETA_INIT), _logit(ETA_INIT), _logit(ALPHA_INIT)], jnp.float32), H), (None,),
            group="ssm_dynamics")
        sizes = [K] + [memory_expansion * K] * (memory_layers - 1) + [K]
        # The memory's initial weights (accumulators) are learned, one MLP per head. KL
        # retention starts from uniform rows (zero log-weights); the others from a fan-in normal.
        init_scale = 0.0 if retention == "kl" else 1.0
        self.memory_init = nnx.List([
            normal_init(rngs, (H, i, o), i, ("heads", None, None), scale=init_scale)
            for i, o in zip(sizes[:-1], sizes[1:])])
        self.out_norm = layers.RMSNorm(K, dtype=dtype)

    # ---- pieces --------------------------------------------------------------------------------
    @property
    def state_dtype(self):
        return jnp.promote_types(self.dtype, jnp.float32)

    def _initial(self, batch: int):
        leaves = tuple(jnp.broadcast_to(w[...].astype(self.state_dtype), (batch, *w.shape))
                       for w in self.memory_init)
        mom = (tuple(jnp.zeros_like(a) for a in leaves) if self.rule.momentum else None)
        return leaves, mom

    def _inputs(self, x, conv_state, decode: bool, segment_ids=None):
        """q, k, v [b, t, H, K] and theta, eta, alpha [b, t, H], and the new conv window."""
        b, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        x = x.astype(self.dtype)
        flat = jnp.concatenate([jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
                                .reshape(b, T, H * K) for w in (self.wq, self.wk, self.wv)], -1)
        new_conv = None
        if self.conv_weight is not None:
            w = self.conv_weight[...]
            if decode:
                y, new_conv = pallas_kernels.causal_conv1d_update(flat[:, 0], conv_state, w,
                                                                  activation="silu")
                flat = y[:, None]
            else:
                flat, new_conv = pallas_kernels.causal_conv1d(flat, w, activation="silu",
                                                              initial_state=conv_state,
                                                              segment_ids=segment_ids)
        flat = flat.astype(self.state_dtype)
        q, k, v = (flat[..., i * H * K:(i + 1) * H * K].reshape(b, T, H, K) for i in range(3))
        q, k = l2_normalize(q), l2_normalize(k)
        logits = self.gate_proj(x.astype(self.state_dtype)).astype(self.state_dtype)
        lt, le, la = (logits[..., i * H:(i + 1) * H] for i in range(3))
        theta = self.max_lr * jax.nn.sigmoid(lt)
        eta = jax.nn.sigmoid(le)
        alpha = jax.nn.sigmoid(jnp.minimum(la, ALPHA_LOGIT_MAX))
        return (q, k, v, theta, eta, alpha), new_conv

    def _output(self, y):
        y = self.out_norm(y.astype(self.dtype))
        return jnp.einsum("bthk,hkd->btd", y, self.wo[...].astype(self.dtype))

    def _chunked(self, inputs, acc, mom, **packed):
        q, k, v, theta, eta, alpha = inputs
        return core.chunked_memory(self.rule, acc, mom, k, v, q, theta, eta, alpha,
                                   chunk_size=self.chunk_size, remat=self.remat,
                                   implementation=self.implementation, **packed)

    def _token(self, inputs, anchor, acc, mom, position):
        """One token (inputs [b, 1, ...]): the chunk body with C = 1, its gradient taken at the
        chunk-start accumulator (refreshed where a row's document begins a new chunk)."""
        new_chunk = (position % self.chunk_size == 0)[:, None, None, None]
        anchor = tuple(jnp.where(new_chunk, a, c) for a, c in zip(acc, anchor))
        q, k, v, theta, eta, alpha = (jnp.moveaxis(t, 2, 1) for t in inputs)
        acc, mom, y, ya = core.chunk_update(self.rule, anchor, acc, mom, k, v, q, theta, eta,
                                            alpha, implementation=self.implementation)
        return jnp.moveaxis(y, 1, 2), jnp.moveaxis(ya, 1, 2), (anchor, acc, mom)

    def forward(self, x, cache: NeuralMemoryCache | None = None, *, decode: bool = False,
                segment_ids=None):
        """(y, y_anchor, cache): the output, the read of the chunk-start weights (both projected
        [b, t, d]; y_anchor is None on the delta-rule path) and the state after x.

        segment_ids [b, t] int: packed documents. Where the id changes (with a cache: also from
        the cache's `segment` to token 0) the memory weights, momentum and conv window return to
        their initial values, and the document's chunks start at its first token."""
        b, T, _ = x.shape
        initial, zero_mom = self._initial(b)
        if cache is None:
            anchor, acc, mom, conv = initial, initial, zero_mom, None
            index, position = jnp.zeros((), jnp.int32), jnp.zeros((b,), jnp.int32)
            segment, previous = jnp.zeros((b,), jnp.int32), None
        else:
            anchor, acc, mom, conv = cache.anchor, cache.weights, cache.momentum, cache.conv
            index, position, segment = cache.index, cache.position, cache.segment
            previous = segment
        reset = doc_pos = None
        if segment_ids is not None:
            reset = segment_starts(segment_ids, previous)
            doc_pos = segment_positions(segment_ids, position, previous)
            if cache is not None:   # a document from token 0 on: the state restarts before it
                r0 = reset[:, 0]

                def restart(old, new):
                    return None if old is None else tuple(
                        jnp.where(r0.reshape(-1, *[1] * (o.ndim - 1)), n.astype(o.dtype), o)
                        for o, n in zip(old, new))

                anchor, acc, mom = restart(anchor, initial), restart(acc, initial), \
                    restart(mom, zero_mom)
                if conv is not None:
                    conv = jnp.where(r0[:, None, None], 0.0, conv).astype(conv.dtype)
            segment = segment_ids[:, -1].astype(jnp.int32)
        inputs, conv = self._inputs(x, conv, decode, segment_ids)
        t = jnp.arange(T, dtype=jnp.int32)[None]
        if doc_pos is None:
            doc_pos = position[:, None] + t
        if self.delta_path:
            q, k, v, theta, _, alpha = inputs
            y, w = core.linear_memory_delta_rule(
                acc, k, v, q, theta, alpha, implementation=self.implementation,
                initial=initial, reset=reset)
            ya, state = None, (w, w, None)
        elif decode:
            y, ya, state = self._token(inputs, anchor, acc, mom, doc_pos[:, 0])
        elif reset is None and cache is None:
            y, ya, state = self._chunked(inputs, acc, mom)
        else:
            # A prefill: each row's document may be anywhere in its chunk, so the packed form
            # (with no starts when no ids are given) continues it exactly.
            y, ya, state = self._chunked(
                inputs, acc, mom, anchor=anchor, initial=initial, doc_pos=doc_pos,
                reset=jnp.zeros((b, T), bool) if reset is None else reset)
        new = NeuralMemoryCache(*state, conv, index + T, doc_pos[:, -1] + 1, segment)
        return self._output(y), None if ya is None else self._output(ya), new

    # ---- the SequenceMixer protocol ------------------------------------------------------------
    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> NeuralMemoryCache:
        """The state before any token; `max_len` is ignored (the state does not grow)."""
        del max_len
        acc, mom = self._initial(batch_size)
        conv = (jnp.zeros((batch_size, self.conv_size - 1, 3 * self.num_heads * self.head_dim),
                          self.state_dtype) if self.conv_size else None)
        return NeuralMemoryCache(acc, acc, mom, conv, jnp.zeros((), jnp.int32),
                                 jnp.zeros((batch_size,), jnp.int32),
                                 jnp.zeros((batch_size,), jnp.int32))

    def _check_cache(self, cache, batch: int) -> None:
        want = (batch, *self.memory_init[0].shape)
        if not isinstance(cache, NeuralMemoryCache) or tuple(cache.weights[0].shape) != want:
            got = (tuple(cache.weights[0].shape) if isinstance(cache, NeuralMemoryCache)
                   else type(cache).__name__)
            raise ValueError(f"{type(self).__name__}: `cache` must be a NeuralMemoryCache with "
                             f"first weights {want} (from init_cache({batch})), got {got}")

    def step(self, x_t, cache: NeuralMemoryCache, *, segment_ids=None):
        """One token; `segment_ids` [b] int: its document, a new one where it differs from the
        cache's (the memory restarts from its initial weights)."""
        owner = type(self).__name__
        layers.check_input(f"{owner}.step", "x_t", x_t, ndim=2, width=self.d_model,
                           legend="[batch, d_model]")
        self._check_cache(cache, x_t.shape[0])
        if segment_ids is not None:
            check_segment_ids(f"{owner}.step", segment_ids, x_t.shape[:1])
            segment_ids = segment_ids[:, None]
        y, _, cache = self.forward(x_t[:, None], cache, decode=True, segment_ids=segment_ids)
        return y[:, 0], cache

    def __call__(self, x, cache: NeuralMemoryCache | None = None, *, segment_ids=None):
        """Parallel (chunked) form, or with `cache` the prefill that continues from it.
        `segment_ids` [b, t] int: packed documents, nothing crosses a change of id (forward)."""
        owner = type(self).__name__
        layers.check_input(owner, "x", x, ndim=3, width=self.d_model)
        if segment_ids is not None:
            check_segment_ids(owner, segment_ids, x.shape[:2])
        if cache is None:
            return self.forward(x, segment_ids=segment_ids)[0]
        self._check_cache(cache, x.shape[0])
        y, _, cache = self.forward(x, cache, segment_ids=segment_ids)
        return y, cache


# ---- registered mixers: Titans' memory alone and the Miras variants -------------------------------
MIRAS = {
    # Moneta: l_p attentional bias (p = 3), l_q retention (q = 4), gradient descent.
    "moneta": dict(attentional_bias="lp", p=3.0, retention="lq", q=4.0, learning_rule="gd"),
    # Yaad: Huber attentional bias, l2 retention (weight decay), gradient descent.
    "yaad": dict(attentional_bias="huber", retention="l2", learning_rule="gd"),
    # Memora: l2 attentional bias, KL retention (softmax-normalised memory), gradient descent.
    "memora": dict(attentional_bias="l2", retention="kl", learning_rule="gd"),
}


register_mixer("neural_memory")(NeuralMemory)


def with_memory_keywords(fn, exclude=()):
    """Give `fn(..., **options)` (options forwarded to NeuralMemory) a signature that names
    NeuralMemory's keywords instead of the catch-all, so `memzoo.models.route_mixer_options`
    routes only those to it (a catch-all would receive every shared option, e.g. an SSM's
    state_size, and reject it)."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in own} | set(exclude) | {"self", "d_model"}
    extra = [p for p in inspect.signature(NeuralMemory.__init__).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names]
    fn.__signature__ = sig.replace(parameters=own + extra)
    return fn


def _miras(name: str, defaults: dict):
    def build(d_model: int, *, rngs: nnx.Rngs, **options):
        clash = sorted(set(options) & {"attentional_bias", "retention"})
        if clash:
            raise ValueError(f"{name}: {clash} are fixed by the variant; use the "
                             f"'neural_memory' mixer to choose them")
        return NeuralMemory(d_model, rngs=rngs, **{**defaults, **options})
    build.__name__ = name
    build.__doc__ = f"Miras' {name.capitalize()}: NeuralMemory with {defaults}."
    return with_memory_keywords(build, exclude=("attentional_bias", "retention"))


for _name, _defaults in MIRAS.items():
    register_mixer(_name)(_miras(_name, _defaults))
