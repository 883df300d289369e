"""HGRN and HGRN-2 (memzoo/linear_attention/hgrn.py): each mixer equals its paper's recurrence
written out here in float64 numpy, one token at a time, from the module's own parameters (with
a lower bound, GQA, packed documents); the lower bound bounds the forget gate; fla's naive HGRN
recurrence agrees with ours when .peers is built; bad options name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from pallas_kernels._testing import assert_close
from tests.memzoo import test_contract as contract
from tests.memzoo.helpers import forward, forward_packed
from tests.memzoo.test_linear_attention import params_of, sigmoid, silu

D, T, BATCH, CHUNK = 16, 24, 2, 16


def inputs(seed=1, length=T):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D), jnp.float32)


def forget(logits, lower_bound):
    return lower_bound + (1.0 - lower_bound) * sigmoid(logits)


def starts_of(segment_ids, b, t):
    if segment_ids is None:
        return np.zeros((b, t), bool)
    s = np.asarray(segment_ids)
    return np.concatenate([np.zeros((b, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)


def naive_hgrn(mixer, x, segment_ids=None):
    p, x = params_of(mixer), np.asarray(x, np.float64)
    f = forget(x @ p["w_f"] + p["forget_bias"], mixer.lower_bound)
    c = silu(x @ p["w_i"])
    b, t = x.shape[:2]
    starts = starts_of(segment_ids, b, t)
    h = np.zeros((b, t, mixer.width))
    for bi in range(b):
        state = np.zeros(mixer.width)
        for ti in range(t):
            if starts[bi, ti]:
                state = np.zeros(mixer.width)
            state = f[bi, ti] * state + (1.0 - f[bi, ti]) * c[bi, ti]
            h[bi, ti] = state
    g = silu(x @ p["w_g"])
    return (rmsnorm_eps(h, p["norm.scale"], 1e-5) * g) @ p["w_o"]


def rmsnorm_eps(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def naive_hgrn2(mixer, x, segment_ids=None):
    p, x = params_of(mixer), np.asarray(x, np.float64)
    H, G, K = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    group = H // G
    q = silu(np.einsum("btd,dhk->bthk", x, p["wq"]))
    f = forget(np.einsum("btd,dhk->bthk", x, p["wk"]) + p["forget_bias"], mixer.lower_bound)
    v = np.einsum("btd,dhk->bthk", x, p["wv"])
    b, t = x.shape[:2]
    starts = starts_of(segment_ids, b, t)
    o = np.zeros((b, t, H, mixer.value_dim))
    for bi in range(b):
        for h in range(H):
            g = h // group
            S = np.zeros((K, mixer.value_dim))
            for ti in range(t):
                if starts[bi, ti]:
                    S = np.zeros_like(S)
                S = f[bi, ti, g][:, None] * S + np.outer(1.0 - f[bi, ti, g], v[bi, ti, g])
                o[bi, ti, h] = K ** -0.5 * q[bi, ti, h] @ S
    o = rmsnorm_eps(o, p["o_norm.scale"], 1e-5)
    if mixer.output_gate:
        o = o * silu(np.einsum("btd,dhv->bthv", x, p["wg"]))
    return np.einsum("bthv,hvd->btd", o, p["wo"])


CASES = [
    ("hgrn", "hgrn", dict()),
    ("hgrn_bounded_expanded", "hgrn", dict(lower_bound=0.5, expand_ratio=2)),
    ("hgrn2", "hgrn2", dict(num_heads=2)),
    ("hgrn2_bounded_gqa_gate", "hgrn2",
     dict(num_heads=4, num_kv_heads=2, expand_ratio=8, lower_bound=0.3, output_gate=True)),
]


def build(name, options, seed=0):
    extra = {"chunk_size": CHUNK} if name == "hgrn2" else {}
    mixer = memzoo.MIXERS[name](D, rngs=nnx.Rngs(seed), **options, **extra)
    # Off the initial values: zero biases and unit norm scales would hide their terms.
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
    return nnx.merge(graphdef, contract._perturbed(params), rest)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_naive_float64_recurrence(case):
    _, name, options = case
    mixer, x = build(name, options), inputs()
    naive = naive_hgrn if name == "hgrn" else naive_hgrn2
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, f"{name}: vs naive float64")
    seg = jnp.asarray(np.repeat([[0, 1, 2], [3, 3, 4]], [5, 11, 8], axis=1), jnp.int32)
    assert_close(forward_packed(mixer, x, seg), naive(mixer, x, seg), 1e-5,
                 f"{name}: packed vs naive float64")


def test_gqa_configuration_decodes():
    # The option table's HGRN-2 has no GQA and no expansion: decode this one too.
    contract.check_decoding("hgrn2", {**CASES[3][2], "chunk_size": CHUNK})


def test_lower_bound_bounds_the_forget_gate():
    from memzoo.linear_attention.hgrn import bounded_log_forget
    logits = jnp.linspace(-40.0, 40.0, 101)
    for gamma in (0.0, 0.25, 0.9):
        f = np.exp(np.asarray(bounded_log_forget(logits, gamma), np.float64))
        assert f.min() >= gamma * (1 - 1e-6) and f.max() <= 1.0
        np.testing.assert_allclose(f, forget(np.asarray(logits, np.float64), gamma), rtol=1e-5)


def test_state_sizes():
    assert memzoo.MIXERS["hgrn"](D, expand_ratio=2, rngs=nnx.Rngs(0)).init_cache(3) \
        .state.shape == (3, 2 * D)
    m = memzoo.MIXERS["hgrn2"](D, num_heads=2, expand_ratio=4, rngs=nnx.Rngs(0))
    assert m.init_cache(3).state.shape == (3, 2, 4, D // 2)


def test_fla_naive_hgrn_agrees():
    """fla's naive_recurrent_hgrn (h = exp(g) h + x) on our gate and input, when .peers exists."""
    from tests.convert.golden import require_peers
    require_peers()
    import json
    import os
    import subprocess
    from tests.convert.golden import PEERS_PYTHON
    rng = np.random.default_rng(0)
    log_f = np.log(forget(rng.standard_normal((2, 9, 5)), 0.2))
    inp = (1 - np.exp(log_f)) * rng.standard_normal((2, 9, 5))
    script = ("import json,sys,torch\n"
              "from fla.ops.hgrn.naive import naive_recurrent_hgrn\n"
              "g,x=(torch.tensor(a,dtype=torch.float64) for a in json.loads(sys.stdin.read()))\n"
              "o,_=naive_recurrent_hgrn(x,g)\n"
              "print(json.dumps(o.double().tolist()))\n")
    proc = subprocess.run([PEERS_PYTHON, "-c", script], input=json.dumps([log_f.tolist(),
                          inp.tolist()]), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = np.asarray(json.loads(proc.stdout))
    import pallas_kernels
    ours, _ = pallas_kernels.linear_scan(jnp.exp(jnp.asarray(log_f, jnp.float32)),
                                         jnp.asarray(inp, jnp.float32))
    assert_close(ours, theirs, 1e-5, "linear_scan vs fla naive_recurrent_hgrn")


@pytest.mark.parametrize("name, options, match", [
    ("hgrn", dict(lower_bound=1.0), "lower_bound"),
    ("hgrn", dict(lower_bound=-0.1), "lower_bound"),
    ("hgrn", dict(expand_ratio=0), "expand_ratio"),
    ("hgrn", dict(norm_eps=0), "norm_eps"),
    ("hgrn2", dict(lower_bound=True), "lower_bound"),
    ("hgrn2", dict(num_heads=3), "num_heads"),
])
def test_bad_options_name_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        memzoo.MIXERS[name](D, rngs=nnx.Rngs(0), **options)
