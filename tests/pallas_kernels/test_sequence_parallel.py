"""Sequence parallelism (pallas_kernels/sequence_parallel.py): with time split over a "sequence"
mesh axis of the 8 host devices, every state-carrying op equals the unsplit op, forward and every
gradient (including initial_state), with segments that continue across and restart exactly at
shard boundaries; and the sharded path really ran (shard_map with all_gather in the jaxpr)."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import pallas_kernels as pk
from pallas_kernels._testing import assert_close

pytestmark = pytest.mark.kernel

sp = importlib.import_module("pallas_kernels.sequence_parallel")

B, T, H, K, V = 2, 16, 2, 3, 4
TOL = 1e-5
# The attention-like ops run their XLA (chunked) path: sequence parallelism is the same code for
# every implementation, and "auto" would also trace the Pallas branches of platform_dependent
# (a minute of CI for nothing new); linear_scan's tests and the training test keep "auto".
IMPL = "xla"


def _mesh(sequence=4):
    data = 8 // sequence
    return jax.make_mesh((data, sequence), ("data", "sequence"),
                         axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:8])


def _segments(length=T):
    # For 4 shards of length / 4 (in units u = length / 16): row 0: a segment runs through the
    # shard boundaries at 4u and 12u, one restarts inside a shard at 6u, one starts exactly at
    # the boundary 8u; row 1: a restart at the boundary 4u only.
    u = length // 16
    rows = [np.repeat([0, 1, 2], [6 * u, 2 * u, 8 * u]), np.repeat([0, 1], [4 * u, 12 * u])]
    return jnp.asarray(np.stack(rows), jnp.int32)


def _loss_and_grads(fn, args, wrt):
    """Forward outputs and the gradients of a random projection of (out, final) wrt `wrt`."""
    out = fn(*args)
    keys = jax.random.split(jax.random.PRNGKey(7), 2)
    w = [jax.random.normal(kk, x.shape, jnp.float32) for kk, x in zip(keys, out)]

    def loss(*diff):
        full = list(args)
        for i, x in zip(wrt, diff):
            full[i] = x
        o, f = fn(*full)
        return sum(jnp.sum(jnp.real(x) * ww) + jnp.sum(jnp.imag(x) * ww)
                   for x, ww in zip((o, f), w))
    grads = jax.grad(loss, argnums=tuple(range(len(wrt))))(*[args[i] for i in wrt])
    return out, grads


def _check_split_equals_whole(fn, args, wrt, op, sequence=4):
    """fn(*args) under sequence_parallel on the mesh == fn(*args) unsplit, values and grads."""
    ref_out, ref_grads = jax.jit(lambda *a: _loss_and_grads(fn, a, wrt))(*args)
    before = sp.sharded_calls(op)
    with pk.sequence_parallel("sequence"), jax.set_mesh(_mesh(sequence)):
        got_out, got_grads = jax.jit(lambda *a: _loss_and_grads(fn, a, wrt))(*args)
    assert sp.sharded_calls(op) > before, "the sharded path was not taken"
    for name, got, ref in zip(("output", "final_state"), got_out, ref_out):
        assert_close(got, ref, TOL, f"{op} {name}")
    for i, got, ref in zip(wrt, got_grads, ref_grads):
        assert_close(got, ref, TOL, f"{op} grad of argument {i}")


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan(dtype, reverse):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    a = jax.random.uniform(ks[0], (B, T, 3), minval=0.6, maxval=1.0)
    b, h0 = _rand(ks[1], (B, T, 3)), _rand(ks[2], (B, 3))
    if dtype == "complex64":
        a = a * jnp.exp(1j * _rand(ks[3], a.shape))
        b, h0 = b * (1 + 0.5j), h0 * (1 - 0.5j)
    seg = _segments()

    def fn(a, b, h0):
        return pk.linear_scan(a, b, initial_state=h0, segment_ids=seg, reverse=reverse)
    _check_split_equals_whole(fn, (a, b, h0), (0, 1, 2), "linear_scan")


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
def test_chunked_linear_attention(gate):
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    q, k, v = _rand(ks[0], (B, T, H, K)), _rand(ks[1], (B, T, H, K)), _rand(ks[2], (B, T, H, V))
    s0 = _rand(ks[3], (B, H, K, V))
    g = {None: None, "scalar": -0.3 * jnp.abs(_rand(ks[4], (B, T, H))),
         "vector": -0.3 * jnp.abs(_rand(ks[4], (B, T, H, K)))}[gate]
    seg = _segments()

    def fn(q, k, v, s0, g):
        return pk.chunked_linear_attention(q, k, v, log_gate=g, initial_state=s0,
                                           segment_ids=seg, chunk_size=2,
                                           implementation=IMPL)
    wrt = (0, 1, 2, 3) + ((4,) if gate else ())
    _check_split_equals_whole(fn, (q, k, v, s0, g), wrt, "chunked_linear_attention")


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule(gated):
    ks = jax.random.split(jax.random.PRNGKey(2), 6)
    q, v = _rand(ks[0], (B, T, H, K)), _rand(ks[2], (B, T, H, V))
    k = _rand(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.random.uniform(ks[3], (B, T, H))
    s0 = _rand(ks[4], (B, H, K, V))
    g = -0.3 * jnp.abs(_rand(ks[5], (B, T, H))) if gated else None
    seg = _segments()

    def fn(q, k, v, beta, s0, g):
        return pk.delta_rule(q, k, v, beta, log_gate=g, initial_state=s0, segment_ids=seg,
                             chunk_size=2, implementation=IMPL)
    wrt = (0, 1, 2, 3, 4) + ((5,) if gated else ())
    _check_split_equals_whole(fn, (q, k, v, beta, s0, g), wrt, "delta_rule")


def test_dplr_delta_rule():
    ks = jax.random.split(jax.random.PRNGKey(3), 7)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, v = _rand(ks[0], (B, T, H, K)), _rand(ks[2], (B, T, H, V))
    k, kappa = unit(_rand(ks[1], (B, T, H, K))), unit(_rand(ks[3], (B, T, H, K)))
    b = kappa * jax.random.uniform(ks[4], (B, T, H, K))
    s0 = _rand(ks[5], (B, H, K, V))
    w = -0.3 * jnp.abs(_rand(ks[6], (B, T, H, K)))
    seg = _segments()

    def fn(q, k, v, a, b, s0, w):
        return pk.dplr_delta_rule(q, k, v, a, b, log_decay=w, initial_state=s0, segment_ids=seg,
                                  chunk_size=2, implementation=IMPL)
    _check_split_equals_whole(fn, (q, k, v, -kappa, b, s0, w), (0, 1, 2, 3, 4, 5, 6),
                              "dplr_delta_rule")


def test_eight_shards_and_the_collective_in_the_jaxpr():
    """One step per shard pair at sequence=8; the traced program holds the shard_map and its
    all_gather (GSPMD alone would not introduce either)."""
    ks = jax.random.split(jax.random.PRNGKey(3), 2)
    a = jax.random.uniform(ks[0], (B, T, 3), minval=0.6, maxval=1.0)
    b = _rand(ks[1], (B, T, 3))
    seg = _segments()

    def fn(a, b):
        return pk.linear_scan(a, b, segment_ids=seg)
    _check_split_equals_whole(fn, (a, b), (0, 1), "linear_scan", sequence=8)
    with pk.sequence_parallel("sequence"), jax.set_mesh(_mesh(8)):
        text = str(jax.make_jaxpr(fn)(a, b))
    assert "shard_map" in text and "all_gather" in text
    assert "shard_map" not in str(jax.make_jaxpr(fn)(a, b))


def test_inside_a_users_shard_map():
    """The per-shard function, called on local shards inside the caller's own shard_map."""
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    a = jax.random.uniform(ks[0], (B, T, 3), minval=0.6, maxval=1.0)
    b, h0 = _rand(ks[1], (B, T, 3)), _rand(ks[2], (B, 3))
    seg = _segments()
    ts = P(None, "sequence")

    def body(a, b, seg, h0):
        return sp.sequence_parallel_linear_scan(a, b, initial_state=h0, segment_ids=seg,
                                                axis_name="sequence")
    got = jax.jit(jax.shard_map(body, mesh=_mesh(4), in_specs=(ts, ts, ts, P()),
                                out_specs=(ts, P()), axis_names={"sequence"},
                                check_vma=False))(a, b, seg, h0)
    ref = pk.linear_scan(a, b, initial_state=h0, segment_ids=seg)
    for x, r in zip(got, ref):
        assert_close(x, r, TOL, "linear_scan in a user's shard_map")


def test_plain_op_where_the_mesh_does_not_split_time():
    """No mesh, or a mesh whose "sequence" axis has size 1: the op runs as usual."""
    a = jnp.full((1, 8, 2), 0.5)
    b = jnp.ones((1, 8, 2))
    before = sp.sharded_calls("linear_scan")
    one = jax.make_mesh((8, 1), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2)
    with pk.sequence_parallel("sequence"):
        ref = pk.linear_scan(a, b)
        with jax.set_mesh(one):
            got = jax.jit(pk.linear_scan)(a, b)
    assert sp.sharded_calls("linear_scan") == before
    np.testing.assert_array_equal(got[0], ref[0])


def test_errors():
    with pytest.raises(ValueError, match="time axis \\(10\\) must divide into the 4 shards"):
        with pk.sequence_parallel("sequence"), jax.set_mesh(_mesh(4)):
            pk.linear_scan(jnp.ones((2, 10, 3)), jnp.ones((2, 10, 3)))
    # the op's own argument checks still come first
    with pytest.raises(ValueError, match="`a` and `b` must have the same shape"):
        with pk.sequence_parallel("sequence"), jax.set_mesh(_mesh(4)):
            pk.linear_scan(jnp.ones((2, 8, 3)), jnp.ones((2, 8, 2)))
    with pytest.raises(ValueError, match="axis_name"):
        with pk.sequence_parallel(""):
            pass
