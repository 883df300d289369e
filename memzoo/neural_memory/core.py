"""The test-time memory machinery shared by Titans and the Miras family: a memory MLP trained
online on an inner objective, computed in parallel over chunks of tokens.

Miras' decomposition (Behrouz et al., 2025), one object per axis:

  attentional bias  the inner loss l(M(k), v):            "l2"    ||M(k) - v||^2
                                                          "lp"    sum |M(k) - v|^p       (Moneta)
                                                          "huber" sum huber_delta(M(k) - v) (Yaad)
  retention gate    how the memory keeps its past; here the map from the linearly-updated
                    accumulator A to the weights W = readout(A):
                                                          "l2"    W = A (weight decay: Titans)
                                                          "lq"    W = A / ||A||_q^(q-2) (Moneta)
                                                          "kl"    W = c softmax(A) over each
                                                                  row (Memora: KL retention,
                                                                  normalised memory)
  learning rule     "gd"        A_t = (1 - alpha_t) A_{t-1} - theta_t g_t
                    "momentum"  S_t = eta_t S_{t-1} - theta_t g_t ;  A_t = (1 - alpha_t) A_{t-1} + S_t
                                (Titans' surprise S and forgetting alpha)
  optional          per-token clipping of g to norm `max_grad_norm` (as titans-pytorch offers)
  inner model       the MLP's layers with biases (`layer_bias`), and TTT's residual layer norm
                    M(x) = x + LN(mlp(x)) * gamma + beta (`residual_norm`; Sun et al., 2024),
                    whose gamma and beta are leaves the inner loop does not train (their
                    gradients are zero, so with alpha = 0 they keep their outer-learned values)

with g_t = grad_W l(M_W(k_t), v_t). For "kl", A is the log-weights: Memora's
W_t = c softmax((1 - alpha_t) log W_{t-1} - theta_t g_t) is, since softmax ignores a constant
shift per row, exactly A_t = (1 - alpha_t) A_{t-1} - theta_t g_t with W_t = c softmax(A_t); for
"lq" the same holds by Moneta's definition (A accumulates, W normalises it). So every variant
keeps one linear recurrence on A, which is what makes chunked training possible.

Chunked (parallel) training, chunk size C (Titans Sec. 3.2): every token of a chunk takes its
gradient at the chunk-start weights W_0 = readout(A_0), so the C gradients are independent,
`jax.vmap(jax.grad(l))`; momentum and decay across the chunk's tokens are the linear recurrences
above, run by `pallas_kernels.linear_scan` with the memory's parameter leaves flattened into
channels ([batch * heads, C, params]); the chunks follow each other in a `lax.scan`. C = 1 is
the exact per-token online rule. Retrieval y_t = M_{W_t}(q_t) reads the weights after token t's
update, without updating them; `anchor` retrievals M_{W_0}(q_t) (MAC's context) read the
chunk-start weights.

Memory: the chunk body is wrapped in `jax.checkpoint`, and groups of about sqrt(T / C) chunks
are checkpointed again (`_scan_chunks`), so a backward pass keeps the per-token activations
([time x width]) and about 2 sqrt(T / C) copies of the memory's weights, never per-token ones:
the per-token weights [C, params] and gradients of a chunk exist only while that chunk is
computed or recomputed (tests/memzoo/test_neural_memory.py measures it with XLA's memory
analysis).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

import pallas_kernels

ATTENTIONAL_BIASES = ("l2", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")
LEARNING_RULES = ("gd", "momentum")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu, "tanh": jnp.tanh}
# lq retention divides by a norm; an accumulator at exactly 0 must not make NaNs.
NORM_EPS = 1e-6


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class MemoryRule:
    """attentional bias x retention gate x learning rule (module docstring), plus the memory
    MLP's activation between layers. Validated when built: a bad name or exponent is a
    ValueError naming the argument."""
    attentional_bias: str = "l2"
    retention: str = "l2"
    learning_rule: str = "momentum"
    p: float = 3.0                  # lp bias exponent (> 1: |e|^p has a gradient at e = 0)
    huber_delta: float = 1.0        # huber bias: quadratic below delta, linear above
    q: float = 4.0                  # lq retention exponent (>= 2; 2 is plain l2)
    kl_scale: float = 1.0           # kl retention: each row of W sums to this
    activation: str = "silu"
    # Per-token gradient clipping: g <- g min(1, max_grad_norm / ||g||) (the global norm over
    # the memory's leaves; None: off). It bounds every token's write, so the weights can grow
    # at most polynomially in the sequence length whatever the gates do: without it a 2-layer
    # memory at theta = 0.1 overflows float32 within 128 tokens (test_neural_memory.py).
    max_grad_norm: float | None = None
    # The inner model's leaves: [W_1, (b_1,) W_2, (b_2,) ..., (gamma, beta)], biases and the
    # norm's scale and shift as [1, out] rows (so every leaf is a matrix, as the scans expect).
    layer_bias: bool = False
    residual_norm: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name, value, choices in (("attentional_bias", self.attentional_bias,
                                      ATTENTIONAL_BIASES),
                                     ("retention", self.retention, RETENTIONS),
                                     ("learning_rule", self.learning_rule, LEARNING_RULES),
                                     ("activation", self.activation, tuple(ACTIVATIONS))):
            _require(value in choices, f"MemoryRule: `{name}` must be one of {choices}, "
                                       f"got {value!r}")
        _require(isinstance(self.p, (int, float)) and self.p > 1,
                 f"MemoryRule: `p` (lp attentional bias) must be a number > 1, got {self.p!r}")
        _require(isinstance(self.huber_delta, (int, float)) and self.huber_delta > 0,
                 f"MemoryRule: `huber_delta` must be > 0, got {self.huber_delta!r}")
        _require(isinstance(self.q, (int, float)) and self.q >= 2,
                 f"MemoryRule: `q` (lq retention) must be a number >= 2, got {self.q!r}")
        _require(isinstance(self.kl_scale, (int, float)) and self.kl_scale > 0,
                 f"MemoryRule: `kl_scale` must be > 0, got {self.kl_scale!r}")
        _require(self.max_grad_norm is None or (isinstance(self.max_grad_norm, (int, float))
                                                and self.max_grad_norm > 0),
                 f"MemoryRule: `max_grad_norm` must be None or > 0, got {self.max_grad_norm!r}")
        _require(self.retention == "l2" or not (self.layer_bias or self.residual_norm),
                 f"MemoryRule: `layer_bias` / `residual_norm` need retention 'l2' (the lq and "
                 f"kl readouts would renormalise the bias and norm rows), got "
                 f"{self.retention!r}")
        _require(isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0,
                 f"MemoryRule: `norm_eps` must be > 0, got {self.norm_eps!r}")

    @property
    def momentum(self) -> bool:
        return self.learning_rule == "momentum"

    # ---- the attentional bias ----------------------------------------------------------------
    def loss(self, pred: jax.Array, target: jax.Array) -> jax.Array:
        e = pred - target
        if self.attentional_bias == "l2":
            return jnp.sum(e * e)
        if self.attentional_bias == "lp":
            return jnp.sum(jnp.abs(e) ** self.p)
        a, d = jnp.abs(e), self.huber_delta
        # 0.5 e^2 inside, d (|e| - d/2) outside: continuous value and slope at |e| = d.
        return jnp.sum(jnp.where(a <= d, 0.5 * e * e, d * (a - 0.5 * d)))

    # ---- the retention gate: accumulator -> weights ------------------------------------------
    def readout_leaf(self, a: jax.Array) -> jax.Array:
        """One weight matrix [..., in, out] from its accumulator."""
        if self.retention == "l2":
            return a
        if self.retention == "lq":
            norm = jnp.sum(jnp.abs(a) ** self.q, axis=(-2, -1), keepdims=True) ** (1.0 / self.q)
            return a / jnp.maximum(norm, NORM_EPS) ** (self.q - 2.0)
        return self.kl_scale * jax.nn.softmax(a, axis=-1)

    def readout(self, leaves: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        return tuple(self.readout_leaf(a) for a in leaves)

    # ---- the memory MLP ----------------------------------------------------------------------
    def apply(self, weights: Sequence[jax.Array], x: jax.Array) -> jax.Array:
        """M_W(x) for one vector x [in]: linear layers [in, out] (+ bias rows) with the
        activation between them (one layer: the linear memory x W), and with `residual_norm`
        x + LN(.) * gamma + beta around them."""
        act = ACTIVATIONS[self.activation]
        leaves = list(weights)
        if self.residual_norm:
            leaves, (gamma, beta) = leaves[:-2], leaves[-2:]
        step = 2 if self.layer_bias else 1
        h = x
        for i in range(0, len(leaves), step):
            h = h @ leaves[i]
            if self.layer_bias:
                h = h + leaves[i + 1][0]
            if i + step < len(leaves):
                h = act(h)
        if self.residual_norm:
            mean = jnp.mean(h, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
            h = x + (h - mean) * jax.lax.rsqrt(var + self.norm_eps) * gamma[0] + beta[0]
        return h

    def token_grad(self, weights, k, v):
        """g = grad_W l(M_W(k), v): one token's gradient, a tuple like `weights`, clipped to
        norm `max_grad_norm` when that is set (zero for the residual norm's gamma, beta)."""
        g = jax.grad(lambda w: self.loss(self.apply(w, k), v))(tuple(weights))
        if self.residual_norm:
            g = g[:-2] + tuple(jnp.zeros_like(x) for x in g[-2:])
        if self.max_grad_norm is None:
            return g
        sq = sum(jnp.sum(x * x) for x in g)
        # 1 below the threshold; the `where` keeps the gradient of the scale finite at g = 0.
        safe = jnp.where(sq > 0, sq, 1.0)
        scale = jnp.minimum(1.0, self.max_grad_norm * jax.lax.rsqrt(safe))
        return tuple(x * scale.astype(x.dtype) for x in g)


# ---- flattening parameter leaves into scan channels ---------------------------------------------
def _flatten(leaves, lead: int):
    """Leaves [*lead, i, o] (the same `lead` leading dims) -> [*lead, sum of i*o]: every
    parameter of the memory becomes a channel of one scan."""
    return jnp.concatenate([a.reshape(*a.shape[:lead], -1) for a in leaves], axis=-1)


def _unflatten(flat, shapes):
    out, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[..., start:start + n].reshape(*flat.shape[:-1], *shape))
        start += n
    return tuple(out)


def _grads(rule: MemoryRule, w, k, v):
    """Every token's gradient at the shared weights w (leaves [B, H, i, o]): independent, so one
    vmap(grad); k, v [B, H, C, d] -> [B * H, C, params]."""
    per_token = jax.vmap(rule.token_grad, in_axes=(None, 0, 0))
    grads = jax.vmap(jax.vmap(per_token))(w, k, v)                # leaves [B, H, C, i, o]
    B, H, C = k.shape[:3]
    return _flatten(grads, 3).reshape(B * H, C, -1)


def _accumulate(rule: MemoryRule, g, acc, mom, theta, eta, alpha, *, implementation,
                reset=None, initial=None):
    """The momentum and decay scans over one chunk's gradients g [BH, C, P] from (acc, mom)
    (tuples of [B, H, i, o]). `reset` [B, C] bool: the token begins a document, so before it the
    accumulator returns to `initial` and the momentum to 0 (the scan's decay is zeroed there and
    `initial` enters as an input). Returns (acc_tok [BH, C, P], acc_end, mom_end [BH, P])."""
    B, H = acc[0].shape[:2]
    BH, C = g.shape[:2]
    dtype = g.dtype

    def per_token(x):   # [B, H, C] -> [BH, C, 1]
        return x.reshape(BH, C, 1).astype(dtype)

    start = None if reset is None else jnp.broadcast_to(reset[:, None, :], (B, H, C)).reshape(
        BH, C, 1)
    th = per_token(theta)
    if rule.momentum:
        a_eta = jnp.broadcast_to(per_token(eta), g.shape)
        if start is not None:
            a_eta = jnp.where(start, 0.0, a_eta)
        update, mom_end = pallas_kernels.linear_scan(
            a_eta, -th * g, initial_state=_flatten(mom, 2).reshape(BH, -1),
            implementation=implementation)
    else:
        update, mom_end = -th * g, None
    keep = jnp.broadcast_to(per_token(1.0 - alpha), g.shape)
    if start is not None:
        update = update + jnp.where(start, keep * _flatten(initial, 2).reshape(BH, 1, -1)
                                    .astype(dtype), 0.0)
        keep = jnp.where(start, 0.0, keep)
    acc_tok, acc_end = pallas_kernels.linear_scan(
        keep, update, initial_state=_flatten(acc, 2).reshape(BH, -1),
        implementation=implementation)
    return acc_tok, acc_end, mom_end


def _read(rule: MemoryRule, w, q, per_token: bool):
    """M_w(q) for q [B, H, C, dk]: w leaves [B, H, C, i, o] (per token) or [B, H, i, o]."""
    return jax.vmap(jax.vmap(jax.vmap(rule.apply, in_axes=(0 if per_token else None, 0))))(w, q)


def _restore(flat, shapes, like):
    """[B, H, P] flat state -> leaves shaped and typed like `like`."""
    B, H = like[0].shape[:2]
    return tuple(a.astype(x.dtype) for a, x in zip(_unflatten(flat.reshape(B, H, -1), shapes),
                                                     like))


def chunk_update(rule: MemoryRule, anchor, acc, mom, k, v, q, theta, eta, alpha, *,
                 implementation: str = "auto"):
    """One chunk of C tokens (the body the parallel form scans and `step` runs with C = 1).

    anchor, acc, mom: tuples of [B, H, i, o] (mom None for "gd"): the accumulator whose weights
      give every gradient of this chunk, the accumulator and momentum entering the chunk.
    k [B, H, C, dk], v [B, H, C, dv], q [B, H, C, dk]; theta, eta, alpha [B, H, C].
    Returns (acc_end, mom_end, y [B, H, C, dv], y_anchor [B, H, C, dv]).
    """
    B, H, C = k.shape[:3]
    shapes = [a.shape[2:] for a in acc]
    w0 = rule.readout(anchor)
    g = _grads(rule, w0, k, v)
    acc_tok, acc_end, mom_end = _accumulate(rule, g, acc, mom, theta, eta, alpha,
                                            implementation=implementation)
    w_tok = rule.readout(_unflatten(acc_tok.reshape(B, H, C, -1), shapes))   # [B, H, C, i, o]
    return (_restore(acc_end, shapes, acc),
            None if mom_end is None else _restore(mom_end, shapes, mom),
            _read(rule, w_tok, q, True), _read(rule, w0, q, False))


def chunk_update_segments(rule: MemoryRule, anchor, acc, mom, initial, k, v, q, theta, eta,
                          alpha, reset, doc_pos, *, chunk_size: int,
                          implementation: str = "auto"):
    """`chunk_update` for packed documents: every token sees what it would see were its
    document alone, chunked from its own first token.

    reset [B, C] bool: the token begins a document (the state returns to `initial` before it);
    doc_pos [B, C] int: its position in its document. This chunk holds C <= chunk_size tokens
    (the last one may be partial); the documents' own chunks have chunk_size tokens. A token's
    gradient is taken at the accumulator before the start of its document's chunk,
    p = t - doc_pos % chunk_size, which is one of
      A  p before this chunk: `anchor` (carried: the last token's anchor, same document);
      I  p in this chunk and the document's first token: `initial`;
      R  p in this chunk, later in a document begun before it (only the chunk's first
         document can): the accumulator after token p - 1, which depends on the gradients of the
         A tokens before p. So a first pass (A and I gradients) finds it, and a second pass
         runs the chunk with every gradient at its own anchor.
    Three shared-weight gradient evaluations and two scans instead of one each: the price of
    documents that start anywhere. Returns (anchor_end, acc_end, mom_end, y, y_anchor), anchor_end
    the accumulator the next chunk's A tokens take their gradients at.
    """
    B, H, C = k.shape[:3]
    shapes = [a.shape[2:] for a in acc]
    j = jnp.arange(C, dtype=jnp.int32)[None]
    p = j - jnp.mod(doc_pos, chunk_size)        # chunk-local start of the token's document chunk
    # Kind A (p < 0) is what is neither I nor R: the `where`s below fall through to it.
    kind_i = (p >= 0) & (p == j - doc_pos)
    kind_r = (p >= 0) & ~kind_i

    def pick(mask, x, y):   # mask [B, C]; x, y [BH, C, ...]
        m = jnp.broadcast_to(mask[:, None], (B, H, C)).reshape(B * H, C, *([1] * (x.ndim - 2)))
        return jnp.where(m, x, y)

    w_a, w_i = rule.readout(anchor), rule.readout(initial)
    g_i = _grads(rule, w_i, k, v)
    g1 = pick(kind_i, g_i, _grads(rule, w_a, k, v))
    acc_tok, _, _ = _accumulate(rule, g1, acc, mom, theta, eta, alpha, reset=reset,
                                initial=initial, implementation=implementation)
    # The accumulator before each token (the carried one before token 0), at the R tokens' p.
    before = jnp.concatenate([_flatten(acc, 2).reshape(B * H, 1, -1).astype(acc_tok.dtype),
                              acc_tok[:, :-1]], axis=1).reshape(B, H, C, -1)
    p_r = jnp.max(jnp.where(kind_r, p, 0), axis=1)                            # [B]
    anchor_r = _restore(jnp.take_along_axis(before, p_r[:, None, None, None], axis=2)[:, :, 0],
                        shapes, acc)
    w_r = rule.readout(anchor_r)
    g = pick(kind_r, _grads(rule, w_r, k, v), g1)
    acc_tok, acc_end, mom_end = _accumulate(rule, g, acc, mom, theta, eta, alpha, reset=reset,
                                            initial=initial, implementation=implementation)
    w_tok = rule.readout(_unflatten(acc_tok.reshape(B, H, C, -1), shapes))
    y = _read(rule, w_tok, q, True)

    def pick_read(mask, x, y):   # mask [B, C]; x, y [B, H, C, dv]
        return jnp.where(mask[:, None, :, None], x, y)

    y_anchor = pick_read(kind_r, _read(rule, w_r, q, False),
                         pick_read(kind_i, _read(rule, w_i, q, False), _read(rule, w_a, q, False)))
    last_i, last_r = kind_i[:, -1, None, None, None], kind_r[:, -1, None, None, None]
    anchor_end = tuple(jnp.where(last_r, r, jnp.where(last_i, i.astype(a.dtype), a))
                       for a, i, r in zip(anchor, initial, anchor_r))
    return (anchor_end, _restore(acc_end, shapes, acc),
            None if mom_end is None else _restore(mom_end, shapes, mom), y, y_anchor)


def _scan_chunks(step, carry, xs, remat: bool):
    """lax.scan of `step` over the n chunks of `xs`; with remat, two levels of checkpoints.

    A checkpointed body alone still saves the carry (the memory's accumulator and momentum,
    2 x params) at every chunk boundary: n copies, a term in time x params / C. Grouping the
    chunks into about sqrt(n) groups of about sqrt(n) chunks and checkpointing both levels saves
    the carry only at group boundaries, and the backward of one group recomputes its sqrt(n)
    chunk boundaries: about 2 sqrt(n) copies of the weights instead of n, for one more forward
    pass of the memory. The remaining growth with time is the per-token activations."""
    n = jax.tree.leaves(xs)[0].shape[0]
    group = max(1, math.isqrt(n))
    if not remat or group == 1:
        return jax.lax.scan(step, carry, xs)
    outer, rest = divmod(n, group)

    @jax.checkpoint
    def run_group(carry, group_xs):
        return jax.lax.scan(step, carry, group_xs)

    head = jax.tree.map(lambda x: x[:outer * group].reshape(outer, group, *x.shape[1:]), xs)
    carry, ys = jax.lax.scan(run_group, carry, head)
    ys = jax.tree.map(lambda y: y.reshape(outer * group, *y.shape[2:]), ys)
    if rest:
        carry, ys_rest = jax.lax.scan(step, carry,
                                      jax.tree.map(lambda x: x[outer * group:], xs))
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_rest)
    return carry, ys


def chunked_memory(rule: MemoryRule, acc, mom, k, v, q, theta, eta, alpha, *, chunk_size: int,
                   implementation: str = "auto", remat: bool = True, anchor=None, initial=None,
                   reset=None, doc_pos=None):
    """The parallel form over T tokens from (acc, mom), chunks aligned with the first token.

    k, q [B, T, H, dk]; v [B, T, H, dv]; theta, eta, alpha [B, T, H]; acc, mom as in
    `chunk_update`. Returns (y, y_anchor [B, T, H, dv], (anchor, acc, mom) after the last token),
    where `anchor` is the accumulator the last token's gradient was taken at (unpacked, after a
    whole number of chunks: the final accumulator, where the next chunk starts).

    Packed documents (`chunk_update_segments`): reset [B, T] bool marks each document's first
    token, where the state returns to `initial` (accumulators [B, H, i, o]; momentum 0);
    doc_pos [B, T] int is each token's position in its document, whose chunks start at its own
    first token wherever that falls; `anchor` is the carried anchor of a document begun before
    the call (default `acc`). Each document then gets, to rounding, what it gets alone.
    """
    _require(isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1,
             f"chunked_memory: `chunk_size` must be an integer >= 1, got {chunk_size!r}")
    B, T, H = k.shape[:3]
    C = chunk_size
    n, r = divmod(T, C)
    packed = reset is not None

    def heads_first(x):  # [B, T, H, ...] -> [B, H, T, ...]
        return jnp.moveaxis(x, 2, 1)

    seq = tuple(heads_first(x) for x in (k, v, q, theta, eta, alpha))
    per_row = (reset, doc_pos) if packed else ()

    def body(carry, xs):
        anchor, acc, mom = carry
        if packed:
            anchor, acc_end, mom_end, y, ya = chunk_update_segments(
                rule, anchor, acc, mom, initial, *xs, chunk_size=C,
                implementation=implementation)
        else:
            acc_end, mom_end, y, ya = chunk_update(rule, acc, acc, mom, *xs,
                                                   implementation=implementation)
            anchor = acc
        return (anchor, acc_end, mom_end), (y, ya)

    step = jax.checkpoint(body) if remat else body
    ys, yas = [], []
    carry = (acc if anchor is None else anchor, acc, mom)
    if n:
        def split(x, axis):  # [B, (H,) n*C, ...] -> [n, B, (H,) C, ...]
            x = jax.lax.slice_in_dim(x, 0, n * C, axis=axis)
            x = x.reshape(*x.shape[:axis], n, C, *x.shape[axis + 1:])
            return jnp.moveaxis(x, axis, 0)

        carry, (y, ya) = _scan_chunks(
            step, carry, tuple(split(x, 2) for x in seq) + tuple(split(x, 1) for x in per_row),
            remat)
        # [n, B, H, C, dv] -> [B, H, n*C, dv]
        ys.append(jnp.moveaxis(y, 0, 2).reshape(B, H, n * C, -1))
        yas.append(jnp.moveaxis(ya, 0, 2).reshape(B, H, n * C, -1))
    if r:
        carry, (y, ya) = step(carry, tuple(x[:, :, n * C:] for x in seq)
                              + tuple(x[:, n * C:] for x in per_row))
        ys.append(y)
        yas.append(ya)
    y = jnp.concatenate(ys, axis=2) if len(ys) > 1 else ys[0]
    ya = jnp.concatenate(yas, axis=2) if len(yas) > 1 else yas[0]
    anchor, acc, mom = carry
    if not packed and not r:
        anchor = acc   # the next token starts a chunk (the cache re-anchors there anyway)
    return jnp.moveaxis(y, 1, 2), jnp.moveaxis(ya, 1, 2), (anchor, acc, mom)


def linear_memory_delta_rule(acc, k, v, q, theta, alpha, *, chunk_size=None,
                             implementation: str = "auto", initial=None, reset=None):
    """The linear memory (one layer, W [dk, dv]) with the l2 bias, l2 retention and no momentum,
    by `pallas_kernels.delta_rule`: the exact per-token online rule (chunk size 1), at the
    delta rule's chunked speed.

    W_t = (1 - alpha) W_{t-1} - theta 2 k (k^T W_{t-1} - v)^T is the delta rule
    S_t = e^g S_{t-1} + beta k (v' - e^g S_{t-1}^T k)^T with e^g = 1 - alpha,
    beta = 2 theta / (1 - alpha) and v' = (1 - alpha) v (expand both: the terms match one by one).
    acc: (W [B, H, dk, dv],); k, q [B, T, H, dk]; v [B, T, H, dv]; theta, alpha [B, T, H].
    Returns (y [B, T, H, dv], W after the last token).

    Packed documents: reset [B, T] bool marks each document's first token, where W returns to
    `initial` (W0 [B, H, dk, dv],), not to the zero state the kernel's segments restart from. W is
    affine in its start: from a start s, W_t = S0_t + Phi_t W0 with S0 the kernel's zero-start
    state and Phi_t = prod e^g (I - beta k k^T). X_t = Phi_t - G_t I (G_t = prod e^g within the
    document) starts at 0 and is itself a delta rule, with values -G_t k:
    X_t = e^g X_{t-1} + beta k (-G_t k - e^g X_{t-1}^T k)^T. So one kernel call with dk more value
    columns gives q^T S0 and q^T X, and q^T W_t = q^T S0_t + (q^T X_t + G_t q^T) W0.
    """
    keep = 1.0 - alpha
    beta = 2.0 * theta / keep
    log_gate = jnp.log(keep)
    kw = dict(log_gate=log_gate, scale=1.0, chunk_size=chunk_size, implementation=implementation)
    start = acc[0]
    if reset is not None:
        w0 = initial[0].astype(acc[0].dtype)
        # A document starting at token 0 starts from W0 itself; later starts are the kernel's
        # segments (it resets to zero there) plus the W0 term above.
        start = jnp.where(reset[:, 0, None, None, None], w0, acc[0])
    if reset is None or k.shape[1] == 1:   # no start after token 0 (the decoding step)
        y, state = pallas_kernels.delta_rule(q, k, v * keep[..., None], beta,
                                             initial_state=start, **kw)
        return y, (state.astype(acc[0].dtype),)
    seg = jnp.cumsum(reset.at[:, 0].set(False), axis=1, dtype=jnp.int32)
    later = (seg > 0)[..., None, None]
    log_g, _ = pallas_kernels.linear_scan(jnp.ones_like(log_gate), log_gate, segment_ids=seg,
                                          implementation=implementation)
    g_doc = jnp.exp(log_g)
    dv = v.shape[-1]
    o, state = pallas_kernels.delta_rule(
        q, k, jnp.concatenate([v * keep[..., None], -g_doc[..., None] * k], axis=-1), beta,
        initial_state=jnp.concatenate([start, jnp.zeros((*start.shape[:-1], k.shape[-1]),
                                                        start.dtype)], axis=-1),
        segment_ids=seg, **kw)
    w0o = w0.astype(o.dtype)
    y = o[..., :dv] + jnp.where(later, jnp.einsum("bthi,bhio->btho",
                                                  o[..., dv:] + g_doc[..., None] * q, w0o), 0.0)
    eye = jnp.eye(k.shape[-1], dtype=state.dtype)
    phi = state[..., dv:] + g_doc[:, -1, :, None, None].astype(state.dtype) * eye[None, None]
    final = state[..., :dv] + jnp.where(later[:, -1, None], phi @ w0.astype(state.dtype), 0.0)
    return y, (final.astype(acc[0].dtype),)
