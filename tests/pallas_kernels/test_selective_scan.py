"""The kernel contract for `selective_scan` (WORKSPACE.md, "What every op's tests show")."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing as kt
from pallas_kernels import selective_scan
from pallas_kernels.selective_scan import pallas as ssp
from pallas_kernels.selective_scan import xla as ssx

pytestmark = pytest.mark.kernel

F32_TOL = 1e-5
BF16_TOL = 1e-2
GRAD_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dh0")


def make_inputs(key, shape, dtype=jnp.float32, *, grouped=True, segments=True):
    """shape = (batch, time, channels, state, groups). A = -exp(normal) as in Mamba's init range;
    delta around softplus's knee so decays span (0, 1)."""
    batch, length, channels, state, groups = shape
    k = jax.random.split(key, 11)
    bc_shape = (batch, length, groups, state) if grouped else (batch, length, state)
    arrays = dict(
        u=jax.random.normal(k[0], (batch, length, channels)),
        delta=jax.random.normal(k[1], (batch, length, channels)) - 1.0,
        A=-jnp.exp(jax.random.normal(k[2], (channels, state)) * 0.5),
        B=jax.random.normal(k[3], bc_shape),
        C=jax.random.normal(k[4], bc_shape),
        D=jax.random.normal(k[5], (channels,)),
        z=jax.random.normal(k[6], (batch, length, channels)),
        delta_bias=jax.random.normal(k[7], (channels,)) * 0.5,
        initial_state=jax.random.normal(k[8], (batch, channels, state)),
    )
    for name in ("u", "delta", "B", "C", "z"):
        arrays[name] = arrays[name].astype(dtype)
    seg = None
    if segments and length > 1:
        seg = jnp.cumsum(jax.random.bernoulli(k[9], 0.05, (batch, length)), 1).astype(jnp.int32)
    weights = (jax.random.normal(k[10], (batch, length, channels)),
               jax.random.normal(jax.random.fold_in(k[10], 1), (batch, channels, state)))
    return arrays, seg, weights


ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def forward_and_grads(implementation, arrays, seg, weights):
    def run(*xs):
        kw = dict(zip(ORDER, xs))
        return selective_scan(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"),
                              delta_softplus=True, segment_ids=seg,
                              implementation=implementation, **kw)

    # One forward for the outputs and the gradients of sum(y * w_y) + sum(h * w_h).
    (y, h), vjp = jax.vjp(run, *(arrays[n] for n in ORDER))
    return (y, h), vjp((weights[0].astype(y.dtype), weights[1].astype(h.dtype)))


def check(implementation, shape, dtype=jnp.float32, seed=0, ctx=None, **kw):
    arrays, seg, weights = make_inputs(jax.random.PRNGKey(seed), shape, dtype, **kw)
    ref_out, ref_grads = kt.float64_run(jax.jit(functools.partial(forward_and_grads, "reference")),
                                        arrays, seg, weights)
    with ctx or kt.IMPLEMENTATION_RUNNERS["xla"][0]():
        # jitted inside the runner's context (the interpret mode is read when tracing)
        (y, h), grads = jax.jit(functools.partial(forward_and_grads, implementation))(
            arrays, seg, weights)
    tol = BF16_TOL if dtype == jnp.bfloat16 else F32_TOL
    assert y.dtype == dtype and h.dtype == jnp.float32
    kt.assert_close(y, ref_out[0], tol, "y")
    kt.assert_close(h, ref_out[1], tol, "final_state")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        kt.assert_close(g, r, tol, name)


XLA_CASES = [
    ((2, 1, 8, 4, 1), jnp.float32),      # T = 1
    ((2, 37, 12, 4, 3), jnp.float32),    # grouped B/C, T inside one segment
    ((2, 70, 8, 20, 1), jnp.bfloat16),   # N > 16: longer segments; T not a multiple of them
]


@pytest.mark.parametrize("shape,dtype", XLA_CASES,
                         ids=[f"{s}-{jnp.dtype(d).name}" for s, d in XLA_CASES])
def test_xla_matches_float64_reference(shape, dtype):
    check("xla", shape, dtype, seed=sum(shape))


def test_xla_long_sequence():
    """T = 2000 (31 segments), small C and N: the segment walk of the backward end to end."""
    check("xla", (1, 2000, 4, 3, 1), seed=3)


def test_ungrouped_and_without_options():
    arrays, _, _ = make_inputs(jax.random.PRNGKey(5), (2, 20, 6, 3, 1), grouped=False)
    u, delta, A, B, C = (arrays[n] for n in ORDER[:5])
    delta = jnp.abs(delta)

    def both(impl):
        return jax.value_and_grad(lambda *x: jnp.sum(selective_scan(*x, implementation=impl)[0] ** 2),
                                  argnums=(0, 1, 2, 3, 4))(u, delta, A, B, C)

    kt.assert_tree_close(both("xla"), kt.float64_run(both, "reference"), F32_TOL, "plain")


SMALL_BLOCKS = {"tpu": ssp.BlockSizes(block_t=128, block_c=128),
                "cuda": ssp.BlockSizes(block_t=0, block_c=16)}
# (batch, time, channels, state, groups): the TPU kernel needs 128 channels per group.
PALLAS_CASES = [(1, 70, 256, 3, 2)]  # two time blocks on TPU, 16 channel blocks on GPU


@pytest.mark.parametrize("runner", kt.PALLAS_RUNNERS)
@pytest.mark.parametrize("shape", PALLAS_CASES, ids=str)
def test_pallas_matches_float64_reference(runner, shape, monkeypatch):
    ctx, implementation = kt.IMPLEMENTATION_RUNNERS[runner]
    monkeypatch.setattr(ssp.BlockSizes, "get_default", classmethod(lambda cls, t: SMALL_BLOCKS[t]))
    check(implementation, shape, seed=7, ctx=ctx())


def test_pallas_tpu_falls_back_for_narrow_groups():
    """Groups of fewer than 128 channels cannot be tiled on TPU: implementation="pallas" then
    runs the XLA forward (no kernel in the trace) and is still right (forward and gradients
    against the float64 reference); the GPU kernel tiles the same groups (a kernel is traced)."""
    assert not ssp.supported("tpu", 16, 2)
    assert ssp.supported("cuda", 16, 2)
    shape = (1, 9, 16, 3, 2)
    arrays, seg, weights = make_inputs(jax.random.PRNGKey(2), shape)
    for runner, kernel in [("pallas_tpu_interpret", False), ("pallas_gpu_interpret", True)]:
        with kt.IMPLEMENTATION_RUNNERS[runner][0]():
            fn = jax.jit(functools.partial(forward_and_grads, "pallas"))   # traced in the context
            assert ("pallas_call" in str(jax.make_jaxpr(fn)(arrays, seg, weights))) == kernel, runner
    check("pallas", shape, seed=2, ctx=kt.IMPLEMENTATION_RUNNERS["pallas_tpu_interpret"][0]())


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_step_by_step_and_split_carry_equal_whole(implementation):
    arrays, _, _ = make_inputs(jax.random.PRNGKey(11), (2, 12, 16, 4, 2))
    ctx = kt.IMPLEMENTATION_RUNNERS["pallas_gpu_interpret" if implementation == "pallas"
                                    else "xla"][0]
    kw = {n: arrays[n] for n in ("D", "delta_bias")}
    seq = {n: arrays[n] for n in ("u", "delta", "B", "C", "z")}

    def call(sl, h):
        part = {n: x[:, sl] for n, x in seq.items()}
        return selective_scan(part["u"], part["delta"], arrays["A"], part["B"], part["C"],
                              z=part["z"], delta_softplus=True, initial_state=h,
                              implementation=implementation, **kw)

    with ctx():
        whole, final = call(slice(None), arrays["initial_state"])
        h, steps = arrays["initial_state"], []
        for t in range(12):
            y, h = call(slice(t, t + 1), h)
            steps.append(y)
        y1, carry = call(slice(0, 5), arrays["initial_state"])
        y2, final_split = call(slice(5, None), carry)
    kt.assert_close(jnp.concatenate(steps, 1), whole, 1e-6, "step-by-step")
    kt.assert_close(h, final, 1e-6, "step-by-step final state")
    kt.assert_close(jnp.concatenate([y1, y2], 1), whole, 1e-6, "split-and-carry")
    kt.assert_close(final_split, final, 1e-6, "split-and-carry final state")


def test_packed_segments_equal_separate_documents():
    arrays, _, _ = make_inputs(jax.random.PRNGKey(4), (1, 30, 8, 4, 1))
    seg = jnp.array([[0] * 7 + [1] * 15 + [2] * 8], jnp.int32)
    args = lambda sl: (arrays["u"][:, sl], arrays["delta"][:, sl], arrays["A"],
                       arrays["B"][:, sl], arrays["C"][:, sl])
    kw = dict(D=arrays["D"], delta_softplus=True)
    packed, last = selective_scan(*args(slice(None)), segment_ids=seg, implementation="xla", **kw)
    parts = [selective_scan(*args(slice(s, e)), implementation="xla", **kw)
             for s, e in [(0, 7), (7, 22), (22, 30)]]
    kt.assert_close(packed, jnp.concatenate([p[0] for p in parts], 1), 1e-6, "packed vs separate")
    kt.assert_close(last, parts[-1][1], 1e-6, "last segment's state")


def _temp_bytes(length, channels, state):
    u = jax.ShapeDtypeStruct((1, length, channels), jnp.float32)
    bc = jax.ShapeDtypeStruct((1, length, state), jnp.float32)
    a = jax.ShapeDtypeStruct((channels, state), jnp.float32)

    def f(u, delta, A, B, C):
        return jax.grad(lambda *x: jnp.sum(selective_scan(*x, delta_softplus=True,
                                                          implementation="xla")[0]),
                        argnums=(0, 1, 2, 3, 4))(u, delta, A, B, C)

    return jax.jit(f).lower(u, u, a, bc, bc).compile().memory_analysis().temp_size_in_bytes


def test_backward_memory_grows_with_length_times_channels_not_state():
    """Forward + backward at L = 65536, C = 64: XLA's temp memory with N = 64 exceeds N = 4 only
    by the [B, L, N] arrays (B, C and their gradients, which are that size anyway) and
    per-segment terms (checkpoints every >= 4N steps, one segment's recompute buffer), far below
    what keeping every step's [C, N] state would take."""
    length, channels = 65536, 64
    small, large = _temp_bytes(length, channels, 4), _temp_bytes(length, channels, 64)
    seg = ssx.segment_length(64)
    per_segment = 4 * channels * 64 * (length // seg + 2 * seg)
    length_by_state = 4 * length * 64
    assert large - small <= 3 * length_by_state + per_segment, (small, large)
    assert large < 4 * length * channels * 64 / 8, large  # every step's state: 1 GiB


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators(platform):
    """"auto" picks the Pallas forward when lowering for an accelerator. The backward is the XLA
    pass on every platform (no Pallas backward kernel), so grad adds no second custom call."""
    arrays, seg, _ = make_inputs(jax.random.PRNGKey(0), (2, 300, 256, 16, 1), jnp.bfloat16,
                                 grouped=False)
    xs = tuple(arrays[n] for n in ORDER[:5])

    def fwd(*xs):
        return selective_scan(*xs, D=arrays["D"], z=arrays["z"], delta_softplus=True,
                              segment_ids=seg)

    def fwd_bwd(*xs):
        return jax.grad(lambda *x: jnp.sum(fwd(*x)[0].astype(jnp.float32) ** 2),
                        argnums=(0, 1, 2, 3, 4))(*xs)

    kt.assert_lowers_to(fwd, *xs, platform=platform, count=1)
    kt.assert_lowers_to(fwd_bwd, *xs, platform=platform, count=1)


def test_auto_on_cpu_uses_no_custom_call():
    arrays, _, _ = make_inputs(jax.random.PRNGKey(0), (1, 16, 8, 4, 1))
    text = kt.lower_for(lambda *x: selective_scan(*x), *(arrays[n] for n in ORDER[:5]),
                        platform="cpu")
    assert not kt.custom_calls(text)


def test_vmap_jit_grad_compose():
    arrays, _, _ = make_inputs(jax.random.PRNGKey(6), (2, 10, 8, 3, 1))
    u, delta, A, B, C = (arrays[n] for n in ORDER[:5])
    stacked = (jnp.stack([u, -u]), jnp.stack([delta, delta * 0.5]))
    f = lambda u, d: selective_scan(u, d, A, B, C, delta_softplus=True)[0]
    got = jax.jit(jax.vmap(f))(*stacked)
    for i in range(2):
        kt.assert_close(got[i], f(stacked[0][i], stacked[1][i]), 1e-6, f"vmap[{i}]")
    g = jax.jit(jax.vmap(jax.grad(lambda u, d: jnp.sum(f(u, d) ** 2), argnums=(0, 1))))(*stacked)
    g_ref = jax.grad(lambda u, d: jnp.sum(selective_scan(
        u, d, A, B, C, delta_softplus=True, implementation="reference")[0] ** 2), argnums=(0, 1))(
        stacked[0][1], stacked[1][1])
    kt.assert_tree_close((g[0][1], g[1][1]), g_ref, 1e-5, "vmap(grad)")


def _ok(**over):
    base = dict(u=np.ones((2, 5, 4), np.float32), delta=np.ones((2, 5, 4), np.float32),
                A=-np.ones((4, 3), np.float32), B=np.ones((2, 5, 3), np.float32),
                C=np.ones((2, 5, 3), np.float32))
    base.update(over)
    return base


@pytest.mark.parametrize("kwargs,message", [
    (_ok(u=np.ones((2, 5), np.float32)), "`u` must have rank 3"),
    (_ok(u=np.ones((2, 5, 4), np.int32)), "`u` must have a floating"),
    (_ok(delta=np.ones((2, 6, 4), np.float32)), "`delta` must have shape"),
    (_ok(A=-np.ones((5, 3), np.float32)), "`A` must have shape"),
    (_ok(B=np.ones((2, 5, 4), np.float32)), "`B` must have shape"),
    (_ok(C=np.ones((2, 5, 3, 3), np.float32)), "`C` must have shape"),
    (_ok(B=np.ones((2, 5, 2, 3), np.float32), C=np.ones((2, 5, 4, 3), np.float32)),
     "same number of groups"),
    (_ok(D=np.ones((5,), np.float32)), "`D` must have shape"),
    (_ok(z=np.ones((2, 5, 3), np.float32)), "`z` must have shape"),
    (_ok(delta_bias=np.ones((4, 1), np.float32)), "`delta_bias` must have rank 1"),
    (_ok(initial_state=np.ones((2, 4), np.float32)), "`initial_state` must have rank 3"),
    (_ok(segment_ids=np.ones((2, 5), np.float32)), "`segment_ids` must be an integer"),
    (_ok(delta_softplus=1), "`delta_softplus` must be a bool"),
    (_ok(implementation="cuda"), "implementation must be one of"),
])
def test_bad_input_raises_clear_value_error(kwargs, message):
    arrays = {n: kwargs.pop(n) for n in ("u", "delta", "A", "B", "C")}
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda u, delta, A, B, C: selective_scan(u, delta, A, B, C, **kwargs))(**arrays)
