"""TTT-Linear and TTT-MLP (memzoo/neural_memory/ttt.py): the mixer equals the paper's equations
written out here as a float64 loop over tokens (views, the residual-LN inner model, its
reconstruction loss 1/2 ||f(x_K; W) - x_V||^2 with gradients at each mini-batch's first weights,
W_t = W_0 - sum eta_s grad_s, z_t = f(x_Q; W_t), post-norm, gelu gate), from the module's own
parameters, with packed documents (each restarts from the learned W_0 and mini-batches count
from its first token); bad options name the option. The contract (causality, step == prefill ==
parallel, segments, bfloat16, gradients) runs in tests/memzoo/test_contract.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from pallas_kernels._testing import assert_close

D, T, H, B = 8, 11, 2, 4   # mini-batches of 4: two whole and a partial one


def _ln(x, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def ttt_loop(m, x, seg):
    """Sun et al. (2024), section 2: TTT layer with mini-batch gradient descent, in float64."""
    P = lambda p: jnp.asarray(np.asarray(p[...]), jnp.float64)
    leaves = [P(p) for p in m.memory_init]
    gamma, beta, inner = leaves[-2], leaves[-1], leaves[:-2]
    K = m.head_dim

    def f(W, x, h):   # W: head h's [W_1, b_1, (W_2, b_2)]
        z = x
        for i in range(0, len(W), 2):
            z = z @ W[i] + W[i + 1][0]
            if i + 2 < len(W):
                z = jax.nn.gelu(z)
        return x + _ln(z, m.rule.norm_eps) * gamma[h][0] + beta[h][0]

    def loss(W, k, v, h):
        return 0.5 * jnp.sum((f(W, k, h) - v) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=3)
    views = [jnp.einsum("btd,dhk->bthk", x, P(w)) for w in (m.wq, m.wk, m.wv)]
    logits = x @ P(m.gate_proj.kernel) + P(m.gate_proj.bias)[None, None]
    lr = jax.nn.sigmoid(logits) * m.base_lr / K
    z = np.zeros((x.shape[0], x.shape[1], H, K))
    for b in range(x.shape[0]):
        for h in range(H):
            pos = 0
            for t in range(x.shape[1]):
                if t == 0 or seg[b, t] != seg[b, t - 1]:     # a document restarts from W_init
                    pos, W = 0, [w[h] for w in inner]
                if pos % m.chunk_size == 0:                  # a mini-batch: gradients at W_0
                    W0 = W
                g = grad(W0, views[1][b, t, h], views[2][b, t, h], h)
                W = [w - lr[b, t, h] * gw for w, gw in zip(W, g)]
                z[b, t, h] = f(W, views[0][b, t, h], h)
                pos += 1
    z = jnp.asarray(z).reshape(x.shape[0], x.shape[1], -1)
    y = _ln(z, 1e-6) * P(m.out_norm.scale)[None, None] + P(m.out_norm.bias)[None, None]
    y = y * jax.nn.gelu(x @ P(m.wg))
    return np.asarray(y @ P(m.wo).reshape(-1, D))


def _mixer(name, **kw):
    m = memzoo.build_mixer(name, D, num_heads=H, mini_batch=B, rngs=nnx.Rngs(0), **kw)
    leaves, treedef = jax.tree.flatten(nnx.state(m, nnx.Param))
    rng = np.random.default_rng(2)
    # Off the initial values (zero lr kernel, unit gamma, zero biases), and a larger inner
    # learning rate, so every term of the update is exercised.
    leaves = [np.asarray(p) + 0.3 * rng.standard_normal(p.shape).astype(np.float32)
              for p in leaves]
    nnx.update(m, jax.tree.unflatten(treedef, leaves))
    m.base_lr = 8.0
    return m


@pytest.mark.parametrize("name,kw", [("ttt_linear", {}), ("ttt_mlp", dict(mlp_expansion=2))])
def test_matches_the_papers_mini_batch_update(name, kw):
    m = _mixer(name, **kw)
    x = jax.random.normal(jax.random.key(3), (2, T, D))
    seg = jnp.asarray([[0] * T, [0] * 6 + [1] * 5], jnp.int32)
    got = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(m, x, seg)
    with jax.enable_x64(True):
        ref = ttt_loop(m, jnp.asarray(np.asarray(x), jnp.float64), np.asarray(seg))
    assert_close(got, ref, 1e-5, f"{name} vs float64 loop")


@pytest.mark.parametrize("kwargs,message", [
    (dict(base_lr=0.0), "`base_lr`"), (dict(norm_eps=-1.0), "`norm_eps`"),
    (dict(mini_batch=0), "`chunk_size`"), (dict(memory_layers=2), "`memory_layers`"),
])
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memzoo.build_mixer("ttt_linear", D, num_heads=H, rngs=nnx.Rngs(0), **kwargs)
