"""Neural Turing Machine ("ntm", memzoo/memories/ntm.py): the module equals the paper's
equations written out token by token in float64 numpy from its own parameters (content ->
interpolate -> circular shift -> sharpen; erase then add; read after the write), per document
when packed; a document start restores the learned memory; bad options name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from memzoo.memories.ntm import address
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward, forward_packed, segment_ids_of

D, T, BATCH, N, W, R, WH = 8, 9, 2, 5, 3, 2, 2


def build():
    return memzoo.MIXERS["ntm"](D, rngs=nnx.Rngs(0), memory_slots=N, memory_width=W,
                                read_heads=R, write_heads=WH, controller_dim=6)


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, T, D), jnp.float32)


def softmax(a):
    a = np.exp(a - a.max())
    return a / a.sum()


def softplus(a):
    return np.log1p(np.exp(a))


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def paper_address(M, w_prev, k, beta, g, s, gamma):
    cos = np.array([k @ m / (np.linalg.norm(k) * np.linalg.norm(m)) for m in M])
    w_c = softmax(beta * cos)
    w_g = g * w_c + (1 - g) * w_prev
    w_s = np.zeros(N)   # w~(i) = sum_j w_g(j) s(i - j), shifts i - j in (-1, 0, 1) mod N
    for i in range(N):
        for j in range(N):
            d = (i - j) % N
            d = d - N if d > N // 2 else d
            if abs(d) <= 1:
                w_s[i] += w_g[j] * s[d + 1]
    w = w_s ** gamma
    return w / w.sum()


def naive(mixer, x, lengths=None):
    p = {".".join(map(str, k)): np.asarray(v[...], np.float64)
         for k, v in nnx.to_flat_state(nnx.state(mixer, nnx.Param))}
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    H = R + WH
    for r, row in enumerate(lengths or [[x.shape[1]]] * x.shape[0]):
        start = 0
        for n in row:
            M = p["initial_memory"].copy()
            w = np.stack([softmax(l) for l in p["initial_logits"]])
            reads = w[:R] @ M
            for t in range(start, start + n):
                h = np.tanh(np.concatenate([x[r, t], reads.ravel()]) @ p["controller.kernel"]
                            + p["controller.bias"])
                q = h @ p["head_params.kernel"] + p["head_params.bias"]
                addr, rest = q[:H * (W + 6)].reshape(H, W + 6), q[H * (W + 6):].reshape(WH, 2, W)
                terms = [(a[:W], softplus(a[W]), sigmoid(a[W + 1]), softmax(a[W + 2:W + 5]),
                          1 + softplus(a[W + 5])) for a in addr]
                w_write = [paper_address(M, w[R + i], *terms[R + i]) for i in range(WH)]
                for i in range(WH):       # every head erases, then every head adds
                    M = M * (1 - np.outer(w_write[i], sigmoid(rest[i, 0])))
                for i in range(WH):
                    M = M + np.outer(w_write[i], rest[i, 1])
                w_read = [paper_address(M, w[i], *terms[i]) for i in range(R)]
                reads = np.stack([wr @ M for wr in w_read])
                w = np.stack(w_read + w_write)
                out[r, t] = (np.concatenate([h, reads.ravel()]) @ p["out.kernel"]
                             + p["out.bias"])
            start += n
    return out


def test_equals_the_papers_equations_float64():
    mixer, x = build(), inputs()
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, "ntm vs naive")


def test_packed_documents_restart_the_machine():
    mixer, x = build(), inputs(2)
    lengths = [[4, 5], [2, 7]]
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    assert_close(y, naive(mixer, x, lengths), 1e-5, "ntm packed vs naive")


def test_shift_moves_a_focused_weighting_by_one_slot():
    # content off (g = 0), a certain shift of +1 and no sharpening: slot j's mass moves to j + 1,
    # the last slot's to slot 0 (circular)
    b, h = 1, 1
    w_prev = jnp.asarray(np.eye(N)[None, :1] * 0.7 + 0.3 / N, jnp.float32)
    w = address(jnp.ones((b, N, W)), w_prev, jnp.ones((b, h, W)), jnp.ones((b, h)),
                jnp.zeros((b, h)), jnp.asarray([[[0.0, 0.0, 1.0]]]), jnp.ones((b, h)))
    np.testing.assert_allclose(w, np.roll(w_prev, 1, axis=-1), atol=1e-6)
    last = jnp.asarray(np.eye(N)[None, -1:], jnp.float32)
    w = address(jnp.ones((b, N, W)), last, jnp.ones((b, h, W)), jnp.ones((b, h)),
                jnp.zeros((b, h)), jnp.asarray([[[0.0, 0.0, 1.0]]]), jnp.full((b, h), 3.0))
    assert float(w[0, 0, 0]) > 0.999


@pytest.mark.parametrize("option", ["memory_slots", "memory_width", "read_heads",
                                    "write_heads", "controller_dim"])
def test_bad_options_name_the_option(option):
    with pytest.raises(ValueError, match=option):
        memzoo.MIXERS["ntm"](D, rngs=nnx.Rngs(0), **{option: 0})


def test_bad_cache_is_refused():
    mixer = build()
    with pytest.raises(ValueError, match="cache"):
        mixer.step(jnp.zeros((BATCH, D)), mixer.init_cache(BATCH + 1))
