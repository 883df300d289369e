"""The kernel contract for `memory_lookup` (WORKSPACE.md, "What every op's tests show").

The op carries no state, so the contract's step-by-step and split-and-carry points reduce to
"a batch of bags equals the bags one at a time" (the vmap test)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing as kt
from pallas_kernels import memory_lookup
from pallas_kernels.memory_lookup import pallas as mlp
from pallas_kernels.memory_lookup import xla as mlx

pytestmark = pytest.mark.kernel

F32_TOL = 1e-5
BF16_TOL = 1e-2


def make_inputs(seed, rows, dim, lead, k, dtype=jnp.float32, repeat=False):
    # numpy draws: eager jax.random per shape costs a compile each, seconds on a busy CPU.
    rng = np.random.default_rng(seed)
    values = jnp.asarray(rng.standard_normal((rows, dim)), jnp.float32).astype(dtype)
    indices = rng.integers(0, rows, (*lead, k))
    indices.reshape(-1)[-k] = rows - 1   # the table's last row is always read (its edge)
    if repeat and k > 1:
        # Every bag repeats its first row in its last slot; the first bag is one row k times.
        indices[..., -1] = indices[..., 0]
        flat = indices.reshape(-1, k)
        flat[0] = flat[0, 0]
    weights = jnp.asarray(rng.standard_normal((*lead, k)), jnp.float32).astype(dtype)
    cot = jnp.asarray(rng.standard_normal((*lead, dim)), jnp.float32)
    return values, jnp.asarray(indices, jnp.int32), weights, cot


def forward_and_grads(implementation, values, indices, weights, cot):
    """The output and the VJP of cot (one forward: a single jitted value-and-grad)."""
    out, vjp = jax.vjp(lambda v, w: memory_lookup(v, indices, w, implementation=implementation),
                       values, weights)
    return out, vjp(cot.astype(out.dtype))


def check(implementation, values, indices, weights, cot, ctx=None):
    ref_out, ref_grads = kt.float64_run(jax.jit(functools.partial(forward_and_grads, "reference")),
                                        values, indices, weights, cot)
    with ctx or kt.IMPLEMENTATION_RUNNERS["xla"][0]():
        # A fresh jit inside the runner's context: the interpret mode is read when tracing, and a
        # jit cache shared between runners would replay the first runner's kernel in the others.
        out, grads = jax.jit(functools.partial(forward_and_grads, implementation))(
            values, indices, weights, cot)
    tol = BF16_TOL if values.dtype == jnp.bfloat16 else F32_TOL
    assert out.dtype == jnp.result_type(values.dtype, weights.dtype)
    assert grads[0].dtype == values.dtype and grads[1].dtype == weights.dtype
    kt.assert_close(out, ref_out, tol, "out")
    kt.assert_close(grads[0], ref_grads[0], tol, "d values")
    kt.assert_close(grads[1], ref_grads[1], tol, "d weights")


XLA_CASES = [
    # (rows, dim, leading shape, k, dtype, repeat)
    (50, 16, (7,), 1, jnp.float32, False),        # k = 1
    (64, 130, (2, 3), 5, jnp.float32, True),      # repeated rows, two leading dims
    (37, 8, (4,), 11, jnp.float32, True),          # k > UNROLL (4 here): fori over groups + rest
    (300, 64, (9,), 8, jnp.bfloat16, True),        # bfloat16 table and weights
    (1, 4, (3,), 4, jnp.float32, False),           # a one-row table: every index 0
]


@pytest.mark.parametrize("case", XLA_CASES, ids=[f"{c[:4]}-{jnp.dtype(c[4]).name}" for c in XLA_CASES])
def test_xla_matches_float64_reference(case, monkeypatch):
    # Groups of 4 slots (32 by default) so that k = 11 runs the fori over groups and the rest
    # without compiling 32-slot fusions.
    monkeypatch.setattr(mlx, "UNROLL", 4)
    rows, dim, lead, k, dtype, repeat = case
    # A seed fixed per case (hash() of a tuple holding a dtype class changes between processes).
    check("xla", *make_inputs(XLA_CASES.index(case), rows, dim, lead, k, dtype, repeat))


def test_large_table():
    """2^20 rows (beyond any tile): rows near the end of the table are read and written."""
    values, indices, weights, cot = make_inputs(1, 2**20, 4, (16,), 6)
    indices = indices.at[0, 0].set(2**20 - 1)
    check("xla", values, indices, weights, cot)


def test_repeated_index_gradients_add_up():
    values = jnp.arange(12.0).reshape(4, 3)
    indices = jnp.array([[2, 2, 2], [2, 0, 2]])
    weights = jnp.array([[1.0, 2.0, 3.0], [0.5, 1.0, -1.0]])
    cot = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    out = memory_lookup(values, indices, weights, implementation="xla")
    np.testing.assert_allclose(out[0], 6.0 * values[2])
    dv, dw = jax.grad(lambda v, w: jnp.sum(memory_lookup(v, indices, w) * cot),
                      argnums=(0, 1))(values, weights)
    np.testing.assert_allclose(dv[2], 6.0 * cot[0] + (0.5 - 1.0) * cot[1])
    np.testing.assert_allclose(dv[0], cot[1])
    np.testing.assert_allclose(dv[1], 0.0)
    np.testing.assert_allclose(dw[1], [values[2] @ cot[1], values[0] @ cot[1], values[2] @ cot[1]])


# Bags not a multiple of the TPU block, several TPU calls (indices_per_call), dim blocks on GPU.
SMALL_BLOCKS = {"tpu": mlp.BlockSizes(block_b=8, indices_per_call=32, block_d=0),
                "cuda": mlp.BlockSizes(block_b=0, indices_per_call=0, block_d=64)}
PALLAS_CASES = [
    (40, 256, (13,), 3, jnp.float32, True),
    (40, 128, (5,), 1, jnp.float32, False),
    (40, 128, (9,), 4, jnp.bfloat16, True),
    # A 16-bit table with an odd row count: the TPU kernel fetches aligned row pairs.
    (41, 128, (9,), 4, jnp.bfloat16, True),
]


# Pairwise rather than the full product (interpreters are slow): the tricky case (repeated rows,
# several TPU calls and a partial bag block, two GPU dim blocks) in every runner; every other
# case in the GPU kernel, and 16-bit ones in the TPU kernel (TPU interpret mode) too.
PALLAS_RUNS = [(runner, PALLAS_CASES[0]) for runner in kt.PALLAS_RUNNERS] + [
    (runner, case) for case in PALLAS_CASES[1:]
    for runner in ("pallas_gpu_interpret",) + (("pallas_tpu_interpret",)
                                               if jnp.dtype(case[4]).itemsize == 2 else ())]
PALLAS_RUNS += [("pallas_native", case) for case in PALLAS_CASES[1:]
                if "pallas_native" in kt.IMPLEMENTATION_RUNNERS]


@pytest.mark.parametrize("runner,case", PALLAS_RUNS,
                         ids=[f"{c[:4]}-{jnp.dtype(c[4]).name}-{r}" for r, c in PALLAS_RUNS])
def test_pallas_matches_float64_reference(runner, case, monkeypatch):
    ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    monkeypatch.setattr(mlp.BlockSizes, "get_default", classmethod(lambda cls, t: SMALL_BLOCKS[t]))
    # Which kernel each runner traces: the runner's own, every time (not a cached trace).
    traced = []
    for name in ("_tpu_call", "_gpu_call"):
        original = getattr(mlp, name)
        monkeypatch.setattr(mlp, name, functools.partial(_recording, original, name, traced))
    rows, dim, lead, k, dtype, repeat = case
    check(implementation, *make_inputs(5, rows, dim, lead, k, dtype, repeat), ctx=ctx())
    want = {"pallas_gpu_interpret": "_gpu_call", "pallas_tpu_generic_interpret": "_tpu_call",
            "pallas_tpu_interpret": "_tpu_call"}.get(runner)
    assert traced and (want is None or set(traced) == {want}), (runner, traced)


def _recording(fn, name, traced, *args, **kwargs):
    traced.append(name)
    return fn(*args, **kwargs)


def test_each_runner_traces_its_own_kernel():
    """The same inputs through the three interpreters in one process: each builds its own trace
    (the interpret mode is read when tracing), so the TPU kernel does run under the TPU runners
    (the Mosaic kernel's DMA semaphores show in its jaxpr, the GPU kernel has none)."""
    values, indices, weights, cot = make_inputs(5, 40, 128, (5,), 1)
    for runner, kernel_has_dma in [("pallas_gpu_interpret", False),
                                   ("pallas_tpu_generic_interpret", True),
                                   ("pallas_tpu_interpret", True)]:
        ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
        with ctx():
            jaxpr = str(jax.make_jaxpr(jax.jit(functools.partial(
                forward_and_grads, implementation)))(values, indices, weights, cot))
        assert "pallas_call" in jaxpr, runner
        assert ("dma_start" in jaxpr) == kernel_has_dma, runner


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators(platform):
    values, indices, weights, cot = make_inputs(2, 64, 256, (16,), 4)

    def fwd(implementation):
        return functools.partial(memory_lookup, implementation=implementation)

    def grad(implementation):
        # The backward is XLA's scatter-add: the module of value and gradient holds the forward
        # kernel once (with grad alone the forward's output is unused and removed).
        return jax.value_and_grad(
            lambda v, w: jnp.sum(fwd(implementation)(v, indices, w) * cot), argnums=(0, 1))

    kt.assert_auto_lowers(fwd, values, indices, weights, op="memory_lookup", platform=platform,
                          count=1)
    kt.assert_auto_lowers(grad, values, weights, op="memory_lookup", platform=platform, count=1)


def test_vmap_jit_grad_compose():
    values, indices, weights, cot = make_inputs(3, 30, 8, (6,), 4, repeat=True)
    f = functools.partial(memory_lookup, implementation="xla")
    whole = jax.jit(f)(values, indices, weights)
    # a batch of bags == the bags one at a time
    per_bag = jax.vmap(f, in_axes=(None, 0, 0))(values, indices, weights)
    np.testing.assert_allclose(per_bag, whole, rtol=1e-6, atol=1e-6)
    for j in range(6):
        np.testing.assert_allclose(f(values, indices[j], weights[j]), whole[j], rtol=1e-6, atol=1e-6)
    # grad of grad (the backward is itself differentiable) against the reference's
    def second(impl):
        def inner(v, w):
            return jnp.sum(memory_lookup(v, indices, w, implementation=impl) * cot)
        return jax.grad(lambda v, w: jnp.sum(jax.grad(inner, argnums=0)(v, w) ** 2),
                        argnums=(0, 1))
    ref = kt.float64_run(lambda v, w: second("reference")(v, w), values, weights)
    got = jax.jit(second("xla"))(values, weights)
    kt.assert_tree_close(got, ref, F32_TOL, "grad of grad")


def test_out_of_range_indices():
    values = jnp.arange(8.0).reshape(4, 2)
    w = jnp.ones((1, 2))
    with pytest.raises(ValueError, match=r"`indices` must lie in \[0, num_rows\) = \[0, 4\), got 4"):
        memory_lookup(values, jnp.array([[0, 4]]), w)
    with pytest.raises(ValueError, match=r"got -1"):
        memory_lookup(values, jnp.array([[-1, 0]]), w)
    # Under jit the indices are traced: clamped into the table, forward and backward alike.
    f = jax.jit(lambda v, i, w: memory_lookup(v, i, w, implementation="xla"))
    np.testing.assert_allclose(f(values, jnp.array([[-3, 9]]), w), [values[0] + values[3]])
    dv = jax.jit(jax.grad(lambda v, i: jnp.sum(memory_lookup(v, i, w))))(values, jnp.array([[-3, 9]]))
    np.testing.assert_allclose(dv, [[1, 1], [0, 0], [0, 0], [1, 1]])


def test_bad_inputs():
    v = jnp.zeros((4, 2))
    i = jnp.zeros((3, 2), jnp.int32)
    w = jnp.ones((3, 2))
    cases = [
        ((jnp.zeros((4,)), i, w), "`values` must have rank 2"),
        ((jnp.zeros((4, 2), jnp.int32), i, w), "`values` must have a floating"),
        ((jnp.zeros((0, 2)), i, w), "`values` must have at least one row"),
        ((v, i.astype(jnp.float32), w), "`indices` must be an integer array"),
        ((v, jnp.int32(0), jnp.float32(1)), r"`indices` must have shape \[\.\.\., k\]"),
        ((v, i, jnp.ones((3, 3))), "`weights` must have the shape of `indices`"),
        ((v, i, jnp.ones((3, 2), jnp.int32)), "`weights` must have a floating"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            memory_lookup(*args)
    with pytest.raises(ValueError, match="implementation must be one of"):
        memory_lookup(v, i, w, implementation="cuda")


def test_empty_bags():
    out = memory_lookup(jnp.ones((4, 3)), jnp.zeros((2, 0), jnp.int32), jnp.zeros((2, 0)))
    np.testing.assert_array_equal(out, np.zeros((2, 3)))


def test_groups_cover_every_slot():
    for k in [1, 31, 32, 33, 64, 70]:
        loops, per, rest = mlx._groups(k)
        assert (loops * per + rest if loops else per) == k
