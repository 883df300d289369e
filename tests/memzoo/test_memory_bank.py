"""MemoryBank (hierarchical memory banks, the MLP slot mlp="memory_bank"): the float64 math
with packed documents, gradients only to the fetched blocks, causality, documents kept apart,
decoding (module step, the model's prefill + decode) equal to the parallel form, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.memory_layers import MemoryBank
from memzoo.memory_layers.memory_bank import balance_loss
from memzoo.models import CausalLM
from pallas_kernels import _testing as kt
from tests.memzoo.helpers import lm_prefill_then_decode

F32_TOL = 1e-5
OPTS = dict(branching=(3, 2), block_width=4, key_dim=5)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _naive(p, x, seg, *, branching, block_width, decay):
    """Token by token, the tree walked explicitly; no anchor (hidden=0)."""
    w, k = block_width, p["c"].shape[-1]
    sizes = np.cumprod(branching)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = []
    for b in range(x.shape[0]):
        row = []
        for t in range(x.shape[1]):
            start = t
            while start > 0 and seg[b, start - 1] == seg[b, t]:
                start -= 1
            weights = decay ** jnp.arange(t - start, -1, -1, dtype=x.dtype)
            m = jnp.sum(weights[:, None] * x[b, start:t + 1], 0) / jnp.sum(weights)
            r = m @ p["wk"]
            parent, y = 0, jnp.zeros_like(x[b, t])
            for off, nb in zip(offsets, branching):
                children = parent * nb + np.arange(nb)
                probs = jax.nn.softmax(p["c"][off + children] @ r / np.sqrt(k))
                j = int(np.argmax(np.asarray(jax.lax.stop_gradient(probs))))
                parent = int(children[j])
                w_in = p["win"][off + parent].reshape(-1, 2 * w)
                w_out = p["wout"][off + parent].reshape(w, -1)
                u = x[b, t] @ w_in
                y = y + probs[j] * (jax.nn.silu(u[:w]) * u[w:]) @ w_out
            row.append(y)
        out.append(jnp.stack(row))
    return jnp.stack(out)


def _params(bank):
    return {"wk": bank.key.kernel[...], "c": bank.centroids[...], "win": bank.w_in[...],
            "wout": bank.w_out[...]}


@pytest.mark.parametrize("decay", [1.0, 0.6])
def test_matches_float64_tree_walk_with_packed_documents(decay):
    bank = MemoryBank(6, hidden=0, decay=decay, rngs=nnx.Rngs(1), **OPTS)
    x, cot = _x((1, 7, 6)), _x((1, 7, 6), seed=1)
    seg = jnp.asarray([[4, 4, 5, 5, 5, 5, 6]], jnp.int32)
    kw = dict(branching=OPTS["branching"], block_width=4, decay=decay)
    ref_out, ref_grads = kt.float64_run(
        lambda p, x: (_naive(p, x, np.asarray(seg), **kw),
                      jax.grad(lambda p: jnp.sum(_naive(p, x, np.asarray(seg), **kw) * cot))(p)),
        _params(bank), x)
    graphdef, params = nnx.split(bank, nnx.Param)

    def loss(params):
        y = nnx.merge(graphdef, params)(x, segment_ids=seg)
        return jnp.sum(y * cot), y
    grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
    kt.assert_close(out, ref_out, F32_TOL, "out")
    got = nnx.to_pure_dict(grads)
    got = {"wk": got["key"]["kernel"], "c": got["centroids"], "win": got["w_in"],
           "wout": got["w_out"]}
    for name, ref in ref_grads.items():
        assert np.abs(np.asarray(got[name])).max() > 0, f"no gradient reaches {name}"
        kt.assert_close(got[name], ref, F32_TOL, f"d {name}")


def test_gradients_reach_only_the_fetched_blocks():
    bank = MemoryBank(6, hidden=8, branching=(4, 4), block_width=3, key_dim=4,
                      rngs=nnx.Rngs(2))
    x = _x((2, 3, 6), seed=3)
    m, _ = bank.summary(x)
    rows, _ = bank.route(m)
    fetched = np.zeros(bank.num_blocks, bool)
    fetched[np.unique(np.asarray(rows))] = True
    assert 2 <= fetched.sum() < bank.num_blocks - 4    # some of both kinds to tell apart
    grads = nnx.grad(lambda b: jnp.sum(b(x) ** 2))(bank)
    for name in ("w_in", "w_out"):
        g = np.abs(np.asarray(getattr(grads, name)[...])).max(axis=-1)
        assert np.all(g[fetched] > 0), name
        assert np.all(g[~fetched] == 0), name


def test_fixed_route_moves_neither_key_nor_centroids():
    x = _x((1, 4, 6), seed=4)
    grads = {}
    for learn in (True, False):
        bank = MemoryBank(6, hidden=8, learn_route=learn, rngs=nnx.Rngs(2), **OPTS)
        graphdef, params = nnx.split(bank)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)      # noqa: E731
        g = jax.jit(jax.grad(loss))(params)
        grads[learn] = {"key": np.asarray(g["key"]["kernel"][...]),
                        "centroids": np.asarray(g["centroids"][...]),
                        "w_out": np.asarray(g["w_out"][...])}
    for name in ("key", "centroids"):
        assert np.abs(grads[True][name]).max() > 0 and not grads[False][name].any(), name
    # the same routes and gates: the blocks learn exactly as with the learned route
    assert np.abs(grads[False]["w_out"]).max() > 0
    kt.assert_close(grads[False]["w_out"], grads[True]["w_out"], F32_TOL, "d w_out")


def test_causal_and_documents_kept_apart():
    bank = MemoryBank(6, hidden=8, rngs=nnx.Rngs(3), **OPTS)
    x = _x((1, 8, 6))
    y = bank(x)
    bumped = bank(x.at[:, 5].add(3.0))
    np.testing.assert_array_equal(y[:, :5], bumped[:, :5])
    assert not np.allclose(y[:, 5:], bumped[:, 5:])
    # two packed documents == each alone
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
    packed = bank(x, segment_ids=seg)
    kt.assert_close(packed[:, :3], bank(x[:, :3]), F32_TOL, "first document")
    kt.assert_close(packed[:, 3:], bank(x[:, 3:]), F32_TOL, "second document")


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_step_equals_the_parallel_form(decay):
    bank = MemoryBank(6, hidden=8, decay=decay, rngs=nnx.Rngs(4), **OPTS)
    x = _x((2, 6, 6), seed=5)
    y = bank(x)
    head, cache = bank(x[:, :2], cache=bank.init_cache(2))
    outs = [head]
    for t in range(2, 6):
        y_t, cache = bank.step(x[:, t], cache)
        outs.append(y_t[:, None])
    kt.assert_close(jnp.concatenate(outs, 1), y, F32_TOL, "module decode")


def test_model_prefill_and_decode_equal_the_parallel_form():
    """The block's cache carries (mixer cache, bank summary) through prefill and decode."""
    lm = CausalLM(vocab_size=13, d_model=8, num_layers=2, mixer="attention",
                  mixer_options={"num_heads": 2}, mlp="memory_bank",
                  mlp_options={"branching": [2, 3], "block_width": 4, "decay": 0.8},
                  rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 13, (2, 7)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(lm, tokens)
    kt.assert_close(lm_prefill_then_decode(lm, tokens, 3), full, F32_TOL, "CausalLM decode")


def test_errors_name_the_argument():
    cases = [(dict(branching=()), "`branching` must be a non-empty sequence"),
             (dict(branching=(2, 0)), "`branching` must be an integer >= 1"),
             (dict(block_width=0), "`block_width` must be an integer >= 1"),
             (dict(key_dim=1.5), "`key_dim` must be an integer >= 1"),
             (dict(decay=0.0), "`decay` must be a float in \\(0, 1\\]"),
             (dict(hidden=-1), "`hidden` .* must be an integer >= 0"),
             (dict(activation="nope"), "`activation` must be one of"),
             (dict(learn_route=1), "`learn_route` must be a bool")]
    for opts, msg in cases:
        with pytest.raises(ValueError, match=msg):
            MemoryBank(6, rngs=nnx.Rngs(0), **opts)
    bank = MemoryBank(6, rngs=nnx.Rngs(0), **OPTS)
    with pytest.raises(ValueError, match="`x` last dimension must be d_model=6"):
        bank(jnp.ones((1, 3, 5)))
    with pytest.raises(ValueError, match="`decay` must be"):
        CausalLM(vocab_size=5, d_model=8, num_layers=1, mixer="attention", mlp="memory_bank",
                 mlp_options={"decay": 2.0}, rngs=nnx.Rngs(0))


def test_tables_are_memory_values_and_active_width_is_anchor_plus_levels():
    from train import trainer
    bank = MemoryBank(6, hidden=8, rngs=nnx.Rngs(0), **OPTS)
    assert trainer.param_group(bank.w_in) == trainer.param_group(bank.w_out) == "memory_values"
    assert trainer.param_group(bank.centroids) == "default"
    assert bank.num_blocks == 3 + 6
    assert bank.w_in.shape == (9, 6 * 2 * 4) and bank.w_out.shape == (9, 4 * 6)


def test_balance_loss_is_one_when_uniform_and_n_when_collapsed():
    n = 6
    uniform = np.eye(n)[np.arange(4 * n) % n]               # every expert picked equally often
    kt.assert_close(balance_loss(jnp.asarray(uniform), jnp.full((4 * n, n), 1 / n)), 1.0,
                    1e-6, "uniform")
    onto_one = np.eye(n)[np.zeros(4 * n, int)]
    kt.assert_close(balance_loss(jnp.asarray(onto_one), jnp.asarray(onto_one)), float(n),
                    1e-6, "collapsed")


def test_level_balance_matches_float64_tree_walk():
    """f_i and P_i of every level from an explicit per-token walk in float64."""
    bank = MemoryBank(6, branching=(3, 2), block_width=2, key_dim=4, rngs=nnx.Rngs(5))
    x = _x((2, 7, 6), seed=6)
    got = np.asarray(bank.load_balancing_loss(x))
    m = np.asarray(bank.summary(x)[0], np.float64).reshape(-1, 6)
    r = m @ np.asarray(bank.key.kernel[...], np.float64)
    c = np.asarray(bank.centroids[...], np.float64)
    f = [np.zeros(n) for n in bank.level_sizes]
    P = [np.zeros(n) for n in bank.level_sizes]
    for rt in r:
        parent = 0
        for lvl, (off, b) in enumerate(zip(bank.offsets, bank.branching)):
            children = parent * b + np.arange(b)
            s = c[off + children] @ rt / np.sqrt(4)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            P[lvl][children] += p / len(r)
            parent = children[np.argmax(p)]
            f[lvl][parent] += 1 / len(r)
    want = [n * np.sum(fl * pl) for n, fl, pl in zip(bank.level_sizes, f, P)]
    kt.assert_close(got, np.asarray(want), F32_TOL, "balance")
    assert np.all(got >= 1 - 1e-6)


def test_collapsed_route_costs_n_and_the_loss_trains_the_route():
    bank = MemoryBank(6, branching=(3, 2), block_width=2, key_dim=4, sow_aux_loss=True,
                      rngs=nnx.Rngs(5))
    bank.centroids[...] = 100.0 * bank.centroids[...]        # a near one-hot softmax
    same = jnp.broadcast_to(_x((1, 1, 6), seed=7), (2, 5, 6))  # every token on one path
    kt.assert_close(bank.load_balancing_loss(same), np.asarray(bank.level_sizes, np.float64),
                    1e-3, "collapsed")
    x = _x((2, 5, 6), seed=8)
    # the parallel call sows the levels' mean; a cached call (decoding) sows nothing
    y, aux = nnx.capture(bank, nnx.Intermediate)(x)
    kt.assert_close(jax.tree.leaves(aux)[0], jnp.mean(bank.load_balancing_loss(x)), F32_TOL,
                    "sown")
    _, aux = nnx.capture(bank, nnx.Intermediate)(x, cache=bank.init_cache(2))
    assert not jax.tree.leaves(aux)
    g = nnx.grad(lambda b: jnp.mean(b.load_balancing_loss(x)))(bank)
    assert np.abs(np.asarray(g.key.kernel[...])).max() > 0
    assert np.abs(np.asarray(g.centroids[...])).max() > 0
    with pytest.raises(ValueError, match="`sow_aux_loss` must be a bool"):
        MemoryBank(6, sow_aux_loss=1, rngs=nnx.Rngs(0), **OPTS)


# ---- the paper's retriever (retrieval="tokens"): fitted k-means of the documents' TF-IDF ----
FIT = dict(branching=(2, 4), block_width=4, key_dim=64, retrieval="tokens")


def _topic_docs(n, length, seed, topics=8, vocab=64):
    """Documents of 8 topics: each token is its topic's own (ids 8 + 6 topic .. + 6) with
    probability 1/2, else a token shared by every topic (ids 1..7); id 0 starts every one."""
    rng = np.random.default_rng(seed)
    topic = rng.permutation(np.arange(n) % topics)      # equal topics: the tree can split them
    own = 8 + 6 * topic[:, None] + rng.integers(6, size=(n, length))
    shared = rng.integers(1, 8, size=(n, length))
    docs = np.where(rng.random((n, length)) < 0.5, own, shared)
    docs[:, 0] = 0
    return docs, topic


def _fitted(seed=0, **opts):
    bank = MemoryBank(6, hidden=0, vocab_size=64, rngs=nnx.Rngs(seed), **{**FIT, **opts})
    docs, _ = _topic_docs(400, 12, seed=seed)
    bank.fit(docs)
    return bank


def test_fit_puts_each_planted_topic_on_its_own_leaf():
    bank = MemoryBank(6, hidden=0, vocab_size=64, rngs=nnx.Rngs(0), **FIT)
    docs, topic = _topic_docs(400, 24, seed=0)
    fit = bank.fit(docs)
    assert fit["documents"] == 400 and fit["leaf_sizes"].sum() == 400
    assert float(bank.idf[...][0]) == 0.0         # in every document: weighs nothing
    held, t = _topic_docs(64, 24, seed=1)
    r, _ = bank.token_summary(jnp.asarray(held))
    rows = np.asarray(bank._retrieve(r)[0])[:, -1, -1]   # each document's leaf at its end
    leaf_of = {k: set(rows[t == k]) for k in range(8)}
    assert all(len(v) == 1 for v in leaf_of.values()), leaf_of     # every topic on one leaf...
    assert len(set.union(*leaf_of.values())) == 8                  # ... and its own


def _naive_fitted(bank, x, tokens, seg, window):
    """float64, token by token: TF-IDF of the document's first `window` tokens so far (decay
    1), unit length, the tree walked to the most similar child, the blocks summed (gate 1)."""
    proj = np.asarray(bank.projection[...], np.float64)
    idf = np.asarray(bank.idf[...], np.float64)
    cents = np.asarray(bank.centroids[...], np.float64)
    win, wout = np.asarray(bank.w_in[...], np.float64), np.asarray(bank.w_out[...], np.float64)
    xs, w = np.asarray(x, np.float64), bank.block_width
    sizes = np.cumprod(bank.branching)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out, routes = np.zeros(xs.shape), np.zeros(xs.shape[:2] + (len(sizes),), np.int64)
    for b in range(xs.shape[0]):
        for t in range(xs.shape[1]):
            start = t
            while start > 0 and seg[b, start - 1] == seg[b, t]:
                start -= 1
            ctx = tokens[b, start:min(t + 1, start + window) if window else t + 1]
            key = (idf[ctx, None] * proj[ctx]).sum(0)
            key = key / max(np.linalg.norm(key), 1e-30)
            parent = 0
            for level, (off, nb) in enumerate(zip(offsets, bank.branching)):
                children = parent * nb + np.arange(nb)
                parent = int(children[np.argmax(cents[off + children] @ key)])
                routes[b, t, level] = off + parent
                u = xs[b, t] @ win[off + parent].reshape(-1, 2 * w)
                silu = u[:w] / (1 + np.exp(-u[:w]))
                out[b, t] += (silu * u[w:]) @ wout[off + parent].reshape(w, -1)
    return out, routes


@pytest.mark.parametrize("window", [0, 3])
def test_fitted_route_matches_float64_with_packed_documents(window):
    bank = _fitted(retrieval_window=window)
    tokens, _ = _topic_docs(2, 10, seed=3)
    seg = np.array([[0] * 4 + [1] * 6, [0] * 10])
    x = _x((2, 10, 6), seed=2)
    want, routes = _naive_fitted(bank, x, tokens, seg, window)
    r, _ = bank.token_summary(jnp.asarray(tokens), segment_ids=jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(bank._retrieve(r)[0]), routes)
    got = bank(x, tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(seg))
    kt.assert_close(got, want, F32_TOL, "fitted bank")


@pytest.mark.parametrize("window", [0, 3])
def test_fitted_step_equals_the_parallel_form(window):
    bank = _fitted(retrieval_window=window)
    tokens = jnp.asarray(_topic_docs(2, 7, seed=4)[0])
    x = _x((2, 7, 6), seed=5)
    y = bank(x, tokens=tokens)
    head, cache = bank(x[:, :2], cache=bank.init_cache(2), tokens=tokens[:, :2])
    outs = [head]
    for t in range(2, 7):
        y_t, cache = bank.step(x[:, t], cache, tokens=tokens[:, t])
        outs.append(y_t[:, None])
    kt.assert_close(jnp.concatenate(outs, 1), y, F32_TOL, "fitted decode")


@pytest.mark.parametrize("scan", [False, True])
def test_model_reads_tokens_and_one_fit_serves_every_layer(scan):
    """The model hands the bank its tokens and vocabulary; after one fit per bank (equal in
    every layer and scan repeat: the retriever is seeded), prefill + decode equal the
    parallel form."""
    lm = CausalLM(vocab_size=64, d_model=8, num_layers=2, mixer="attention",
                  mixer_options={"num_heads": 2}, mlp="memory_bank", scan_layers=scan,
                  mlp_options={**FIT, "retrieval_window": 3}, rngs=nnx.Rngs(0))
    banks = [m for _, m in nnx.iter_modules(lm) if getattr(m, "reads_tokens", False)]
    docs, _ = _topic_docs(200, 12, seed=0)
    for bank in banks:
        bank.fit(docs)
    cents = np.concatenate([np.asarray(b.centroids[...]).reshape(-1, *b.centroids.shape[-2:])
                            for b in banks])
    assert len(cents) == 2 and np.array_equal(cents[0], cents[1])
    tokens = jnp.asarray(_topic_docs(2, 7, seed=6)[0])
    full = nnx.jit(lambda m, t: m(t))(lm, tokens)
    kt.assert_close(lm_prefill_then_decode(lm, tokens, 3), full, F32_TOL,
                    "CausalLM decode, fitted bank")


def test_fitted_retriever_errors_name_the_argument():
    cases = [(dict(retrieval="kmeans"), "`retrieval` must be one of"),
             (dict(retrieval="tokens"), "needs `vocab_size` >= 1"),
             (dict(FIT, vocab_size=9, sow_aux_loss=True), "`sow_aux_loss`"),
             (dict(FIT, vocab_size=9, retrieval_window=-1), "`retrieval_window` must be"),
             (dict(FIT, vocab_size=9, fit_documents=0), "`fit_documents` must be")]
    for opts, msg in cases:
        with pytest.raises(ValueError, match=msg):
            MemoryBank(6, rngs=nnx.Rngs(0), **opts)
    bank = MemoryBank(6, vocab_size=9, rngs=nnx.Rngs(0), **FIT)
    x = jnp.ones((1, 3, 6))
    with pytest.raises(ValueError, match="needs `tokens`, int \\[batch, time\\]"):
        bank(x)
    with pytest.raises(ValueError, match="`tokens` must lie in \\[0, vocab_size=9\\)"):
        bank.fit(np.full((2, 3), 9))
    learned = MemoryBank(6, rngs=nnx.Rngs(0), **OPTS)
    with pytest.raises(ValueError, match="`tokens` are read only with retrieval='tokens'"):
        learned(x, tokens=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="only retrieval='tokens' has a retriever to fit"):
        learned.fit(np.zeros((2, 3), np.int64))
