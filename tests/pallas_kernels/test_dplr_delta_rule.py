"""The kernel contract for `dplr_delta_rule` (WORKSPACE.md, "What every op's tests show")."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.memzoo import helpers
from pallas_kernels import _testing as kt
from pallas_kernels import delta_rule, dplr_delta_rule
from pallas_kernels.dplr_delta_rule import pallas as dpp

pytestmark = pytest.mark.kernel

F32_TOL = kt.F32_TOL
NAMES = ("q", "k", "v", "a", "b", "log_decay", "initial_state")


def make_inputs(key, shape, dtype=jnp.float32, *, decay="vector", segments=False,
                decay_range=(0.0, 1.0), initial=True):
    """RWKV-7's parametrisation, which keeps the transition stable: a = -kappa, b = kappa * eta
    with |kappa| = 1 and eta ~ U(0, 1) per channel; L2-normalised keys; log decays ~ -U(range)
    per key channel ("vector"), per head ("scalar") or none."""
    batch, length, heads, key_dim, value_dim = shape
    ks = jax.random.split(key, 9)
    unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(
        jax.random.normal(k, (batch, length, heads, key_dim)))
    q = jax.random.normal(ks[0], (batch, length, heads, key_dim))
    k = unit(ks[1])
    kappa = unit(ks[2])
    eta = jax.random.uniform(ks[3], (batch, length, heads, key_dim))
    v = jax.random.normal(ks[4], (batch, length, heads, value_dim))
    decay_shape = {"vector": (batch, length, heads, key_dim), "scalar": (batch, length, heads),
                   None: None}[decay]
    w = (None if decay_shape is None else
         -jax.random.uniform(ks[5], decay_shape, minval=decay_range[0], maxval=decay_range[1]))
    h0 = jax.random.normal(ks[6], (batch, heads, key_dim, value_dim)) if initial else None
    seg = (jnp.cumsum(jax.random.bernoulli(ks[7], 0.1, (batch, length)), axis=1).astype(jnp.int32)
           if segments else None)
    cast = lambda x: x.astype(dtype)
    return dict(q=cast(q), k=cast(k), v=cast(v), a=cast(-kappa), b=cast(kappa * eta),
                log_decay=w, initial_state=h0, segment_ids=seg)


_split = functools.partial(kt.given_inputs, names=NAMES)
forward_and_grads = functools.partial(kt.forward_and_grads, dplr_delta_rule)
check_against_reference = functools.partial(kt.check_matrix_state_op, dplr_delta_rule,
                                            names=NAMES)


XLA_CASES = {
    # name: (shape B T H K V, dtype, chunk, make_inputs options, x64)
    "float64-segments-T37-chunk16": ((2, 37, 2, 8, 6), jnp.float32, 16, dict(segments=True), True),
    # Chunks of 48 = three sub-chunks: the pair matrices' across-sub-chunk factors (and their
    # hand-written cotangents) to rounding, with resets and a padded last chunk.
    "float64-segments-T53-chunk48": ((1, 53, 1, 8, 4), jnp.float32, 48,
                                     dict(segments=True, decay_range=(0.0, 3.0)), True),
    "T1-decode-no-decay": ((2, 1, 2, 8, 8), jnp.float32, None, dict(decay=None), False),
    "bf16-T70-default-chunk": ((1, 70, 1, 16, 16), jnp.bfloat16, None, dict(segments=True), False),
}


@pytest.mark.parametrize("case", list(XLA_CASES))
def test_xla_matches_float64_reference(case):
    shape, dtype, chunk, options, x64 = XLA_CASES[case]
    inputs = make_inputs(jax.random.PRNGKey(len(case)), shape, dtype, **options)
    check_against_reference("xla", inputs, chunk_size=chunk, seed=3, x64=x64)


def test_xla_strong_and_weak_decays():
    """Per-channel decays near 1 and near 0 (exp(-30)) in one batch, compared row by row."""
    rows = [make_inputs(jax.random.PRNGKey(i), (1, 40, 2, 8, 8), decay_range=r)
            for i, r in enumerate([(0.0, 1e-4), (5.0, 30.0)])]
    inputs = {n: jnp.concatenate([r[n] for r in rows]) if rows[0][n] is not None else None
              for n in rows[0]}
    check_against_reference("xla", inputs, chunk_size=None, seed=4)   # 40 tokens: 5 sub-chunks


def test_reference_matches_naive_numpy_loop():
    inputs = make_inputs(jax.random.PRNGKey(0), (2, 9, 3, 4, 5))
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2]] * 2, np.int32)
    names, arrays = _split(inputs)
    o, s = kt.float64_run(jax.jit(lambda *x: dplr_delta_rule(
        **dict(zip(names, x)), segment_ids=seg, implementation="reference")), *arrays)
    q, k, v, a, b, w, s0 = (np.asarray(x, np.float64) for x in arrays)
    want = np.zeros(v.shape)
    state = s0.copy()
    for t in range(q.shape[1]):
        for i in range(q.shape[0]):
            for h in range(q.shape[2]):
                if t > 0 and seg[i, t] != seg[i, t - 1]:
                    state[i, h] = 0
                transition = np.diag(np.exp(w[i, t, h])) + np.outer(a[i, t, h], b[i, t, h])
                state[i, h] = transition @ state[i, h] + np.outer(k[i, t, h], v[i, t, h])
                want[i, t, h] = q.shape[3] ** -0.5 * state[i, h].T @ q[i, t, h]
    kt.assert_close(o, want, 1e-12, "o")
    kt.assert_close(s, state, 1e-12, "final_state")


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_delta_rule_is_the_special_case(implementation):
    """delta_rule's S_t = g S - beta k k^T (g S) + beta k v^T is a = -beta k, b = exp(g) k, a
    written key beta k and the decay g on every key channel (also with segments)."""
    inputs = make_inputs(jax.random.PRNGKey(12), (2, 37, 2, 8, 6), segments=True)
    q, k, v, h0, seg = (inputs[n] for n in ("q", "k", "v", "initial_state", "segment_ids"))
    key = jax.random.PRNGKey(13)
    beta = jax.random.uniform(key, k.shape[:3], maxval=2.0)
    g = -jax.random.uniform(jax.random.fold_in(key, 1), k.shape[:3])

    def both(q, k, v, beta, g, h0):
        kw = dict(initial_state=h0, segment_ids=seg, chunk_size=16, implementation=implementation)
        want = delta_rule(q, k, v, beta, log_gate=g, **kw)
        bk = beta[..., None] * k
        got = dplr_delta_rule(q, bk, v, -bk, jnp.exp(g)[..., None] * k,
                              log_decay=jnp.broadcast_to(g[..., None], k.shape), **kw)
        return got, want

    got, want = kt.float64_run(jax.jit(both), q, k, v, beta, g, h0)
    kt.assert_tree_close(got, want, 1e-12, "dplr vs delta_rule")


PALLAS_CASES = {
    # Chunks of 13 (neither a multiple of 8 nor a power of two): every chunk is padded to the
    # tile (16 rows on TPU and GPU), the last chunk (11 tokens) too; two value blocks.
    "segments-T37-chunk13": ((1, 37, 1, 8, 6), 13, dict(segments=True)),
    "scalar-decay-T20-chunk8": ((1, 20, 1, 4, 4), 8, dict(decay="scalar", initial=False)),
    "no-decay-T5-one-padded-chunk": ((1, 5, 1, 4, 4), 64, dict(decay=None)),
}
# Pairwise rather than the full product (interpreters are slow): the tricky case in every
# runner, the others in the GPU and the TPU kernel once each.
PALLAS_RUNS = [(runner, "segments-T37-chunk13") for runner in
               ("pallas_gpu_interpret", "pallas_tpu_generic_interpret", "pallas_tpu_interpret")] + [
    ("pallas_gpu_interpret", "scalar-decay-T20-chunk8"),
    ("pallas_tpu_interpret", "no-decay-T5-one-padded-chunk")]
PALLAS_RUNS += [("pallas_native", case) for case in PALLAS_CASES
                if "pallas_native" in kt.IMPLEMENTATION_RUNNERS]


@pytest.mark.parametrize("runner,case", PALLAS_RUNS, ids=[f"{r}-{c}" for r, c in PALLAS_RUNS])
def test_pallas_matches_float64_reference(runner, case, monkeypatch):
    """The forward kernels (o, final state) and the XLA backward from the chunk states they
    wrote (every gradient)."""
    ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    # Narrow value blocks so the tiny test shapes still span several programs.
    monkeypatch.setattr(dpp.BlockSizes, "get_default", classmethod(lambda cls, t: cls(block_v=4)))
    shape, chunk, options = PALLAS_CASES[case]
    inputs = make_inputs(jax.random.PRNGKey(1), shape, **options)
    check_against_reference(implementation, inputs, chunk_size=chunk, seed=5, ctx=ctx())


def test_pallas_chunk_states_are_the_xla_paths():
    """The residual the backward reads: the kernels write the states entering the op's chunks."""
    from pallas_kernels.dplr_delta_rule import xla as dpx
    inputs = make_inputs(jax.random.PRNGKey(2), (1, 30, 1, 8, 4), segments=True)
    names, arrays = _split(inputs)
    x = dict(zip(names, arrays))
    reset = jnp.concatenate([jnp.zeros((1, 1), bool), inputs["segment_ids"][:, 1:]
                             != inputs["segment_ids"][:, :-1]], axis=1).astype(jnp.float32)
    args = (x["q"], x["k"], x["v"], x["a"], x["b"], x["log_decay"], x["initial_state"], reset)
    static = dict(scale=8 ** -0.5, chunk_size=8, segmented=True)
    want = dpx.dplr_forward(*args, **static)
    got = dpp.dplr_forward(*args, **static, target="tpu", interpret=True)
    assert got[2].shape == want[2].shape == (1, 1, 4, 8, 4)
    kt.assert_tree_close(got, want, 1e-5, "kernel vs XLA (o, final, chunk states)")


def test_64_bit_inputs_auto_takes_xla_and_pallas_refuses():
    with jax.enable_x64(True):
        inputs = {n: (None if x is None else x.astype(jnp.float64)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x)
                  for n, x in make_inputs(jax.random.PRNGKey(8), (1, 21, 1, 4, 4)).items()}
        names, arrays = _split(inputs)
        f = lambda impl: jax.jit(lambda *x: dplr_delta_rule(**dict(zip(names, x)), chunk_size=8,
                                                            implementation=impl))
        ref = f("reference")(*arrays)
        with kt.IMPLEMENTATION_RUNNERS["pallas_tpu_interpret"][0]():
            got = f("auto")(*arrays)
        assert got[0].dtype == jnp.float64 and got[1].dtype == jnp.float64
        kt.assert_tree_close(got, ref, 1e-12, "float64 under auto")
        text = kt.lower_for(lambda *x: dplr_delta_rule(**dict(zip(names, x))), *arrays,
                            platform="tpu")
        assert not kt.custom_calls(text)
        with pytest.raises(ValueError, match=r"implementation='pallas' .* accumulate in float32; "
                                             r"these inputs accumulate in float64"):
            dplr_delta_rule(**dict(zip(names, arrays)), implementation="pallas")


def test_long_sequence_stays_finite_and_accurate():
    """T = 2048 through the XLA path: no overflow from the per-channel decays (some strong), no
    drift from the chunks, in the outputs and every gradient (against the same XLA path in
    float64, whose gradients equal the reference's at the short lengths above)."""
    inputs = make_inputs(jax.random.PRNGKey(2), (1, 2048, 1, 8, 8), decay_range=(0.0, 3.0))
    names, arrays = _split(inputs)
    f = lambda impl: (lambda *x: dplr_delta_rule(**dict(zip(names, x)), implementation=impl))
    kt.assert_tree_close(jax.jit(f("xla"))(*arrays), kt.float64_run(jax.jit(f("reference")),
                                                                    *arrays), F32_TOL, "T=2048")
    grad = lambda: jax.jit(jax.grad(lambda *x: jnp.sum(f("xla")(*x)[0] ** 2),
                                    argnums=tuple(range(len(arrays)))))
    grads = grad()(*arrays)
    ref_grads = kt.float64_run(grad(), *arrays)
    for name, g, r in zip(names, grads, ref_grads):
        kt.assert_close(g, r, F32_TOL, f"d{name} at T=2048")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_step_by_step_and_split_carry_equal_whole(implementation):
    inputs = make_inputs(jax.random.PRNGKey(11), (2, 24, 2, 8, 8))
    names, arrays = _split(inputs)
    ctx = kt.IMPLEMENTATION_RUNNERS["pallas_gpu_interpret" if implementation == "pallas"
                                    else "xla"][0]
    kw = dict(chunk_size=16, implementation=implementation)
    timed = [(n, x) for n, x in zip(names, arrays) if n != "initial_state"]

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(lo, hi, state):
        return dplr_delta_rule(**{n: x[:, lo:hi] for n, x in timed}, initial_state=state, **kw)

    h0 = inputs["initial_state"]
    with ctx():
        whole, final = run(0, 24, h0)
        if implementation == "xla":   # the interpreter is slow: step by step on the XLA path
            state, steps = h0, []
            step = jax.jit(lambda xs, state: dplr_delta_rule(**xs, initial_state=state, **kw))
            for t in range(24):
                y, state = step({n: x[:, t:t + 1] for n, x in timed}, state)
                steps.append(y)
            kt.assert_close(jnp.concatenate(steps, 1), whole, 1e-5, "step-by-step")
            kt.assert_close(state, final, 1e-5, "step-by-step final state")
        first, carry = run(0, 9, h0)
        second, final_split = run(9, 24, carry)
    kt.assert_close(jnp.concatenate([first, second], 1), whole, 1e-5, "split-and-carry")
    kt.assert_close(final_split, final, 1e-5, "split-and-carry final state")


def test_segment_ids_equal_separate_documents():
    inputs = make_inputs(jax.random.PRNGKey(5), (1, 30, 2, 8, 8), initial=False)
    names, arrays = _split(inputs)
    xs = dict(zip(names, arrays))
    seg = jnp.array([[0] * 7 + [1] * 15 + [2] * 8], jnp.int32)
    op = jax.jit(functools.partial(dplr_delta_rule, chunk_size=8, implementation="xla"))
    packed, _ = op(**xs, segment_ids=seg)
    separate = jnp.concatenate(
        [op(**{n: x[:, s:e] for n, x in xs.items()})[0] for s, e in [(0, 7), (7, 22), (22, 30)]],
        axis=1)
    kt.assert_close(packed, separate, 1e-6, "packed vs separate")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators(platform):
    """The forward kernel lowers for the platform ("auto" picks it where _dispatch.AUTO_ON_CUDA
    says so); under grad the program holds that one kernel (the backward is XLA)."""
    inputs = make_inputs(jax.random.PRNGKey(0), (2, 256, 2, 64, 128), jnp.bfloat16,
                         segments=True)
    names, arrays = _split(inputs)
    seg = inputs["segment_ids"]

    def fwd(implementation):
        return lambda *xs: dplr_delta_rule(**dict(zip(names, xs)), segment_ids=seg,
                                           implementation=implementation)

    def fwd_bwd(implementation):
        return jax.grad(lambda *x: jnp.sum(fwd(implementation)(*x)[0].astype(jnp.float32)),
                        argnums=tuple(range(len(arrays))))

    kt.assert_auto_lowers(fwd, *arrays, op="dplr_delta_rule", platform=platform, count=1)
    kt.assert_auto_lowers(fwd_bwd, *arrays, op="dplr_delta_rule", platform=platform, count=1)


def test_auto_on_cpu_uses_no_custom_call():
    inputs = make_inputs(jax.random.PRNGKey(0), (1, 16, 1, 8, 8))
    names, arrays = _split(inputs)
    text = kt.lower_for(lambda *x: dplr_delta_rule(**dict(zip(names, x))), *arrays,
                        platform="cpu")
    assert not kt.custom_calls(text)


def test_vmap_jit_grad_compose():
    a = make_inputs(jax.random.PRNGKey(4), (1, 20, 2, 8, 8))
    b = make_inputs(jax.random.PRNGKey(6), (1, 20, 2, 8, 8))
    names, xa = _split(a)
    _, xb = _split(b)
    stacked = [jnp.stack([x, y]) for x, y in zip(xa, xb)]
    f = lambda impl: (lambda *xs: dplr_delta_rule(**dict(zip(names, xs)), chunk_size=8,
                                                  implementation=impl)[0])
    loss = lambda impl: (lambda *xs: jnp.sum(f(impl)(*xs) ** 2))
    argnums = tuple(range(len(names)))
    got, g = jax.jit(jax.vmap(lambda *x: (f("xla")(*x), jax.grad(loss("xla"), argnums)(*x))))(
        *stacked)
    kt.assert_close(got[1], jax.jit(f("reference"))(*xb), F32_TOL, "vmap")
    g_ref = jax.jit(jax.grad(loss("reference"), argnums))(*xb)
    kt.assert_tree_close(tuple(x[1] for x in g), g_ref, F32_TOL, "vmap(grad)")


def _good(**over):
    x = dict(q=np.ones((2, 5, 3, 4), np.float32), k=np.ones((2, 5, 3, 4), np.float32),
             v=np.ones((2, 5, 3, 6), np.float32), a=np.ones((2, 5, 3, 4), np.float32),
             b=np.ones((2, 5, 3, 4), np.float32))
    x.update(over)
    return x


@pytest.mark.parametrize("kwargs,message", [
    (_good(q=np.ones((2, 5, 3), np.float32)), "`q` must have rank 4"),
    (_good(k=np.ones((2, 5, 3, 5), np.float32)), "`k` must have shape"),
    (_good(v=np.ones((2, 4, 3, 6), np.float32)), "`v` must have shape"),
    (_good(a=np.ones((2, 5, 3, 3), np.float32)), "`a` must have shape"),
    (_good(b=np.ones((2, 5, 3), np.float32)), "`b` must have rank 4"),
    (_good(q=np.ones((2, 5, 3, 4), np.int32)), "`q` must have a floating"),
    (_good(a=np.ones((2, 5, 3, 4), np.complex64)), "`a` must be real floating"),
    (_good(log_decay=np.ones((2, 5, 3, 5), np.float32)), "`log_decay` must have shape"),
    (_good(log_decay=np.ones((2, 5), np.float32)), "`log_decay` must have shape"),
    (_good(initial_state=np.ones((2, 3, 4, 5), np.float32)), "`initial_state` must have shape"),
    (_good(segment_ids=np.ones((2, 5), np.float32)), "`segment_ids` must be an integer"),
    (_good(segment_ids=np.ones((2, 4), np.int32)), "`segment_ids` must have shape"),
    (_good(scale="big"), "`scale` must be a Python float"),
    (_good(chunk_size=0), "`chunk_size` must be a positive int"),
    (_good(implementation="triton"), "implementation must be one of"),
])
def test_bad_input_raises_clear_value_error(kwargs, message):
    arrays = {n: kwargs.pop(n) for n in ("q", "k", "v", "a", "b")}
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda q, k, v, a, b: dplr_delta_rule(q, k, v, a, b, **kwargs))(**arrays)


_FLA_SCRIPT = r'''
import importlib.util, sys
import numpy as np, torch
spec = importlib.util.spec_from_file_location("dplr_naive", sys.argv[1])
naive = importlib.util.module_from_spec(spec)
spec.loader.exec_module(naive)
x = np.load(sys.argv[2])
t = lambda n: torch.from_numpy(np.ascontiguousarray(x[n].transpose(0, 2, 1, 3)))
# fla: S_t = S_{t-1} * exp(gk) + beta (alpha^T S_{t-1}) + k v^T: alpha reads, beta writes
o, s = naive.dplr_recurrence(t("q"), t("k"), t("v"), t("b"), t("a"), t("log_decay"),
                             initial_state=torch.from_numpy(x["initial_state"]))
np.savez(sys.argv[3], o=o.numpy().transpose(0, 2, 1, 3), s=s.numpy())
'''


def test_reference_matches_fla_naive_dplr_recurrence(tmp_path):
    """fla's naive generalized delta rule (ops/generalized_delta_rule/dplr/naive.py, run under
    the peers' torch) against our specification, outputs and final state."""
    import glob
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    python = os.path.join(root, ".peers", "torch", "bin", "python")
    naive = glob.glob(os.path.join(root, ".peers", "torch", "lib", "python*", "site-packages",
                                   "fla", "ops", "generalized_delta_rule", "dplr", "naive.py"))
    if not os.path.isfile(python) or not naive:
        helpers.peers_missing("fla's naive references are not built under .peers (../shared/peers/setup.sh)")
    inputs = make_inputs(jax.random.PRNGKey(21), (2, 20, 2, 8, 6))
    names, arrays = _split(inputs)
    np.savez(tmp_path / "in.npz", **{n: np.asarray(x, np.float32) for n, x in zip(names, arrays)})
    proc = subprocess.run([python, "-c", _FLA_SCRIPT, naive[0], str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fla = np.load(tmp_path / "out.npz")
    o, s = kt.float64_run(jax.jit(lambda *x: dplr_delta_rule(**dict(zip(names, x)),
                                                             implementation="reference")), *arrays)
    kt.assert_close(fla["o"], o, 1e-5, "o vs fla")
    kt.assert_close(fla["s"], s, 1e-5, "final state vs fla")
