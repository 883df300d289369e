"""Memory layers: ProductKeyMemory (exact product-key top-k, float64 reference forward and
gradients, shared values, the value table sharded along its embedding dim == unsharded, the MLP
slot of the model) and Hopfield (retrieval, energy descent, associative attention)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import memzoo
from memzoo.memory_layers import (Hopfield, HopfieldMixer, MemoryValues, ProductKeyMemory,
                                  hopfield_energy, hopfield_retrieve, product_key_topk)
from memzoo.models import CausalLM
from pallas_kernels import _testing as kt

F32_TOL = 1e-5


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_product_key_topk_is_the_exact_topk_of_all_sums():
    rng = np.random.default_rng(0)
    q1, q2 = rng.standard_normal((2, 5, 3, 6))          # [tokens, heads, half]
    k1, k2 = rng.standard_normal((2, 3, 10, 6))         # [heads, n_keys, half]
    scores, slots = product_key_topk(*map(jnp.asarray, (q1, q2, k1, k2)), 4)
    full = (np.einsum("thd,hnd->thn", q1, k1)[..., :, None]
            + np.einsum("thd,hnd->thn", q2, k2)[..., None, :]).reshape(5, 3, 100)
    best = np.argsort(-full, axis=-1)[..., :4]
    np.testing.assert_array_equal(slots, best)
    np.testing.assert_allclose(scores, np.take_along_axis(full, best, -1), rtol=1e-5)


def _naive_pkm(params, x, *, heads, key_dim, topk, qk_norm, gated):
    """Every one of the n_keys^2 slots scored densely: the float64 specification."""
    q = x @ params["query"]
    mu, var = q.mean(-1, keepdims=True), q.var(-1, keepdims=True)
    q = (q - mu) / jnp.sqrt(var + 1e-6) * params["ln_scale"][None, None] \
        + params["ln_bias"][None, None]
    q = q.reshape(*x.shape[:-1], heads, key_dim)
    q1, q2 = q[..., :key_dim // 2], q[..., key_dim // 2:]
    k1, k2 = params["keys"][:, 0], params["keys"][:, 1]
    if qk_norm:
        rms = lambda a: a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-6)  # noqa: E731
        q1, q2, k1, k2 = map(rms, (q1, q2, k1, k2))
    n = k1.shape[1]
    full = (jnp.einsum("...hd,hnd->...hn", q1, k1)[..., :, None]
            + jnp.einsum("...hd,hnd->...hn", q2, k2)[..., None, :]).reshape(*q.shape[:-1], n * n)
    scores, slots = jax.lax.top_k(full, topk)
    w = jax.nn.softmax(scores, -1)
    m = jnp.einsum("...hk,...hkd->...d", w, params["values"][slots])
    if gated:
        m = (m * jax.nn.silu(x @ params["gate"])) @ params["out"]
    return m


def _pkm_params(state):
    """The parameters of a ProductKeyMemory's nnx.State (a model's or its gradient's)."""
    p = {"query": state["query"]["kernel"][...],
         "ln_scale": state["query_norm"]["scale"][...],
         "ln_bias": state["query_norm"]["bias"][...], "keys": state["keys"][...],
         "values": state["values"]["memory_values"][...]}
    if "gate" in state:
        p.update(gate=state["gate"]["kernel"][...], out=state["out"]["kernel"][...])
    return p


@pytest.mark.parametrize("qk_norm,gated", [(False, False), (True, True)])
def test_pkm_matches_float64_dense_scoring(qk_norm, gated):
    opts = dict(n_keys=8, num_heads=2, topk=3, key_dim=6, qk_norm=qk_norm, gated=gated,
                value_dim=12 if gated else None)
    pkm = ProductKeyMemory(10, rngs=nnx.Rngs(1), **opts)
    x = _x((2, 5, 10))
    cot = _x((2, 5, 10), seed=1)
    naive = functools.partial(_naive_pkm, heads=2, key_dim=6, topk=3, qk_norm=qk_norm,
                              gated=gated)
    params = _pkm_params(nnx.state(pkm, nnx.Param))
    ref_out, ref_grads = kt.float64_run(
        lambda p, x: (naive(p, x), jax.grad(lambda p: jnp.sum(naive(p, x) * cot))(p)), params, x)

    @nnx.jit
    def run(pkm, x):
        def loss(pkm):
            return jnp.sum(pkm(x) * cot)
        return pkm(x), nnx.grad(loss)(pkm)
    out, grads = run(pkm, x)
    kt.assert_close(out, ref_out, F32_TOL, "out")
    got = _pkm_params(nnx.state(grads, nnx.Param))
    for name in ref_grads:
        assert np.abs(np.asarray(got[name])).max() > 0, f"no gradient reaches {name}"
        kt.assert_close(got[name], ref_grads[name], F32_TOL, f"d {name}")


def test_pkm_is_per_token_and_step_equals_call():
    pkm = ProductKeyMemory(8, n_keys=6, num_heads=2, topk=2, rngs=nnx.Rngs(0))
    x = _x((2, 7, 8))
    x2 = x.at[:, 3].add(1.0)
    y, y2 = nnx.jit(lambda m, x, x2: (m(x), m(x2)))(pkm, x, x2)
    changed = np.abs(np.asarray(y2 - y)).max(axis=(0, 2)) > 0
    np.testing.assert_array_equal(changed, np.arange(7) == 3)   # only the perturbed token moves
    y_t, cache = nnx.jit(lambda m, x_t: m.step(x_t, m.init_cache(2)))(pkm, x[:, 4])
    np.testing.assert_allclose(y_t, y[:, 4], rtol=1e-6, atol=1e-6)
    assert cache == ()


def test_pkm_batchnorm_query_train_and_eval():
    pkm = ProductKeyMemory(8, n_keys=6, num_heads=1, topk=2, query_norm="batchnorm",
                           rngs=nnx.Rngs(0))
    x = _x((4, 3, 8))
    before = np.asarray(pkm.query_norm.mean[...])
    call = nnx.jit(lambda m, x: m(x))
    call(pkm, x)                                    # training: batch statistics, running update
    assert not np.allclose(pkm.query_norm.mean[...], before)
    pkm.eval()
    whole, one = nnx.jit(lambda m, x: (m(x), m(x[:1])))(pkm, x)
    np.testing.assert_allclose(whole[:1], one, rtol=1e-6)   # eval: running stats, per token


def test_shared_values_across_layers():
    lm = CausalLM(vocab_size=11, d_model=8, num_layers=3, mixer="attention",
                  mixer_options={"num_heads": 2}, mlp="pkm",
                  mlp_options={"n_keys": 4, "num_heads": 1, "topk": 2, "shared_values": True,
                               "layers": [0, 2]}, rngs=nnx.Rngs(0))
    blocks = lm.stack.layers
    assert blocks[0].mlp.values is blocks[2].mlp.values is lm.stack.memory_values
    assert not isinstance(blocks[1].mlp, ProductKeyMemory)      # layer 1 keeps its dense MLP
    params = nnx.state(lm, nnx.Param)
    tables = [p for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
              if "memory_values" in str(path)]
    assert len(tables) == 1 and tables[0].shape == (16, 8)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 6)), jnp.int32)
    # The shared table's gradient is the sum of both layers' reads: nonzero, one leaf.
    _, grads = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(tokens) ** 2)))(lm)
    g = [p for path, p in jax.tree_util.tree_flatten_with_path(nnx.state(grads, nnx.Param))[0]
         if "memory_values" in str(path)]
    assert len(g) == 1 and np.abs(np.asarray(g[0])).max() > 0


def test_value_table_sharded_along_its_embedding_dim_equals_unsharded():
    """8 host devices, mesh (data 2, tensor 4): the table [n_keys^2, 32] split 4 ways along its
    embedding dim by train/mesh.py's rules; outputs and every gradient equal the unsharded run,
    the table's gradient stays sharded, and the compiled step never all-gathers the table."""
    from train import mesh as mesh_lib
    pkm = ProductKeyMemory(16, n_keys=8, num_heads=2, topk=3, key_dim=8, value_dim=32,
                           gated=True, rngs=nnx.Rngs(3))
    x = _x((4, 6, 16))
    cot = _x((4, 6, 16), seed=2)
    graphdef, params = nnx.split(pkm, nnx.Param)

    def step(params, x):
        def loss(params):
            return jnp.sum(nnx.merge(graphdef, params)(x) * cot)
        return nnx.merge(graphdef, params)(x), jax.grad(loss)(params)

    want_out, want_grads = jax.jit(step)(params, x)

    mesh = jax.make_mesh((2, 1, 4, 1), mesh_lib.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    def sharding(v):
        names = v.get_metadata().get("out_sharding")
        return NamedSharding(mesh, mesh_lib.logical_to_spec(names, v.shape, mesh))
    shardings = jax.tree.map(sharding, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    table_spec = shardings["values"]["memory_values"].spec
    assert table_spec == P(None, "tensor"), table_spec
    sharded = jax.device_put(params, shardings)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    fn = jax.jit(step, out_shardings=(NamedSharding(mesh, P("data")), shardings))
    hlo = fn.lower(sharded, xs).compile().as_text()
    assert "all-gather" not in "\n".join(l for l in hlo.splitlines() if "f32[64,32]" in l), \
        "the value table was all-gathered"
    out, grads = fn(sharded, xs)
    kt.assert_close(out, want_out, 1e-6, "sharded out")
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(want_grads)):
        kt.assert_close(g, w, 1e-6, f"sharded d{jax.tree_util.keystr(path)}")
    table_grad = grads["values"]["memory_values"][...]
    assert table_grad.sharding.spec == P(None, "tensor")
    assert table_grad.addressable_shards[0].data.shape == (64, 8)


def test_memory_values_have_their_own_optimizer_group():
    from train import trainer
    pkm = ProductKeyMemory(8, n_keys=6, num_heads=2, topk=2, rngs=nnx.Rngs(0))
    assert trainer.param_group(pkm.values.memory_values) == "memory_values"
    assert trainer.param_group(pkm.keys) == "default"


def test_pkm_bad_options():
    cases = [
        (dict(n_keys=4, topk=5), "`topk` must be <= n_keys"),
        (dict(key_dim=5), "`key_dim` must be even"),
        (dict(value_dim=12), "without `gated`, `value_dim` must equal d_model"),
        (dict(query_norm="rms"), "`query_norm` must be one of"),
        (dict(num_heads=0), "`num_heads` must be an integer >= 1"),
        (dict(n_keys=4, topk=2, values=MemoryValues(9, 8, rngs=nnx.Rngs(0))),
         "shared `values` must have n_keys"),
    ]
    for opts, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ProductKeyMemory(8, rngs=nnx.Rngs(0), **opts)
    with pytest.raises(ValueError, match="`mlp_options` are for mlp='pkm'"):
        CausalLM(vocab_size=5, d_model=8, num_layers=1, mixer="attention", mlp_options={"n_keys": 4},
                 rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mlp_options\['layers'\] must be layer indices"):
        CausalLM(vocab_size=5, d_model=8, num_layers=2, mixer="attention", mlp="pkm",
                 mlp_options={"n_keys": 4, "topk": 2, "layers": [2]}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="need scan_layers=False"):
        CausalLM(vocab_size=5, d_model=8, num_layers=2, mixer="attention", mlp="pkm",
                 scan_layers=True, mlp_options={"n_keys": 4, "topk": 2, "shared_values": True},
                 rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# Hopfield


def test_hopfield_retrieves_a_stored_pattern_in_one_step():
    rng = np.random.default_rng(0)
    patterns = rng.choice([-1.0, 1.0], (20, 64))       # well separated (nearly orthogonal)
    noisy = patterns[7] * np.where(rng.random(64) < 0.2, -1.0, 1.0)   # 20% of signs flipped
    out = hopfield_retrieve(jnp.asarray(patterns), jnp.asarray(noisy), beta=1.0)
    np.testing.assert_allclose(out, patterns[7], atol=1e-6)


def test_hopfield_update_descends_the_energy():
    rng = np.random.default_rng(1)
    patterns = jnp.asarray(rng.standard_normal((16, 8)))
    xi = jnp.asarray(rng.standard_normal((32, 8)))
    with jax.enable_x64(True):
        p, x = patterns.astype(jnp.float64), xi.astype(jnp.float64)
        energies = [hopfield_energy(p, x, 0.7)]
        for _ in range(4):
            x = hopfield_retrieve(p, x, 0.7)
            energies.append(hopfield_energy(p, x, 0.7))
    e = np.stack(energies)
    assert np.all(np.diff(e, axis=0) <= 1e-12), "the energy rose"


def test_hopfield_stored_patterns_layer_is_the_update_rule():
    hop = Hopfield(6, num_patterns=10, pattern_dim=4, beta=2.0, update_steps=2, rngs=nnx.Rngs(0))
    x = _x((3, 6))
    X = hop.patterns[...]
    xi = x @ hop.query.kernel[...]
    for _ in range(2):
        xi = jax.nn.softmax(2.0 * xi @ X.T, -1) @ X
    np.testing.assert_allclose(hop(x), xi @ hop.out.kernel[...], rtol=1e-5, atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(hop)
    assert np.abs(np.asarray(grads.patterns[...])).max() > 0


def test_hopfield_over_the_input_is_causal_associative_attention():
    hop = Hopfield(6, pattern_dim=4, associate_input=True, rngs=nnx.Rngs(0))
    x = _x((2, 5, 6))
    y = hop(x)
    q, k, v = (x @ hop.query.kernel[...], x @ hop.key.kernel[...], x @ hop.value.kernel[...])
    s = np.einsum("btp,bsp->bts", q, k) / 2.0 + np.where(np.tril(np.ones((5, 5))), 0, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    np.testing.assert_allclose(y, np.einsum("bts,bsp->btp", a, v) @ hop.out.kernel[...],
                               rtol=1e-5, atol=1e-6)
    y2 = hop(x.at[:, 3].add(1.0))
    np.testing.assert_allclose(y2[:, :3], y[:, :3], rtol=1e-6)     # the past ignores the future
    with pytest.raises(ValueError, match="`memory=` needs associate_input=True"):
        Hopfield(6, rngs=nnx.Rngs(0))(x, memory=x)
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        Hopfield(6, beta=0.0, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# The "hopfield" mixer (the contract: tests/memzoo/test_contract.py)

def _naive_hopfield_mixer(mixer, x, segment_ids=None):
    """Per token and head, float64: the stored patterns are the keys so far (of the token's own
    document), update_steps - 1 updates xi <- K^T softmax(beta K xi), then V^T softmax(...)."""
    p = {k: np.asarray(getattr(mixer, k)[...], np.float64) for k in ("wq", "wk", "wv", "wo")}
    x = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btd,dhk->bthk", x, p[w]) for w in ("wq", "wk", "wv"))
    b, T, H = q.shape[:3]
    group = H // k.shape[2]
    seg = np.zeros((b, T), int) if segment_ids is None else np.asarray(segment_ids)
    o = np.zeros(q.shape)
    for bi in range(b):
        for t in range(T):
            past = [s for s in range(t + 1) if seg[bi, s] == seg[bi, t]]
            for h in range(H):
                K, V = k[bi, past, h // group], v[bi, past, h // group]
                xi = q[bi, t, h]
                for step in range(mixer.update_steps):
                    s = mixer.beta * K @ xi
                    a = np.exp(s - s.max())
                    a /= a.sum()
                    xi = (K if step < mixer.update_steps - 1 else V).T @ a
                o[bi, t, h] = xi
    return np.einsum("bthk,hkd->btd", o, p["wo"])


@pytest.mark.parametrize("opts", [dict(num_heads=2, update_steps=1, beta=0.9),
                                  dict(num_heads=4, num_kv_heads=2, update_steps=3)])
def test_hopfield_mixer_is_the_iterated_update_over_past_patterns(opts):
    mixer = memzoo.MIXERS["hopfield"](8, rngs=nnx.Rngs(0), **opts)
    assert isinstance(mixer, HopfieldMixer)
    x = _x((2, 7, 8))
    kt.assert_close(mixer(x), _naive_hopfield_mixer(mixer, x), F32_TOL, "parallel")
    ids = jnp.asarray([[0, 0, 0, 1, 1, 1, 1], [3, 3, 5, 5, 5, 5, 5]], jnp.int32)
    kt.assert_close(mixer(x, segment_ids=ids), _naive_hopfield_mixer(mixer, x, ids), F32_TOL,
                    "packed documents")
    cache = mixer.init_cache(2, max_len=7)
    y0, cache = mixer(x[:, :4], cache)
    y1, cache = mixer.step(x[:, 4], cache)
    y2, cache = mixer(x[:, 5:], cache)
    kt.assert_close(jnp.concatenate([y0, y1[:, None], y2], 1), mixer(x), F32_TOL, "cache")


def test_hopfield_mixer_retrieves_the_stored_value_at_high_beta():
    """With W_q = W_k and a large beta, the state pattern of a repeated token converges to its
    own stored key and the read-out returns that token's value."""
    mixer = HopfieldMixer(16, num_heads=1, beta=50.0, update_steps=2, rngs=nnx.Rngs(0))
    mixer.wk[...] = mixer.wq[...]
    mixer.wv[...] = jnp.eye(16)[:, None, :]
    mixer.wo[...] = jnp.eye(16)[None]
    tokens = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], (6, 16)), jnp.float32)
    x = jnp.concatenate([tokens, tokens[2:3] * 1.0], 0)[None]  # token 2 again at the end
    np.testing.assert_allclose(mixer(x)[0, -1], tokens[2], atol=1e-4)


@pytest.mark.parametrize("options,match", [(dict(update_steps=0), "update_steps"),
                                           (dict(beta=-1.0), "beta")])
def test_hopfield_mixer_bad_options(options, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        HopfieldMixer(8, num_heads=2, rngs=nnx.Rngs(0), **options)
