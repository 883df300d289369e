"""Gated Slot Attention (memzoo/linear_attention/gsa.py): the mixer equals the paper's two-pass
slot recurrence written out here in float64 numpy, one token at a time, from the module's own
parameters (GQA, packed documents); its two-pass op equals fla's naive_recurrent_gsa when .peers
is built; the decoding cache carries both slot states; bad options name the option."""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from memzoo.linear_attention.gsa import gated_slot_attention
from pallas_kernels._testing import assert_close
from tests.memzoo import test_contract as contract
from tests.memzoo.helpers import forward, forward_packed
from tests.memzoo.test_hgrn import rmsnorm_eps, starts_of
from tests.memzoo.test_linear_attention import params_of, sigmoid, silu

D, T, BATCH, CHUNK = 16, 24, 2, 16


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def naive_slots(q, k, v, alpha, segment_ids=None):
    """K~_t = diag(alpha) K~ + (1 - alpha) k^T, V~ likewise, o = V~^T softmax(K~ q): float64."""
    b, t, H, K = q.shape
    G, m, V = k.shape[2], alpha.shape[-1], v.shape[-1]
    starts = starts_of(segment_ids, b, t)
    o = np.zeros((b, t, H, V))
    for bi in range(b):
        for h in range(H):
            g = h // (H // G)
            Kt, Vt = np.zeros((m, K)), np.zeros((m, V))
            for ti in range(t):
                if starts[bi, ti]:
                    Kt, Vt = np.zeros_like(Kt), np.zeros_like(Vt)
                a = alpha[bi, ti, g]
                Kt = a[:, None] * Kt + np.outer(1 - a, k[bi, ti, g])
                Vt = a[:, None] * Vt + np.outer(1 - a, v[bi, ti, g])
                o[bi, ti, h] = Vt.T @ softmax(Kt @ q[bi, ti, h])
    return o


def naive_gsa(mixer, x, segment_ids=None):
    p, x = params_of(mixer), np.asarray(x, np.float64)
    q = silu(np.einsum("btd,dhk->bthk", x, p["wq"]))
    k = silu(np.einsum("btd,dhk->bthk", x, p["wk"]))
    v = silu(np.einsum("btd,dhk->bthk", x, p["wv"]))
    alpha = sigmoid(np.einsum("btd,dgm->btgm", x, p["wf"]) + p["gate_bias"]) ** (1 / 8)
    o = silu(naive_slots(q, k, v, alpha, segment_ids))
    o = rmsnorm_eps(o, p["o_norm.scale"], 1e-5)
    if mixer.output_gate:
        o = o * silu(np.einsum("btd,dhv->bthv", x, p["wg"]))
    return np.einsum("bthv,hvd->btd", o, p["wo"])


CASES = [
    ("gsa", dict(num_heads=2, num_slots=4)),
    ("gsa_gqa_gate", dict(num_heads=4, num_kv_heads=2, num_slots=6, value_dim=3,
                          output_gate=True)),
]


def build(options, seed=0):
    mixer = memzoo.MIXERS["gsa"](D, rngs=nnx.Rngs(seed), chunk_size=CHUNK, **options)
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
    return nnx.merge(graphdef, contract._perturbed(params), rest)


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, T, D), jnp.float32)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_naive_float64_recurrence(case):
    _, options = case
    mixer, x = build(options), inputs()
    assert_close(forward(mixer, x), naive_gsa(mixer, x), 1e-5, "gsa vs naive float64")
    seg = jnp.asarray(np.repeat([[0, 1, 2], [3, 3, 4]], [5, 11, 8], axis=1), jnp.int32)
    assert_close(forward_packed(mixer, x, seg), naive_gsa(mixer, x, seg), 1e-5,
                 "gsa packed vs naive float64")


def test_gqa_configuration_decodes():
    # The option table's GSA has no GQA and value_dim = head_dim: decode this one too.
    contract.check_decoding("gsa", {**CASES[1][1], "chunk_size": CHUNK})


# Jitted: eager dispatch of the op's pieces costs more than compiling it once per shape.
slot_attention = jax.jit(gated_slot_attention, static_argnames=("chunk_size",))


def random_slots(seed=0, b=2, t=19, H=4, G=2, K=5, V=3, m=4):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, H, K))
    k = rng.standard_normal((b, t, G, K))
    v = rng.standard_normal((b, t, G, V))
    log_alpha = np.log(sigmoid(rng.standard_normal((b, t, G, m)) + 1.0)) / 2
    return q, k, v, log_alpha


def test_cache_carries_both_slot_states():
    """Two calls from the returned state == one call; the state is (K~ | V~) of the paper."""
    q, k, v, log_alpha = random_slots()
    f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v, log_alpha)]
    o, state = slot_attention(*f32, chunk_size=8)
    o1, s1 = slot_attention(*(a[:, :7] for a in f32), chunk_size=8)
    o2, s2 = slot_attention(*(a[:, 7:] for a in f32), state=s1, chunk_size=8)
    assert_close(jnp.concatenate([o1, o2], 1), o, 1e-5, "split vs whole")
    assert_close(s2, state, 1e-5, "split state vs whole")
    assert_close(o, naive_slots(q, k, v, np.exp(log_alpha)), 1e-5, "op vs naive")
    alpha = np.exp(log_alpha)
    Kt = np.zeros((2, 2, 4, 5))
    for ti in range(q.shape[1]):
        Kt = alpha[:, ti, :, :, None] * Kt + (1 - alpha[:, ti, :, :, None]) * k[:, ti, :, None]
    assert_close(state[..., :5], Kt, 1e-5, "K~ in the state")


def test_fla_naive_gsa_agrees():
    """fla's naive_recurrent_gsa (s = 1 - alpha, g = log alpha, scale 1) on the same inputs."""
    from tests.convert.golden import PEERS_PYTHON, require_peers
    require_peers()
    q, k, v, log_alpha = random_slots(1)
    script = ("import json,sys,torch\n"
              "from fla.ops.gsa.naive import naive_recurrent_gsa\n"
              "q,k,v,g=(torch.tensor(a,dtype=torch.float64) for a in json.loads(sys.stdin.read()))\n"
              "o,_=naive_recurrent_gsa(q,k,v,1-g.exp(),g,scale=1.0)\n"
              "print(json.dumps(o.double().tolist()))\n")
    proc = subprocess.run([PEERS_PYTHON, "-c", script],
                          input=json.dumps([a.tolist() for a in (q, k, v, log_alpha)]),
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, _ = slot_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, log_alpha)),
                                   chunk_size=8)
    assert_close(ours, np.asarray(json.loads(proc.stdout)), 1e-5, "vs fla naive_recurrent_gsa")


def test_state_size():
    m = memzoo.MIXERS["gsa"](D, num_heads=2, num_slots=4, rngs=nnx.Rngs(0))
    assert m.init_cache(3).state.shape == (3, 2, 4, 8 + 8)
    assert m.state_size == 2 * 4 * 16


@pytest.mark.parametrize("options, match", [
    (dict(num_slots=0), "num_slots"),
    (dict(gate_logit_normalizer=0), "gate_logit_normalizer"),
    (dict(num_heads=3), "num_heads"),
])
def test_bad_options_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        memzoo.MIXERS["gsa"](D, rngs=nnx.Rngs(0), **options)
