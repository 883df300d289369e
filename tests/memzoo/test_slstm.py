"""The sLSTM (memzoo/linear_attention/slstm.py) against the paper's equations written as a direct
float64 loop, unstabilised (c_t = f c + exp(itilde) z, n_t = f n + exp(itilde), h = o c / n):
the cell (with memory mixing through R, packed documents, a carried state, both forget gates,
input-gate pre-activations up to 100, where the unstabilised form overflows float32) and the
whole block (conv + swish, block-diagonal gates, cell, per-head group norm, GeLU-gated MLP);
the input-gate shift invariance the block relies on (no b_i); bad options. The contract
(causality, step == prefill == parallel, segments, bfloat16, gradients) runs in
tests/memzoo/test_contract.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from memzoo.linear_attention.slstm import SLSTM, slstm_scan
from pallas_kernels import _testing as kt

B, T, H, P = 2, 23, 2, 4
SEG = np.asarray([[0] * T, [0] * 9 + [1] * 10 + [2] * 4], np.int32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def paper_cell(pre, R, carry, seg, forget_gate):
    """Eqs. of section 2.2, token by token in float64, no stabiliser. pre [b, t, 4, H, P];
    carry (c, n, h) in true units at the start of row b's first document; later documents
    start from c = n = h = 0."""
    pre, R = np.asarray(pre, np.float64), np.asarray(R, np.float64)
    b, t = pre.shape[:2]
    out = np.zeros((b, t, H, P))
    for r in range(b):
        c, n, h = (np.array(x[r], np.float64) for x in carry)
        for s in range(t):
            if s > 0 and seg[r, s] != seg[r, s - 1]:
                c, n, h = np.zeros_like(c), np.zeros_like(n), np.zeros_like(h)
            raw = pre[r, s] + np.einsum("hp,ghpq->ghq", h, R)
            i, z, o = np.exp(raw[0]), np.tanh(raw[2]), _sigmoid(raw[3])
            f = _sigmoid(raw[1]) if forget_gate == "sigmoid" else np.exp(raw[1])
            c = f * c + i * z
            n = f * n + i
            h = o * c / n
            out[r, s] = h
    return out


def _cell_inputs(seed, i_range):
    rng = np.random.default_rng(seed)
    pre = rng.standard_normal((B, T, 4, H, P))
    pre[:, :, 0] = rng.uniform(*i_range, (B, T, H, P))
    pre[:, :, 1] += 2.0
    R = 0.5 * rng.standard_normal((4, H, P, P))
    c0 = rng.standard_normal((B, H, P))
    n0 = rng.uniform(0.5, 2.0, (B, H, P))
    h0 = 0.5 * rng.standard_normal((B, H, P))
    return pre, R, (c0, n0, h0)


@pytest.mark.parametrize("forget_gate,i_range", [("sigmoid", (-3.0, 3.0)), ("exp", (-3.0, 3.0)),
                                                 ("sigmoid", (-10.0, 100.0))],
                         ids=["sigmoid", "exp", "sigmoid-itilde-to-100"])
def test_cell_equals_the_papers_recurrence(forget_gate, i_range):
    """float32 stabilised scan vs float64 unstabilised loop; the carried state enters in units
    of exp(m0) (c0 e^-m0, n0 e^-m0), which must not change h."""
    pre, R, (c0, n0, h0) = _cell_inputs(0, i_range)
    ref = paper_cell(pre, R, (c0, n0, h0), SEG, forget_gate)
    m0 = np.asarray([[[1.5]], [[-2.0]]]) * np.ones((B, H, P))
    carry = tuple(jnp.asarray(x, jnp.float32) for x in (c0 * np.exp(-m0), n0 * np.exp(-m0),
                                                        m0, h0))
    starts = jnp.asarray(np.concatenate([np.zeros((B, 1), bool), SEG[:, 1:] != SEG[:, :-1]], 1))
    run = jax.jit(lambda pre, R, carry: slstm_scan(pre, R, carry, forget_gate=forget_gate,
                                                   starts=starts))
    h, (c, n, m, h_last) = run(jnp.asarray(pre, jnp.float32), jnp.asarray(R, jnp.float32), carry)
    assert np.all(np.isfinite(h)) and np.all(np.isfinite(c)) and np.all(np.isfinite(n))
    kt.assert_close(h, ref, 1e-5, "h vs the paper's recurrence")
    kt.assert_close(h_last, ref[:, -1], 1e-5, "carried h")
    # Row 1's last document began from the empty state: n >= 1 from its first token on.
    assert np.all(n[1] >= 1 - 1e-6), "n >= 1 after a document's first token (module docstring)"


def test_output_is_invariant_to_a_shift_of_the_input_gate():
    """Why the block has no input-gate bias: adding a constant to every itilde leaves h."""
    pre, R, _ = _cell_inputs(1, (-3.0, 3.0))
    run = jax.jit(lambda pre: slstm_scan(pre, jnp.asarray(R, jnp.float32))[0])
    pre = jnp.asarray(pre, jnp.float32)
    shifted = pre.at[:, :, 0].add(7.0)
    h, h_shift = run(pre), run(shifted)
    kt.assert_close(h_shift, h, 1e-5, "h after shifting itilde")
    # ... while a shift of the forget gate does change it (the check can fail).
    assert kt.rel_rmse(run(pre.at[:, :, 1].add(-3.0)), h) > 1e-2


def _silu(x):
    return x * _sigmoid(x)


def paper_block(mixer, x, seg):
    """The block in float64 from the mixer's parameters, each document alone."""
    p = {k: np.asarray(v, np.float64) for k, v in (
        ("conv_w", mixer.conv_weight[...]), ("conv_b", mixer.conv_bias[...]),
        ("w", mixer.w_gates[...]), ("fb", mixer.fgate_bias[...]), ("zo", mixer.zo_bias[...]),
        ("R", mixer.recurrent[...]), ("scale", mixer.norm_scale[...]),
        ("up", mixer.mlp.up.proj.kernel[...]), ("down", mixer.mlp.down.kernel[...]))}
    x = np.asarray(x, np.float64)
    b, t, d = x.shape
    W = p["conv_w"].shape[0]
    out = np.zeros((b, t, d))
    for r in range(b):
        bounds = [0] + [s for s in range(1, t) if seg[r, s] != seg[r, s - 1]] + [t]
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            u = x[r, s0:s1]
            L = len(u)
            padded = np.concatenate([np.zeros((W - 1, d)), u])
            conv = np.stack([sum(padded[j + k] * p["conv_w"][k] for k in range(W))
                             for j in range(L)]) + p["conv_b"]
            xc = _silu(conv).reshape(L, H, P)
            xh = u.reshape(L, H, P)
            pre = np.stack([np.einsum("thp,hpq->thq", xc, p["w"][0]),
                            np.einsum("thp,hpq->thq", xc, p["w"][1]) + p["fb"],
                            np.einsum("thp,hpq->thq", xh, p["w"][2]) + p["zo"][0],
                            np.einsum("thp,hpq->thq", xh, p["w"][3]) + p["zo"][1]], axis=1)
            zeros = np.zeros((1, H, P))
            h = paper_cell(pre[None], p["R"], (zeros, zeros, zeros), np.zeros((1, L)),
                           "sigmoid")[0]
            mean = h.mean(-1, keepdims=True)
            var = ((h - mean) ** 2).mean(-1, keepdims=True)
            y = ((h - mean) / np.sqrt(var + mixer.norm_eps) * p["scale"]).reshape(L, d)
            gate, value = np.split(y @ p["up"], 2, axis=-1)
            gelu = 0.5 * gate * (1.0 + erf(gate / np.sqrt(2.0)))
            out[r, s0:s1] = (gelu * value) @ p["down"]
    return out


def test_block_equals_the_papers_block():
    mixer = SLSTM(H * P, num_heads=H, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    # Move the parameters that start at zero / one, so each path is seen.
    mixer.recurrent[...] = jnp.asarray(0.4 * rng.standard_normal((4, H, P, P)), jnp.float32)
    mixer.zo_bias[...] = jnp.asarray(0.3 * rng.standard_normal((2, H, P)), jnp.float32)
    mixer.conv_bias[...] = jnp.asarray(0.3 * rng.standard_normal(H * P), jnp.float32)
    mixer.norm_scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal((H, P)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((B, T, H * P)), jnp.float32)
    y = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(mixer, x, jnp.asarray(SEG))
    kt.assert_close(y, paper_block(mixer, x, SEG), 1e-5, "block vs the paper's block")


@pytest.mark.parametrize("options,match", [
    (dict(num_heads=3), "num_heads"), (dict(forget_gate="tanh"), "forget_gate"),
    (dict(mlp_factor=-1.0), "mlp_factor"), (dict(conv_size=1), "conv_size"),
    (dict(norm_eps=0.0), "norm_eps")])
def test_bad_options_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        SLSTM(8, rngs=nnx.Rngs(0), **options)


def test_bad_cache_is_refused():
    mixer = SLSTM(8, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cache"):
        mixer.step(jnp.ones((3, 8)), mixer.init_cache(2))
