"""NeuralMemory (Titans) and the Miras variants: the chunked parallel form against the
definitions written out naively here in float64 (per-token online rule for chunk size 1, the
mini-batch gradient-descent rule for chunk size C), the delta-rule path, decoding == parallel
for the memory and for MAC / MAG / MAL, memory of the backward pass from XLA's analysis, errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.neural_memory import MemoryRule, NeuralMemory, chunked_memory, core
from tests.memzoo import helpers

B, T, H, K = 1, 7, 2, 3


# ---- the definitions, written out -----------------------------------------------------------------
def naive_loss(rule, weights, k, v):
    h = k
    for i, w in enumerate(weights):
        h = h @ w
        if i + 1 < len(weights):
            h = h * (1.0 / (1.0 + jnp.exp(-h)))          # silu
    e = h - v
    if rule.attentional_bias == "l2":
        return jnp.sum(e ** 2)
    if rule.attentional_bias == "lp":
        return jnp.sum(jnp.abs(e) ** rule.p)
    d = rule.huber_delta
    return jnp.sum(jnp.where(jnp.abs(e) <= d, 0.5 * e ** 2, d * jnp.abs(e) - 0.5 * d * d))


def naive_mlp(weights, x):
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i + 1 < len(weights):
            h = h * (1.0 / (1.0 + jnp.exp(-h)))
    return h


def naive_readout(rule, acc):
    if rule.retention == "l2":
        return list(acc)
    if rule.retention == "lq":
        return [a / (jnp.sum(jnp.abs(a) ** rule.q) ** (1 / rule.q)) ** (rule.q - 2) for a in acc]
    return [rule.kl_scale * jnp.exp(a) / jnp.sum(jnp.exp(a), axis=-1, keepdims=True) for a in acc]


def naive_memory(rule, acc0, k, v, q, theta, eta, alpha, chunk):
    """Loops over batch, heads, tokens: every token's gradient taken at the accumulator of its
    chunk's start (chunk = 1: the online rule, each gradient at the previous token's weights),
    rescaled to norm rule.max_grad_norm when its norm is larger, then momentum S = eta S - theta g (or the plain step -theta g), A = (1 - alpha) A + S,
    read y_t = M_{readout(A_t)}(q_t)."""
    Bn, Tn, Hn = k.shape[:3]
    y = np.zeros(v.shape)
    # jitted once per call: eager dispatch of every small op dominated the test's time
    token_grad = jax.jit(jax.grad(lambda w, k_t, v_t: naive_loss(rule, w, k_t, v_t)))
    read = jax.jit(lambda acc, q_t: naive_mlp(naive_readout(rule, acc), q_t))
    for b in range(Bn):
        for h in range(Hn):
            acc = [a[b, h] for a in acc0]
            mom = [jnp.zeros_like(a) for a in acc]
            for t in range(Tn):
                if t % chunk == 0:
                    anchor = [jnp.asarray(w) for w in naive_readout(rule, acc)]
                g = token_grad(anchor, k[b, t, h], v[b, t, h])
                norm = np.sqrt(sum(float(jnp.sum(gi ** 2)) for gi in g))
                if rule.max_grad_norm is not None and norm > rule.max_grad_norm:
                    g = [gi * (rule.max_grad_norm / norm) for gi in g]
                if rule.learning_rule == "momentum":
                    mom = [eta[b, t, h] * m - theta[b, t, h] * gi for m, gi in zip(mom, g)]
                    upd = mom
                else:
                    upd = [-theta[b, t, h] * gi for gi in g]
                acc = [(1 - alpha[b, t, h]) * a + u for a, u in zip(acc, upd)]
                y[b, t, h] = read(acc, q[b, t, h])
    return y


def random_inputs(seed, sizes, *, batch=B, length=T, heads=H):
    r = np.random.default_rng(seed)
    k = r.normal(size=(batch, length, heads, sizes[0]))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = r.normal(size=k.shape)
    v = r.normal(size=(batch, length, heads, sizes[-1]))
    theta, eta, alpha = (r.uniform(lo, hi, (batch, length, heads))
                         for lo, hi in ((0.05, 0.4), (0.3, 0.9), (0.0, 0.2)))
    acc = tuple(r.normal(size=(batch, heads, i, o)) / np.sqrt(i)
                for i, o in zip(sizes[:-1], sizes[1:]))
    return acc, k, v, q, theta, eta, alpha


def run_chunked(rule, acc, k, v, q, theta, eta, alpha, chunk):
    mom = tuple(np.zeros_like(a) for a in acc) if rule.momentum else None
    with jax.enable_x64(True):
        f = jax.jit(lambda *a: chunked_memory(rule, *a, chunk_size=chunk)[0])
        y = f(acc, mom, k, v, q, theta, eta, alpha)
        return np.asarray(y), y.dtype


def naive64(rule, acc, k, v, q, theta, eta, alpha, chunk):
    with jax.enable_x64(True):
        return naive_memory(rule, acc, k, v, q, theta, eta, alpha, chunk)


def assert_rel(y, ref, tol, what):
    err = np.sqrt(np.mean((y - ref) ** 2)) / np.sqrt(np.mean(ref ** 2))
    assert err <= tol, f"{what}: relative RMSE {err:.3g} > {tol}"


# ---- exactness of the chunked form --------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3])
def test_titans_chunked_equals_definition_float64(chunk):
    """chunk 1: the per-token online rule; chunk 3 over 7 tokens (two full chunks and a partial
    one): the mini-batch rule. Two-layer memory MLP, momentum, forgetting."""
    rule = MemoryRule()
    args = random_inputs(chunk, (K, 5, K))
    y, dtype = run_chunked(rule, *args, chunk)
    assert dtype == jnp.float64
    np.testing.assert_allclose(y, naive64(rule, *args, chunk), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3])
def test_clipped_gradients_equal_definition_float64(chunk):
    """Per-token gradient clipping (max_grad_norm) against the definition; the threshold is
    below most tokens' gradient norms, so clipping is active (checked) but not on all tokens."""
    rule = MemoryRule(max_grad_norm=2.0)
    args = random_inputs(21, (K, 5, K))
    acc, k, v = args[0], args[1], args[2]
    with jax.enable_x64(True):
        g = jax.vmap(MemoryRule().token_grad, in_axes=(None, 0, 0))(
            tuple(a[0, 0] for a in acc), k[0, :, 0], v[0, :, 0])
        norms = np.sqrt(sum(np.sum(np.asarray(x) ** 2, axis=(1, 2)) for x in g))
    assert (norms > 2.0).any() and (norms < 2.0).any(), norms
    y, _ = run_chunked(rule, *args, chunk)
    np.testing.assert_allclose(y, naive64(rule, *args, chunk), rtol=1e-10, atol=1e-12)


def test_gradient_clipping_keeps_a_deep_memory_finite_at_large_gates():
    """The NIAH 2-layer MAG divergence, isolated: theta at its cap 0.1, strong momentum
    (eta 0.99), no forgetting, chunks of 16 over 128 tokens in float32. Unclipped, the chunk
    step is past the inner loss's stability bound and the weights overflow; clipped, every
    write is at most theta * c, so ||A_T - A_0|| <= sum_t ||S_t|| <= sum_t sum_s<=t
    eta^(t-s) theta c."""
    n, heads, width, c = 128, 2, 16, 1.0
    acc, k, v, q, *_ = random_inputs(3, (width, 2 * width, width), length=n, heads=heads)
    f32 = lambda x: np.asarray(x, np.float32)
    theta, eta, alpha = (np.full((B, n, heads), x, np.float32) for x in (0.1, 0.99, 0.0))

    def final(rule):
        mom = tuple(np.zeros_like(f32(a)) for a in acc)
        y, _, (_, acc_end, _) = jax.jit(lambda *a: chunked_memory(rule, *a, chunk_size=16))(
            tuple(f32(a) for a in acc), mom, f32(k), f32(v), f32(q), theta, eta, alpha)
        return np.asarray(y), acc_end

    y, _ = final(MemoryRule())
    assert not np.isfinite(y).all()              # the failure the clipping removes
    y, acc_end = final(MemoryRule(max_grad_norm=c))
    assert np.isfinite(y).all()
    moved = np.sqrt(sum(np.sum((np.asarray(a) - f32(a0)) ** 2, axis=(-2, -1))
                        for a, a0 in zip(acc_end, acc)))          # [B, H]
    mom_bound = np.cumsum(0.1 * c * 0.99 ** -np.arange(n)) * 0.99 ** np.arange(n)
    assert (moved <= mom_bound.sum() * (1 + 1e-5)).all(), (moved, mom_bound.sum())


@pytest.mark.parametrize("variant", ["moneta", "yaad", "memora"])
def test_miras_variants_equal_their_definitions_float64(variant):
    from memzoo.neural_memory.memory import MIRAS
    rule = MemoryRule(**MIRAS[variant])
    acc, *rest = random_inputs(10, (K, 4, K))
    if variant == "yaad":   # values far enough out that the Huber loss is linear for some
        rest[1] = rest[1] * 3.0
    args = (acc, *rest)
    y, _ = run_chunked(rule, *args, 2)
    np.testing.assert_allclose(y, naive64(rule, *args, 2), rtol=1e-9, atol=1e-12)


def test_huber_bias_is_linear_far_out():
    """The Yaad bias really switches: its gradient saturates at delta outside |e| <= delta."""
    rule = MemoryRule(attentional_bias="huber", huber_delta=0.5)
    g = jax.grad(lambda e: rule.loss(e, jnp.zeros(3)))(jnp.array([0.1, -2.0, 4.0]))
    np.testing.assert_allclose(g, [0.1, -0.5, 0.5], rtol=1e-6)


def test_linear_memory_delta_rule_equals_online_rule_float64():
    """The linear memory without momentum on pallas_kernels.delta_rule == the general path at
    chunk size 1 == the naive online loop."""
    rule = MemoryRule(learning_rule="gd")
    acc, k, v, q, theta, eta, alpha = random_inputs(3, (K, K), length=9)
    with jax.enable_x64(True):
        # "xla": the Pallas branches of "auto" accumulate in float32 only.
        y, (w,) = jax.jit(lambda *a: core.linear_memory_delta_rule(*a, implementation="xla"))(
            acc, k, v, q, theta, alpha)
        assert y.dtype == jnp.float64
        y = np.asarray(y)
    np.testing.assert_allclose(y, naive64(rule, acc, k, v, q, theta, eta, alpha, 1),
                               rtol=1e-10, atol=1e-12)
    y1, _ = run_chunked(rule, acc, k, v, q, theta, eta, alpha, 1)
    np.testing.assert_allclose(y, y1, rtol=1e-10, atol=1e-12)


# ---- decoding == parallel ---------------------------------------------------------------------
D = 8


@pytest.mark.parametrize("options", [
    dict(chunk_size=3, memory_layers=1, learning_rule="gd"),  # the delta-rule path
])
def test_neural_memory_decode_equals_parallel(options):
    """test_contract.py's decoding check on the paths its option table does not take."""
    from tests.memzoo import test_contract as contract  # imported here: one local edit
    contract.check_decoding("neural_memory", dict(num_heads=2, **options))


def test_delta_path_equals_general_path_at_chunk_one():
    kw = dict(num_heads=2, memory_layers=1, learning_rule="gd", rngs=nnx.Rngs(4))
    fast = NeuralMemory(D, chunk_size=8, **kw)
    slow = NeuralMemory(D, chunk_size=1, use_delta_rule=False, **{**kw, "rngs": nnx.Rngs(4)})
    assert fast.delta_path and not slow.delta_path
    x = jax.random.normal(jax.random.key(5), (1, 12, D))
    np.testing.assert_allclose(helpers.forward(fast, x), helpers.forward(slow, x),
                               rtol=1e-5, atol=1e-5)


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    (dict(attentional_bias="l3"), "attentional_bias"),
    (dict(retention="l1"), "retention"),
    (dict(learning_rule="adam"), "learning_rule"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(memory_layers=0), "memory_layers"),
    (dict(p=1.0, attentional_bias="lp"), "`p`"),
    (dict(q=1.5, retention="lq"), "`q`"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        NeuralMemory(D, num_heads=2, rngs=nnx.Rngs(0), **options)


def test_chunked_memory_rejects_bad_chunk_size():
    rule = MemoryRule()
    acc, k, v, q, theta, eta, alpha = random_inputs(0, (K, K))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_memory(rule, acc, acc, k, v, q, theta, eta, alpha, chunk_size=-2)


# ---- memory of the backward pass ----------------------------------------------------------------
def backward_temp_bytes(T, hidden, *, heads=2, K=8, C=8):
    """XLA's temp bytes for grad of sum(y) w.r.t. every input of the chunked 2-layer memory."""
    rule = MemoryRule()
    sizes = [K, hidden, K]
    acc = tuple(jax.ShapeDtypeStruct((1, heads, i, o), jnp.float32)
                for i, o in zip(sizes[:-1], sizes[1:]))
    x = jax.ShapeDtypeStruct((1, T, heads, K), jnp.float32)
    g = jax.ShapeDtypeStruct((1, T, heads), jnp.float32)

    def loss(acc, k, v, q, theta, eta, alpha):
        mom = tuple(jnp.zeros_like(a) for a in acc)
        return jnp.sum(chunked_memory(rule, acc, mom, k, v, q, theta, eta, alpha,
                                      chunk_size=C)[0])

    f = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
    params = heads * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    return f.lower(acc, x, x, x, g, g, g).compile().memory_analysis().temp_size_in_bytes, params


def test_backward_memory_grows_with_time_times_width_not_params():
    """Temp bytes per extra token (T 256 -> 512) for a small and a 16x larger memory MLP: far
    below one copy of the weights per token (what keeping per-token weights costs), and growing
    much less than the parameter count (only the ~2 sqrt(T/C) saved weight copies depend on it)."""
    T = 256
    slope, params = {}, {}
    for hidden in (8, 128):
        t1, params[hidden] = backward_temp_bytes(T, hidden)
        t2, _ = backward_temp_bytes(2 * T, hidden)
        slope[hidden] = (t2 - t1) / T
    copy = 4 * params[128]
    assert slope[128] < 0.1 * copy, f"{slope[128]:.0f} bytes/token vs {copy} per weight copy"
    assert slope[128] < 4 * slope[8], (f"16x the parameters: {slope[8]:.0f} -> {slope[128]:.0f} "
                                       "bytes/token")


def test_shared_options_route_only_to_the_memory_keywords():
    """`--set model.mixer=titans_mag` on a preset whose mixer_options carry an SSM's state_size:
    the Titans and Miras constructors name their keywords, so routing drops what they lack."""
    from memzoo.models import route_mixer_options
    routed = route_mixer_options(["titans_mag", "moneta", "titans_mac"],
                                 {"state_size": 8, "window": 4, "memory_layers": 1})
    assert routed == {"titans_mag": {"window": 4, "memory_layers": 1},
                      "moneta": {"memory_layers": 1}, "titans_mac": {"memory_layers": 1}}
    with pytest.raises(ValueError, match="unknown options"):
        from memzoo import MIXERS
        MIXERS["titans_mag"](D, num_heads=2, state_size=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fixed by the variant"):
        MIXERS["moneta"](D, num_heads=2, retention="l2", rngs=nnx.Rngs(0))


# ---- packed documents (segment_ids) --------------------------------------------------------------
# chunk 4, T 13: row 0 has a document start at a chunk boundary (4) and one mid-chunk (6); row 1
# one mid-chunk (3), a one-token document, one at a boundary (4) with a partial last chunk.
PACKED = [[4, 2, 7], [3, 1, 9]]


@pytest.mark.parametrize("options", [
    dict(chunk_size=4),                                                       # momentum, 2 layers
    dict(chunk_size=4, attentional_bias="lp", retention="lq", learning_rule="gd"),
    dict(chunk_size=4, retention="kl", learning_rule="gd", max_grad_norm=1.0),
    dict(chunk_size=4, memory_layers=1, learning_rule="gd"),                  # delta-rule path
])
def test_packed_documents_equal_each_alone(options):
    """Memory weights, momentum and conv window restart at every document, which is chunked
    from its own first token: resets mid-chunk and at a chunk boundary, several per row."""
    mem = NeuralMemory(D, num_heads=2, conv_size=2, rngs=nnx.Rngs(0), **options)
    x = jax.random.normal(jax.random.key(1), (2, 13, D))
    y = helpers.assert_packed_equals_alone(mem, x, PACKED)
    # Without the ids the documents do mix (the test can fail).
    assert helpers.relative_rmse(helpers.forward(mem, x)[0, 6:], y[0, 6:]) > 1e-3


# The momentum / 2-layer path's packed gradients are test_contract.py's (its option table).
@pytest.mark.parametrize("options", [dict(chunk_size=4, memory_layers=1, learning_rule="gd")])
def test_packed_gradients_are_the_sum_over_documents(options):
    mem = NeuralMemory(D, num_heads=2, conv_size=2, rngs=nnx.Rngs(0), **options)
    x = jax.random.normal(jax.random.key(1), (2, 13, D))
    helpers.assert_packed_gradients_equal_alone(mem, x, PACKED)


@pytest.mark.parametrize("options", [dict(chunk_size=4),
                                     dict(chunk_size=3, memory_layers=1, learning_rule="gd")])
def test_decoding_across_a_document_boundary_equals_each_alone(options):
    """Prefill 5 tokens (a start inside it), then step across the other starts."""
    mem = NeuralMemory(D, num_heads=2, conv_size=2, rngs=nnx.Rngs(0), **options)
    x = jax.random.normal(jax.random.key(1), (2, 13, D))
    y = helpers.assert_packed_decoding_equals_alone(mem, x, PACKED, t1=5)
    packed = helpers.forward_packed(mem, x, helpers.segment_ids_of(PACKED))
    assert helpers.relative_rmse(y, packed) < 1e-5


def test_chunked_memory_packed_with_no_starts_is_the_plain_form():
    """The two-pass packed chunk with no document start reproduces the plain chunked form."""
    rule = MemoryRule()
    acc, k, v, q, theta, eta, alpha = random_inputs(0, (K, 2 * K, K))
    mom = tuple(jnp.zeros_like(a) for a in acc)
    y, ya, _ = chunked_memory(rule, acc, mom, k, v, q, theta, eta, alpha, chunk_size=3)
    doc_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    y2, ya2, _ = chunked_memory(rule, acc, mom, k, v, q, theta, eta, alpha, chunk_size=3,
                                initial=acc, reset=jnp.zeros((B, T), bool), doc_pos=doc_pos)
    assert helpers.relative_rmse(y2, y) < 1e-6 and helpers.relative_rmse(ya2, ya) < 1e-6


@pytest.mark.parametrize("name, options", [
    ("titans_mac", dict(segment_len=4)),
    ("titans_mac", dict(segment_len=4, form="paper")),
    ("titans_mag", dict(window=3, chunk_size=4)),
    ("titans_mal", dict(window=3, chunk_size=4)),
])
def test_titans_packed_documents_equal_each_alone(name, options):
    """Attention masked across documents (MAC's segments counted within each document), the
    memory restarted; forward, and prefill + decoding across the starts, at windows / segments
    shorter than test_contract.py's (which also checks the packed gradients)."""
    from memzoo import MIXERS
    mixer = MIXERS[name](D, num_heads=2, num_persistent=2, rngs=nnx.Rngs(6), **options)
    x = jax.random.normal(jax.random.key(7), (2, 13, D))
    helpers.assert_packed_equals_alone(mixer, x, PACKED)
    helpers.assert_packed_decoding_equals_alone(mixer, x, PACKED, t1=5)


def test_mac_paper_form_writes_the_attention_output_and_gates_with_its_read():
    """form="paper" on the first segment (the memory at its initial weights for every token's
    context): o = y (x) M(y), y the attention output (the additive form's output minus its
    memory read, same parameters) and M(y) the memory written with y; the memory the call
    leaves is the one written with y. Later segments read that memory, so the two forms part."""
    from memzoo import MIXERS
    S = 6
    make = lambda form: MIXERS["titans_mac"](D, num_heads=2, num_persistent=2, segment_len=S,
                                             form=form, rngs=nnx.Rngs(6))
    paper, additive = make("paper"), make("additive")
    x = jax.random.normal(jax.random.key(7), (2, 2 * S, D))
    y = additive(x[:, :S]) - additive.memory(x[:, :S])
    m, _, written = paper.memory.forward(y)
    o, cache = paper(x[:, :S], paper.init_cache(2))
    assert helpers.relative_rmse(o, y * m) < 1e-5
    for a, b in zip(jax.tree.leaves(cache.memory.weights), jax.tree.leaves(written.weights)):
        assert helpers.relative_rmse(a, b) < 1e-5
    full = paper(x)
    assert helpers.relative_rmse(full[:, :S], o) < 1e-6
    assert helpers.relative_rmse(full[:, S:], additive(x)[:, S:]) > 1e-2
    with pytest.raises(ValueError, match="`form`"):
        make("gated")


def test_mac_persistent_tokens_stay_visible_after_a_reset():
    """A document after a reset still attends to the persistent tokens (and equals itself alone,
    above): its output moves with them."""
    from memzoo import MIXERS
    mac = MIXERS["titans_mac"](D, num_heads=2, num_persistent=2, segment_len=4, rngs=nnx.Rngs(6))
    x = jax.random.normal(jax.random.key(7), (2, 13, D))
    ids = helpers.segment_ids_of(PACKED)
    y = helpers.forward_packed(mac, x, ids)
    mac.persistent[...] = mac.persistent[...] + 1.0
    y2 = helpers.forward_packed(mac, x, ids)
    assert helpers.relative_rmse(y2[0, 6:], y[0, 6:]) > 1e-3       # the third document


@pytest.mark.parametrize("span, T", [(3, 13), (4, 8), (8, 5)])
def test_titans_local_attention_equals_the_dense_mask(span, T):
    """The parallel forms attend block by block (2 x span keys per block, never [t, t]): the
    softmax of the dense mask (window span, labels equal, persistent keys open), here written
    out in float64. (float32 compute: jax.nn.dot_product_attention's softmax is float32 even
    for float64 inputs, so the comparison is at float32 rounding.)"""
    from memzoo import MIXERS
    mixer = MIXERS["titans_mag"](D, num_heads=2, num_persistent=2, window=span,
                                 rngs=nnx.Rngs(3))
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (2, T, 2, D // 2))
    kvs = [(jax.random.normal(keys[1 + 2 * i], (2, T, 2, D // 2)),
            jax.random.normal(keys[2 + 2 * i], (2, T, 2, D // 2))) for i in range(2)]
    labels = [jnp.cumsum(jax.random.bernoulli(keys[5], 0.3, (2, T)), 1).astype(jnp.int32)]
    got = mixer._local_attend(q, kvs, span, labels)

    pk, pv = (np.asarray(a, np.float64) for a in mixer._persistent_kv(2))
    k = np.concatenate([pk] + [np.asarray(k, np.float64) for k, _ in kvs], 1)
    v = np.concatenate([pv] + [np.asarray(v, np.float64) for _, v in kvs], 1)
    t, lab = np.arange(T), np.asarray(labels[0])
    ok = ((t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - span))[None] \
        & (lab[:, :, None] == lab[:, None, :])
    ok = np.concatenate([np.ones((2, T, 2), bool), ok, ok], -1)
    scores = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), k) / np.sqrt(D // 2)
    scores = np.where(ok[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_titans_parallel_attention_holds_no_square_scores():
    """At t = 256 and a window of 8 no value in MAG's traced forward is t x t or larger."""
    from memzoo import MIXERS
    mixer = MIXERS["titans_mag"](D, num_heads=2, window=8, chunk_size=8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mixer)
    T_long = 256
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(
        state, jnp.ones((1, T_long, D))).jaxpr

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from sizes(inner)
    # heads x t x t scores would be 2 x 256 x 256; the blocks hold 2 x 256 x (2 x 8 + 4)
    assert max(sizes(jaxpr)) < T_long * T_long
