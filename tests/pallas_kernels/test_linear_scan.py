"""The kernel contract for `linear_scan` (WORKSPACE.md, "What every op's tests show")."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_scan
from pallas_kernels import _testing as kt
from pallas_kernels.linear_scan import pallas as lsp

pytestmark = pytest.mark.kernel

F32_TOL = 1e-5   # float32 against float64: well under the contract's 1e-4
BF16_TOL = 1e-2


def make_inputs(key, shape, dtype, *, segments=False, initial=True):
    """Decays inside the unit disc (|a| in [0.5, 1)), so long scans stay bounded."""
    batch, length, width = shape
    k = jax.random.split(key, 6)
    mag = jax.random.uniform(k[0], shape, minval=0.5, maxval=0.999)
    real = jnp.dtype(dtype).kind != "c"
    if real:
        a = mag.astype(dtype)
        b = jax.random.normal(k[1], shape).astype(dtype)
        h0 = jax.random.normal(k[2], (batch, width)) if initial else None
    else:
        phase = jax.random.uniform(k[3], shape, minval=-np.pi, maxval=np.pi)
        a = (mag * jnp.exp(1j * phase)).astype(dtype)
        b = (jax.random.normal(k[1], shape) + 1j * jax.random.normal(k[4], shape)).astype(dtype)
        h0 = (jax.random.normal(k[2], (batch, width)) * (1 + 1j)) if initial else None
    seg = None
    if segments:
        seg = jnp.cumsum(jax.random.bernoulli(k[5], 0.1, (batch, length)), axis=1).astype(jnp.int32)
    return a, b, h0, seg


def loss_fn(implementation, reverse, weights):
    """A real scalar of every output, so gradients reach every input through h and the state."""
    w_h, w_final = weights

    def loss(a, b, h0, seg):
        h, final = linear_scan(a, b, initial_state=h0, reverse=reverse, segment_ids=seg,
                               implementation=implementation)
        return (jnp.sum(jnp.real(h.astype(w_h.dtype) * w_h))
                + jnp.sum(jnp.real(final.astype(w_final.dtype) * w_final)))

    return loss


def forward_and_grads(implementation, reverse, a, b, h0, seg, weights):
    out = linear_scan(a, b, initial_state=h0, reverse=reverse, segment_ids=seg,
                      implementation=implementation)
    grads = jax.grad(loss_fn(implementation, reverse, weights), argnums=(0, 1, 2))(a, b, h0, seg)
    return out, grads


def reference_run(reverse, a, b, h0, seg, weights):
    return kt.float64_run(jax.jit(functools.partial(forward_and_grads, "reference", reverse)),
                          a, b, h0, seg, weights)


def weights_for(key, shape, dtype):
    batch, _, width = shape
    k1, k2 = jax.random.split(key)
    cplx = jnp.dtype(dtype).kind == "c"
    wdt = jnp.complex64 if cplx else jnp.float32
    return (jax.random.normal(k1, shape).astype(wdt), jax.random.normal(k2, (batch, width)).astype(wdt))


XLA_CASES = [
    (shape, dtype, reverse)
    for shape in [(1, 1, 8), (2, 37, 200), (3, 517, 64)]
    for dtype in [jnp.float32, jnp.complex64, jnp.bfloat16]
    for reverse in [False, True]
]

# Interpreters are slow: the shapes that exercise padding of time and channels, several time
# blocks (block_t below), T=1, complex planes and 16-bit sublane packing.
PALLAS_CASES = [
    ((1, 1, 8), jnp.float32, False),
    ((2, 37, 200), jnp.float32, False),
    ((2, 37, 200), jnp.float32, True),
    ((1, 50, 130), jnp.complex64, False),
    ((1, 50, 130), jnp.complex64, True),
    ((1, 45, 20), jnp.bfloat16, True),
]
SMALL_BLOCKS = {"tpu": lsp.BlockSizes(block_t=16, block_d=128),
                "cuda": lsp.BlockSizes(block_t=0, block_d=16)}


def _check_against_reference(implementation, shape, dtype, reverse, seed, ctx=None):
    key = jax.random.PRNGKey(seed)
    a, b, h0, seg = make_inputs(key, shape, dtype, segments=shape[1] > 1)
    weights = weights_for(jax.random.fold_in(key, 1), shape, dtype)
    ref_out, ref_grads = reference_run(reverse, a, b, h0, seg, weights)
    with ctx or kt.IMPLEMENTATION_RUNNERS["xla"][0]():
        # jit: one compiled program (op-by-op dispatch costs far more CPU than one compile)
        out, grads = jax.jit(functools.partial(forward_and_grads, implementation, reverse))(
            a, b, h0, seg, weights)
    tol = BF16_TOL if dtype == jnp.bfloat16 else F32_TOL
    assert out[0].dtype == jnp.result_type(a.dtype, b.dtype)
    assert out[1].dtype == jnp.promote_types(out[0].dtype, jnp.float32)
    kt.assert_close(out[0], ref_out[0], tol, "h")
    kt.assert_close(out[1], ref_out[1], tol, "final_state")
    for name, g, r in zip(["da", "db", "dh0"], grads, ref_grads):
        kt.assert_close(g, r, tol, name)


@pytest.mark.parametrize("shape,dtype,reverse", XLA_CASES,
                         ids=[f"{s}-{jnp.dtype(d).name}-{reverse=}" for s, d, reverse in XLA_CASES])
def test_xla_matches_float64_reference(shape, dtype, reverse):
    _check_against_reference("xla", shape, dtype, reverse, seed=hash((shape, reverse)) % 1000)


# Interpreters are slow, so the table is pairwise rather than the full product: the tricky cases
# (several time and channel blocks with a partial one, reversed; complex) in every runner, the
# others each in one runner (bfloat16 in TPU interpret mode, which the newest-JAX CI stage runs).
PALLAS_RUNS = [(runner, case) for runner in kt.PALLAS_RUNNERS
               for case in (PALLAS_CASES[2], PALLAS_CASES[3])] + [
    ("pallas_gpu_interpret", PALLAS_CASES[0]),
    ("pallas_tpu_generic_interpret", PALLAS_CASES[1]),
    ("pallas_gpu_interpret", PALLAS_CASES[4]),
    ("pallas_tpu_interpret", PALLAS_CASES[5])]
PALLAS_RUNS += [("pallas_native", case) for case in PALLAS_CASES
                if "pallas_native" in kt.IMPLEMENTATION_RUNNERS
                and case not in (PALLAS_CASES[2], PALLAS_CASES[3])]


@pytest.mark.parametrize("runner,shape,dtype,reverse", [(r, *c) for r, c in PALLAS_RUNS],
                         ids=[f"{s}-{jnp.dtype(d).name}-{reverse=}-{r}"
                              for r, (s, d, reverse) in PALLAS_RUNS])
def test_pallas_matches_float64_reference(runner, shape, dtype, reverse, monkeypatch):
    ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    # Small blocks so that short test sequences still span several time and channel blocks.
    monkeypatch.setattr(lsp.BlockSizes, "get_default", classmethod(lambda cls, t: SMALL_BLOCKS[t]))
    _check_against_reference(implementation, shape, dtype, reverse, seed=7, ctx=ctx())


def test_pallas_default_blocks_interpret():
    """The default (large) TPU blocks: one partial time block and one partial channel block."""
    a, b, h0, _ = make_inputs(jax.random.PRNGKey(3), (1, 300, 600), jnp.float32)
    ref = kt.float64_run(functools.partial(linear_scan, implementation="reference"), a, b,
                         initial_state=h0)
    with kt.IMPLEMENTATION_RUNNERS["pallas_tpu_interpret"][0]():
        out = linear_scan(a, b, initial_state=h0, implementation="pallas")
    kt.assert_tree_close(out, ref, F32_TOL, "tpu default blocks")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_equals_step_by_step_and_split_carry(implementation, reverse):
    a, b, h0, _ = make_inputs(jax.random.PRNGKey(11), (2, 24, 40), jnp.complex64)
    ctx = kt.IMPLEMENTATION_RUNNERS["pallas_gpu_interpret"][0] if implementation == "pallas" \
        else kt.IMPLEMENTATION_RUNNERS["xla"][0]
    with ctx():
        whole, final = linear_scan(a, b, initial_state=h0, reverse=reverse,
                                   implementation=implementation)
        # Step by step, carrying the state one token at a time.
        order = range(23, -1, -1) if reverse else range(24)
        state, steps = h0, {}
        for t in order:
            y, state = linear_scan(a[:, t:t + 1], b[:, t:t + 1], initial_state=state,
                                   implementation=implementation)
            steps[t] = y[:, 0]
        stepped = jnp.stack([steps[t] for t in range(24)], axis=1)
        # Split and carry: the state after one part is the initial state of the other.
        t1 = 9
        first, second = (slice(t1, None), slice(None, t1)) if reverse else (slice(None, t1), slice(t1, None))
        h_first, carry = linear_scan(a[:, first], b[:, first], initial_state=h0, reverse=reverse,
                                     implementation=implementation)
        h_second, final_split = linear_scan(a[:, second], b[:, second], initial_state=carry,
                                            reverse=reverse, implementation=implementation)
    split = (jnp.concatenate([h_second, h_first], 1) if reverse
             else jnp.concatenate([h_first, h_second], 1))
    kt.assert_close(stepped, whole, 1e-6, "step-by-step")
    kt.assert_close(state, final, 1e-6, "step-by-step final state")
    kt.assert_close(split, whole, 1e-6, "split-and-carry")
    kt.assert_close(final_split, final, 1e-6, "split-and-carry final state")


@pytest.mark.parametrize("reverse", [False, True])
def test_segment_ids_equal_separate_documents(reverse):
    a, b, _, _ = make_inputs(jax.random.PRNGKey(5), (1, 30, 16), jnp.float32)
    seg = jnp.array([[0] * 7 + [1] * 15 + [2] * 8], jnp.int32)
    packed, _ = linear_scan(a, b, segment_ids=seg, reverse=reverse, implementation="xla")
    bounds = [(0, 7), (7, 22), (22, 30)]
    separate = jnp.concatenate(
        [linear_scan(a[:, s:e], b[:, s:e], reverse=reverse, implementation="xla")[0]
         for s, e in bounds], axis=1)
    kt.assert_close(packed, separate, 1e-7, "packed vs separate")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators(platform):
    """The Pallas kernels must lower to Mosaic (TPU) and Triton (GPU) on a CPU-only machine.

    "auto" must pick the kernel for the lowering platform (not for the machine tracing it): one
    custom call for the forward, and one more for the backward under grad.
    """
    a, b, h0, _ = make_inputs(jax.random.PRNGKey(0), (2, 300, 1000), jnp.bfloat16)

    def fwd(a, b, h0):
        return linear_scan(a, b, initial_state=h0, implementation="auto")

    def fwd_bwd(a, b, h0):
        return jax.grad(lambda *x: jnp.sum(jnp.real(fwd(*x)[0]).astype(jnp.float32)), argnums=(0, 1, 2))(a, b, h0)

    kt.assert_lowers_to(fwd, a, b, h0, platform=platform, count=1)
    kt.assert_lowers_to(fwd_bwd, a, b, h0, platform=platform, count=2)
    ac, bc, hc, _ = make_inputs(jax.random.PRNGKey(0), (1, 64, 256), jnp.complex64)
    kt.assert_lowers_to(fwd_bwd, ac, bc, hc, platform=platform, count=2)


def test_auto_on_cpu_uses_no_custom_call():
    a, b, h0, _ = make_inputs(jax.random.PRNGKey(0), (1, 16, 8), jnp.float32)
    text = kt.lower_for(lambda *x: linear_scan(*x[:2], initial_state=x[2]), a, b, h0, platform="cpu")
    assert not kt.custom_calls(text)


def test_auto_survives_export():
    """"auto" is decided at lowering: one traced function exports the Pallas kernel for a TPU
    from this CPU machine, and the XLA path for a CPU (which runs here and is checked).

    Not tested, because JAX cannot do it: one export for several platforms of which one is CPU.
    pallas_call lowers itself for every platform of the module even inside a platform_dependent
    branch ("Only interpret mode is supported on CPU backend").
    """
    from jax import export
    a, b, h0, _ = make_inputs(jax.random.PRNGKey(2), (2, 20, 8), jnp.float32)
    fn = jax.jit(lambda a, b, h0: linear_scan(a, b, initial_state=h0))
    for_tpu = export.export(fn, platforms=("tpu",))(a, b, h0)
    assert kt.CUSTOM_CALLS["tpu"] in for_tpu.mlir_module()
    for_cpu = export.export(fn, platforms=("cpu",))(a, b, h0)
    assert not kt.custom_calls(for_cpu.mlir_module())
    kt.assert_tree_close(for_cpu.call(a, b, h0),
                         linear_scan(a, b, initial_state=h0, implementation="reference"), 1e-7)


def test_vmap_jit_grad_compose():
    a, b, h0, _ = make_inputs(jax.random.PRNGKey(4), (3, 12, 8), jnp.float32)
    stacked = (jnp.stack([a, a * 0.9]), jnp.stack([b, -b]), jnp.stack([h0, h0 * 2]))
    f = jax.jit(jax.vmap(lambda a, b, h0: linear_scan(a, b, initial_state=h0)[0]))
    got = f(*stacked)
    for i in range(2):
        kt.assert_close(got[i], linear_scan(stacked[0][i], stacked[1][i],
                                            initial_state=stacked[2][i])[0], 1e-7, f"vmap[{i}]")
    g = jax.jit(jax.vmap(jax.grad(lambda a, b: jnp.sum(linear_scan(a, b)[0] ** 2))))(*stacked[:2])
    g_ref = jax.grad(lambda a, b: jnp.sum(linear_scan(a, b, implementation="reference")[0] ** 2))(
        stacked[0][1], stacked[1][1])
    kt.assert_close(g[1], g_ref, 1e-5, "vmap(grad)")


def test_second_order_gradients_through_reference_agree():
    """jax.hessian-vector style: grad of grad flows through the custom VJP (it is linear in b)."""
    a, b, _, _ = make_inputs(jax.random.PRNGKey(6), (1, 10, 4), jnp.float32)
    f = lambda impl: jax.grad(lambda a: jnp.sum(jax.grad(
        lambda b: jnp.sum(linear_scan(a, b, implementation=impl)[0] ** 2))(b) ** 2))(a)
    kt.assert_close(f("xla"), f("reference"), 1e-5, "grad of grad")


@pytest.mark.parametrize("kwargs,message", [
    (dict(a=np.ones((2, 5, 3), np.float32), b=np.ones((2, 5, 4), np.float32)), "same shape"),
    (dict(a=np.ones((3, 5, 4), np.float32), b=np.ones((2, 5, 4), np.float32)), "same shape"),
    (dict(a=np.ones((2, 5, 4), np.int32), b=np.ones((2, 5, 4), np.float32)), "`a` must have a floating"),
    (dict(a=np.ones((2, 5, 4), np.float32), b=np.ones((2, 5, 4), np.int8)), "`b` must have a floating"),
    (dict(a=np.ones((5, 4), np.float32), b=np.ones((5, 4), np.float32)), "`a` must have rank 3"),
    (dict(a=np.ones((2, 5, 4), np.float32), b=np.ones((2, 5, 4), np.float32),
          initial_state=np.ones((2, 5), np.float32)), "`initial_state` must have shape"),
    (dict(a=np.ones((2, 5, 4), np.float32), b=np.ones((2, 5, 4), np.float32),
          segment_ids=np.ones((2, 5), np.float32)), "`segment_ids` must be an integer"),
    (dict(a=np.ones((2, 5, 4), np.float32), b=np.ones((2, 5, 4), np.float32),
          segment_ids=np.ones((2, 4), np.int32)), "`segment_ids` must have shape"),
    (dict(a=np.ones((2, 5, 4), np.float32), b=np.ones((2, 5, 4), np.float32),
          implementation="triton"), "implementation must be one of"),
])
def test_bad_input_raises_clear_value_error(kwargs, message):
    a, b = kwargs.pop("a"), kwargs.pop("b")
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda a, b: linear_scan(a, b, **kwargs))(a, b)


@pytest.mark.parametrize("reverse", [False, True])
def test_no_channels_is_empty_not_a_kernel_error(reverse):
    # A zero-width channel axis (a memory with no flattened leaves) gave the kernels a block of
    # width 0 (ZeroDivisionError while building the Pallas branch, which "auto" traces on CPU too).
    a = jnp.zeros((2, 5, 0))
    h0 = jnp.zeros((2, 0))
    for platform in ("tpu", "cuda"):
        kt.lower_for(lambda a: linear_scan(a, a, initial_state=h0, reverse=reverse), a,
                     platform=platform)
    h, final = jax.jit(lambda a: linear_scan(a, a, reverse=reverse))(a)
    assert h.shape == (2, 5, 0) and final.shape == (2, 0)
    assert jax.grad(lambda a: linear_scan(a, a)[0].sum())(a).shape == a.shape
