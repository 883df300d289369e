"""Every op's Pallas path runs per shard under a mesh (pallas_kernels/_dispatch.py: partitioned).

Interpret mode on the session's 8 host CPU devices: sharded inputs (NamedSharding, plain jit, no
context mesh) give what the unsharded op gives, forward and every gradient, and the compiled
module shows the kernel ran on the per-shard shapes with no all-gather of its inputs.
"""
import contextlib
import functools
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels import (causal_conv1d, chunked_linear_attention, delta_rule, dplr_delta_rule,
                            linear_scan, memory_lookup, selective_scan)
from pallas_kernels import _testing as kt
from pallas_kernels._dispatch import pallas_interpret

pytestmark = pytest.mark.kernel

F32_TOL = 1e-5


def _mesh(shape, names):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


# name -> (mesh shape, axis names, mesh axes of the batch dim, mesh axis of the tensor dim)
MESHES = {
    "data8": ((8,), ("data",), "data", None),
    "data4": ((4, 2), ("data", "model"), "data", None),
    "fsdp": ((2, 4), ("replica", "fsdp"), ("replica", "fsdp"), None),
    "tensor": ((4, 2), ("data", "model"), "data", "model"),
}


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


# Each op: inputs(key) -> {name: (array, dims)} with dims one letter per axis: "b" the batch
# axis, "m" the axis the tensor-parallel meshes split (heads, channels, value columns, table
# columns), "." whole; and call(**arrays) -> every output, final state included.
def _attention_inputs(key, heads_split, t=16):
    b, h, k, v = 8, 2, 8, 32
    ks = jax.random.split(key, 5)
    qkv = "b.m." if heads_split else "b..."
    vd = "b.m." if heads_split else "b..m"
    return {"q": (_normal(ks[0], (b, t, h, k), 0.5), qkv),
            "k": (_normal(ks[1], (b, t, h, k), 0.5), qkv),
            "v": (_normal(ks[2], (b, t, h, v)), vd),
            "log_gate": (-jax.nn.softplus(_normal(ks[3], (b, t, h))), "b.m" if heads_split else "b.."),
            "initial_state": (_normal(ks[4], (b, h, k, v), 0.1),
                              "bm.." if heads_split else "b..m")}


def _delta_inputs(key, heads_split):
    x = _attention_inputs(key, heads_split, t=32)
    beta = jax.nn.sigmoid(_normal(jax.random.fold_in(key, 9), x["log_gate"][0].shape))
    kn = x["k"][0] / jnp.linalg.norm(x["k"][0], axis=-1, keepdims=True)
    return x | {"k": (kn, x["k"][1]), "beta": (beta, x["log_gate"][1])}


def _dplr_inputs(key, heads_split):
    x = _attention_inputs(key, heads_split, t=32)
    qkv = x["k"][1]
    unit = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    kappa = unit(_normal(jax.random.fold_in(key, 8), x["k"][0].shape))
    eta = jax.nn.sigmoid(_normal(jax.random.fold_in(key, 9), x["k"][0].shape))
    decay = -jax.nn.softplus(_normal(jax.random.fold_in(key, 10), x["k"][0].shape))
    x = {n: x[n] for n in ("q", "v", "initial_state")}
    return x | {"k": (unit(_normal(jax.random.fold_in(key, 7), kappa.shape)), qkv),
                "a": (-kappa, qkv), "b": (kappa * eta, qkv), "log_decay": (decay, qkv)}


def _scan_inputs(key):
    a = jax.nn.sigmoid(_normal(key, (8, 16, 16)))
    return {"a": (a, "b.m"), "b": (_normal(jax.random.fold_in(key, 1), (8, 16, 16)), "b.m"),
            "initial_state": (_normal(jax.random.fold_in(key, 2), (8, 16)), "bm")}


def _selective_inputs(key):
    b, t, c, n, g = 8, 16, 16, 4, 2
    ks = jax.random.split(key, 7)
    return {"u": (_normal(ks[0], (b, t, c)), "b.m"), "delta": (_normal(ks[1], (b, t, c)), "b.m"),
            "A": (-jnp.exp(_normal(ks[2], (c, n), 0.5)), "m."),
            "B": (_normal(ks[3], (b, t, g, n)), "b.m."), "C": (_normal(ks[4], (b, t, g, n)), "b.m."),
            "initial_state": (_normal(ks[5], (b, c, n), 0.1), "bm.")}


def _conv_inputs(key):
    ks = jax.random.split(key, 4)
    return {"x": (_normal(ks[0], (8, 16, 16)), "b.m"), "weight": (_normal(ks[1], (4, 16), 0.5), ".m"),
            "bias": (_normal(ks[2], (16,)), "m"),
            "initial_state": (_normal(ks[3], (8, 3, 16)), "b.m")}


def _lookup_inputs(key):
    ks = jax.random.split(key, 3)
    return {"values": (_normal(ks[0], (32, 16)), ".m"),
            "indices": (jax.random.randint(ks[1], (8, 3, 4), 0, 32), "b.."),
            "weights": (_normal(ks[2], (8, 3, 4)), "b..")}


def _attention_call(impl):
    return lambda **x: chunked_linear_attention(**x, chunk_size=8, implementation=impl)


def _delta_call(impl):
    # chunks of 16: the GPU kernel's minimum
    return lambda **x: delta_rule(**x, chunk_size=16, implementation=impl)


def _dplr_call(impl):
    return lambda **x: dplr_delta_rule(**x, chunk_size=16, implementation=impl)


OPS = {
    "dplr_delta_rule-heads": (lambda k: _dplr_inputs(k, True), _dplr_call),
    "dplr_delta_rule-values": (lambda k: _dplr_inputs(k, False), _dplr_call),
    "chunked_linear_attention-heads": (lambda k: _attention_inputs(k, True), _attention_call),
    "chunked_linear_attention-values": (lambda k: _attention_inputs(k, False), _attention_call),
    "delta_rule-heads": (lambda k: _delta_inputs(k, True), _delta_call),
    "delta_rule-values": (lambda k: _delta_inputs(k, False), _delta_call),
    "linear_scan": (_scan_inputs, lambda impl: lambda **x: linear_scan(**x, implementation=impl)),
    "selective_scan": (_selective_inputs, lambda impl: lambda **x: selective_scan(
        **x, delta_softplus=True, implementation=impl)),
    "causal_conv1d": (_conv_inputs, lambda impl: lambda **x: causal_conv1d(
        **x, activation="silu", implementation=impl)),
    "memory_lookup": (_lookup_inputs, lambda impl: lambda **x: memory_lookup(
        **x, implementation=impl)),
}

# Pairwise rather than the full product: every op under every mesh kind, each interpreter target
# under each mesh kind.
CASES = [
    ("chunked_linear_attention-heads", "tensor", "tpu"),
    ("chunked_linear_attention-values", "tensor", "cuda"),
    ("chunked_linear_attention-heads", "data8", "cuda"),
    ("chunked_linear_attention-heads", "fsdp", "tpu"),
    ("delta_rule-heads", "tensor", "cuda"),
    ("delta_rule-values", "tensor", "tpu"),
    ("delta_rule-heads", "data4", "tpu"),
    ("delta_rule-heads", "fsdp", "cuda"),
    ("linear_scan", "tensor", "tpu"),
    ("linear_scan", "data8", "cuda"),
    ("linear_scan", "fsdp", "tpu"),
    ("selective_scan", "tensor", "cuda"),
    ("selective_scan", "data4", "tpu"),
    ("selective_scan", "fsdp", "cuda"),
    ("causal_conv1d", "tensor", "tpu"),
    ("causal_conv1d", "data8", "cuda"),
    ("causal_conv1d", "fsdp", "tpu"),
    ("memory_lookup", "tensor", "cuda"),
    ("memory_lookup", "data4", "tpu"),
    ("memory_lookup", "fsdp", "cuda"),
]


def _spec(dims, batch_axes, tensor_axis):
    return P(*[batch_axes if d == "b" else tensor_axis if d == "m" else None for d in dims])


def _shape_text(dtype, shape):
    return f"{dtype}[{','.join(map(str, shape))}]"


def _loss_fn(call, names, float_names):
    def loss(floats, others):
        x = dict(zip(float_names, floats)) | others
        outs = jax.tree.leaves(call(**{n: x[n] for n in names}))
        return sum(0.5 * jnp.sum(o.astype(jnp.float32) ** 2) for o in outs)
    return loss


@pytest.mark.parametrize("op,mesh_name,target", CASES, ids=["-".join(c) for c in CASES])
def test_sharded_call_runs_per_shard(op, mesh_name, target):
    make_inputs, make_call = OPS[op]
    shape, axis_names, batch_axes, tensor_axis = MESHES[mesh_name]
    mesh = _mesh(shape, axis_names)
    inputs = make_inputs(jax.random.PRNGKey(len(op)))
    names = list(inputs)
    float_names = [n for n in names if jnp.issubdtype(inputs[n][0].dtype, jnp.floating)]
    shardings = {n: NamedSharding(mesh, _spec(d, batch_axes, tensor_axis))
                 for n, (_, d) in inputs.items()}
    arrays = {n: x for n, (x, _) in inputs.items()}
    placed = {n: jax.device_put(x, shardings[n]) for n, x in arrays.items()}

    with pallas_interpret("generic", target=target):
        loss = _loss_fn(make_call("pallas"), names, float_names)
        step = jax.jit(jax.value_and_grad(loss))
        floats = [placed[n] for n in float_names]
        others = {n: placed[n] for n in names if n not in float_names}
        text = step.lower(floats, others).compile().as_text()
        got = step(floats, others)
        want = jax.jit(jax.value_and_grad(loss))([arrays[n] for n in float_names],
                                                  {n: arrays[n] for n in others})

    kt.assert_close(got[0], want[0], F32_TOL, f"{op} loss")
    kt.assert_tree_close(got[1], want[1], F32_TOL, f"{op} gradients")
    # Per shard: no all-gather anywhere (the inputs stay split), and the module holds the
    # per-shard shape of every sharded input and never its global shape.
    assert not re.search(r"all-gather|all-to-all|collective-permute", text), \
        sorted(set(re.findall(r"(all-gather|all-to-all|collective-permute)\S*", text)))
    for n in float_names:
        sharding, x = shardings[n], arrays[n]
        local = sharding.shard_shape(x.shape)
        if local == x.shape:
            continue
        dtype = "f32"
        assert _shape_text(dtype, local) in text, f"{n}: no per-shard {local} in the module"
        assert _shape_text(dtype, x.shape) not in text, f"{n}: global {x.shape} in the module"


@pytest.mark.parametrize("op,mesh_name,target", [("dplr_delta_rule-heads", "tensor", "tpu"),
                                                 ("dplr_delta_rule-values", "tensor", "cuda")])
def test_dplr_delta_rule_forward_kernel_runs_per_shard(op, mesh_name, target):
    """dplr_delta_rule's forward kernel is partitioned like the others (no gather of its
    inputs); its backward is the XLA pass, partitioned by GSPMD (which may gather), so the
    gradients are checked for values only."""
    make_inputs, make_call = OPS[op]
    shape, axis_names, batch_axes, tensor_axis = MESHES[mesh_name]
    mesh = _mesh(shape, axis_names)
    inputs = make_inputs(jax.random.PRNGKey(len(op)))
    names = list(inputs)
    arrays = {n: x for n, (x, _) in inputs.items()}
    placed = {n: jax.device_put(x, NamedSharding(mesh, _spec(d, batch_axes, tensor_axis)))
              for n, (x, d) in inputs.items()}
    loss = _loss_fn(make_call("pallas"), names, names)
    with pallas_interpret("generic", target=target):
        fwd = jax.jit(lambda x: loss(x, {}))
        text = fwd.lower([placed[n] for n in names]).compile().as_text()
        got = jax.jit(jax.value_and_grad(loss))([placed[n] for n in names], {})
    want = jax.jit(jax.value_and_grad(_loss_fn(make_call("reference"), names, names)))(
        [arrays[n] for n in names], {})
    assert not re.search(r"all-gather|all-to-all|collective-permute", text)
    kt.assert_close(got[0], want[0], F32_TOL, f"{op} loss")
    kt.assert_tree_close(got[1], want[1], F32_TOL, f"{op} gradients")


def test_whole_dim_sharded_is_gathered_with_a_warning():
    """Time split over a mesh axis (sequence_parallel's job, not the partitioner's): the kernel
    still gets whole sequences, the result is right and a warning names op, argument and dim."""
    mesh = _mesh((2, 4), ("data", "seq"))
    inputs = _scan_inputs(jax.random.PRNGKey(3))
    a, b, h0 = (x for x, _ in inputs.values())
    seq = NamedSharding(mesh, P("data", "seq", None))
    with pallas_interpret("generic", target="cuda"):
        f = jax.jit(lambda a, b, h0: linear_scan(a, b, initial_state=h0, implementation="pallas"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = f(jax.device_put(a, seq), jax.device_put(b, seq), h0)
    messages = [str(w.message) for w in caught]
    assert any("linear_scan" in m and "`a`" in m and "'t'" in m and "gathered" in m
               for m in messages), messages
    want = linear_scan(a, b, initial_state=h0, implementation="reference")
    kt.assert_tree_close(got, want, F32_TOL, "time-sharded linear_scan")


def test_vmap_of_sharded_call_stays_per_shard():
    """vmap adds a free leading axis: the vmapped kernel is partitioned along it too."""
    mesh = _mesh((8,), ("data",))
    inputs = _scan_inputs(jax.random.PRNGKey(4))
    a, b, _ = (x for x, _ in inputs.values())
    a, b = a.reshape(8, 1, 16, 16), b.reshape(8, 1, 16, 16)
    s = NamedSharding(mesh, P("data"))
    with pallas_interpret("generic", target="cuda"):
        f = jax.jit(jax.vmap(lambda a, b: linear_scan(a, b, implementation="pallas")))
        text = f.lower(jax.device_put(a, s), jax.device_put(b, s)).compile().as_text()
        got = f(jax.device_put(a, s), jax.device_put(b, s))
    assert not re.search(r"all-gather|all-to-all", text)
    want = jax.vmap(lambda a, b: linear_scan(a, b, implementation="reference"))(a, b)
    kt.assert_tree_close(got, want, F32_TOL, "vmap")


@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_context_mesh_and_shard_map(target):
    """Under `jax.set_mesh`: the GPU kernels are partitioned as without it (channels split
    here); the TPU ones run in a shard_map over the context mesh, the batch split over the axes
    it divides (Auto axes: the inputs' shardings are unknown while tracing). Inside a shard_map
    the plain call."""
    mesh = _mesh((4, 2), ("data", "model"))
    inputs = _conv_inputs(jax.random.PRNGKey(5))
    x, w, bias, h0 = (v for v, _ in inputs.values())
    call = lambda x, w: causal_conv1d(x, w, implementation="pallas")
    want = causal_conv1d(x, w, implementation="reference")
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    split = P("data", None, "model") if target == "cuda" else P(("data", "model"))
    with pallas_interpret("generic", target=target), set_mesh(mesh):
        xs = jax.device_put(x, split)
        f = jax.jit(call)
        text = f.lower(xs, w).compile().as_text()
        kt.assert_tree_close(f(xs, w), want, F32_TOL, "set_mesh")
        # check_vma=False: Pallas calls carry no varying-axes types (as in sequence_parallel)
        sm = jax.jit(jax.shard_map(call, mesh=mesh, in_specs=(P("data", None, "model"),
                                                              P(None, "model")),
                                   out_specs=(P("data", None, "model"), P("data", None, "model")),
                                   check_vma=False))
        xs = jax.device_put(x, P("data", None, "model"))
        kt.assert_tree_close(sm(xs, w), want, F32_TOL, "shard_map")
    assert not re.search(r"all-gather|all-to-all", text)


# Deviceless compiles for real chips (pallas_kernels/_aot.py): the kernels, not an interpreter,
# under a batch-sharded call, forward and backward. Skipped where the compiler plugin is missing.
def _aot_inputs(dtype):
    # head dim 64 in float32 on GPU: delta_rule's Triton kernel at 128 asks more shared memory
    # than an H100 has (its own limit, not the partitioning's)
    b, t, h, d, c = 4, 256, 2, 128 if dtype == jnp.bfloat16 else 64, 256
    x4 = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

    def kernel(op, **options):  # the kernels: "auto" runs some ops on XLA on a GPU
        return lambda **x: op(**x, **options, implementation="pallas")

    attention = dict(q=x4(b, t, h, d), k=x4(b, t, h, d), v=x4(b, t, h, d), log_gate=f32(b, t, h))
    return {
        "chunked_linear_attention": (attention, kernel(chunked_linear_attention)),
        "delta_rule": (attention | {"beta": f32(b, t, h)}, kernel(delta_rule)),
        "linear_scan": (dict(a=x4(b, t, c), b=x4(b, t, c)), kernel(linear_scan)),
        "selective_scan": (dict(u=x4(b, t, c), delta=x4(b, t, c), A=f32(c, 16),
                                B=x4(b, t, 1, 16), C=x4(b, t, 1, 16)),
                           kernel(selective_scan, delta_softplus=True)),
        "causal_conv1d": (dict(x=x4(b, t, c), weight=x4(4, c)),
                          kernel(causal_conv1d, activation="silu")),
        "memory_lookup": (dict(values=f32(1024, c), weights=f32(b, 16, 4),
                               indices=jax.ShapeDtypeStruct((b, 16, 4), jnp.int32)),
                          kernel(memory_lookup)),
    }


AOT_OPS = ["chunked_linear_attention", "delta_rule", "linear_scan", "selective_scan",
           "causal_conv1d", "memory_lookup"]


@pytest.mark.parametrize("spec", ["v5e:2x2", "h100x2"])
@pytest.mark.parametrize("op", AOT_OPS)
def test_compiles_per_shard_for_accelerators(op, spec):
    from pallas_kernels import _aot
    if not _aot.available(spec):
        pytest.skip(f"no compiler plugin for {spec} here")
    if _aot.platform(spec) == "cuda" and os.environ.get("JAX_PLATFORMS") != "cpu":
        # custom_partitioning's CUDA partitioner callback is registered only when the CUDA
        # plugin comes up as a compile-only backend beside the CPU one (JAX_PLATFORMS=cpu, as
        # .ci/run and `python -m benchmarks compile` set); otherwise XLA reports "No registered
        # implementation for custom call to CustomSPMDPartitioning for platform CUDA".
        pytest.skip("GPU deviceless compiles of partitioned kernels need JAX_PLATFORMS=cpu")
    devices = _aot.devices(spec)
    mesh = Mesh(np.array(devices), ("data",))
    inputs, call = _aot_inputs(jnp.bfloat16 if spec.startswith("v5e") else jnp.float32)[op]
    names = list(inputs)
    float_names = [n for n in names if jnp.issubdtype(inputs[n].dtype, jnp.floating)]
    placed = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, P("data") if n not in ("A", "weight", "values") else P()))
        for n, x in inputs.items()}
    loss = _loss_fn(call, names, float_names)
    compiled, _ = _aot.compile(jax.value_and_grad(loss), [placed[n] for n in float_names],
                               {n: placed[n] for n in names if n not in float_names}, mesh=mesh)
    rep = _aot.report(compiled)
    assert rep["kernels"], f"{op}: no Pallas kernel in the {spec} module"
    gathers = [c for c in rep["collectives"] if c["op"] in ("all-gather", "all-to-all")]
    assert not gathers, f"{op} on {spec}: {gathers}"


# The ops whose free dims include heads or channels, with the argument dims they split along.
HEAD_OR_CHANNEL_SPLIT = {
    "chunked_linear_attention": {"q": 2, "k": 2, "v": 2, "log_gate": 2},
    "delta_rule": {"q": 2, "k": 2, "v": 2, "log_gate": 2, "beta": 2},
    "linear_scan": {"a": 2, "b": 2},
    "selective_scan": {"u": 2, "delta": 2, "A": 0},
    "causal_conv1d": {"x": 2, "weight": 1},
}


def _tensor_parallel_spec(split, name, x):
    """Rows over "data" and the op's head / channel dim over "tensor" (weights: that dim only)."""
    dims = [None] * x.ndim
    if name not in ("A", "weight"):
        dims[0] = "data"
    if name in split:
        dims[split[name]] = "tensor"
    return P(*dims)


@pytest.mark.parametrize("hinted", [True, False], ids=["kernel_axes", "no_hint"])
@pytest.mark.parametrize("op", sorted(HEAD_OR_CHANNEL_SPLIT))
def test_tpu_kernels_follow_a_tensor_parallel_layout(op, hinted):
    """Data x tensor parallel on a v5e:2x2 under Auto axes (the training mesh's kind): rows over
    "data", heads / channels over "tensor". With kernel_axes saying so, each chip's kernel runs
    on its own block and the module holds no all-gather or all-to-all; without it the TPU
    shard_map splits rows only, and the head / channel split is undone around the kernel."""
    from pallas_kernels import _aot, kernel_axes
    if not _aot.available("v5e:2x2"):
        pytest.skip("no compiler plugin for v5e here")
    mesh = Mesh(np.array(_aot.devices("v5e:2x2")).reshape(2, 2), ("data", "tensor"))
    inputs, call = _aot_inputs(jnp.bfloat16)[op]
    spec = functools.partial(_tensor_parallel_spec, HEAD_OR_CHANNEL_SPLIT[op])
    names = list(inputs)
    float_names = [n for n in names if jnp.issubdtype(inputs[n].dtype, jnp.floating)]
    placed = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(n, x)))
              for n, x in inputs.items()}
    loss = _loss_fn(call, names, float_names)
    hint = (kernel_axes(batch="data", heads="tensor", channels="tensor") if hinted
            else contextlib.nullcontext())
    with hint:
        compiled, _ = _aot.compile(jax.value_and_grad(loss), [placed[n] for n in float_names],
                                   {n: placed[n] for n in names if n not in float_names},
                                   mesh=mesh)
    rep = _aot.report(compiled)
    assert rep["kernels"], f"{op}: no Pallas kernel in the module"
    moved = [c["op"] for c in rep["collectives"] if c["op"] in ("all-gather", "all-to-all")]
    if hinted:
        assert not moved, f"{op}: {moved}"
    else:
        assert moved, f"{op}: expected the head / channel split undone without kernel_axes"


@pytest.mark.parametrize("op", sorted(HEAD_OR_CHANNEL_SPLIT))
def test_gpu_kernels_follow_a_tensor_parallel_layout(op):
    """The same layout on 4 H100s (data x tensor): the Triton kernels' partitioner reads the
    operands' shardings at compile time, so no hint is needed and nothing is gathered."""
    from pallas_kernels import _aot
    if not _aot.available("h100x4"):
        pytest.skip("no compiler plugin for h100 here")
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        pytest.skip("GPU deviceless compiles of partitioned kernels need JAX_PLATFORMS=cpu")
    mesh = Mesh(np.array(_aot.devices("h100x4")).reshape(2, 2), ("data", "tensor"))
    inputs, call = _aot_inputs(jnp.float32)[op]
    spec = functools.partial(_tensor_parallel_spec, HEAD_OR_CHANNEL_SPLIT[op])
    names = list(inputs)
    float_names = [n for n in names if jnp.issubdtype(inputs[n].dtype, jnp.floating)]
    placed = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(n, x)))
              for n, x in inputs.items()}
    compiled, _ = _aot.compile(jax.value_and_grad(_loss_fn(call, names, float_names)),
                               [placed[n] for n in float_names],
                               {n: placed[n] for n in names if n not in float_names}, mesh=mesh)
    rep = _aot.report(compiled)
    assert rep["kernels"], f"{op}: no Pallas kernel in the module"
    moved = [c["op"] for c in rep["collectives"] if c["op"] in ("all-gather", "all-to-all")]
    assert not moved, f"{op}: {moved}"


def test_kernel_axes_errors():
    from pallas_kernels import kernel_axes
    with pytest.raises(ValueError, match="heads must be a mesh axis name"):
        with kernel_axes(heads=("tensor", 3)):
            pass


@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_flash_attention_per_shard_under_a_context_mesh(target):
    """flash_attention differentiates through JAX's kernels' own VJPs, so every target splits
    through a shard_map over the context mesh: rows over "data" and heads (key/value heads with
    their query groups) over "model" under kernel_axes, forward and gradients equal to the
    unsharded op, and no all-gather or all-to-all in the module."""
    from pallas_kernels import flash_attention, kernel_axes
    mesh = _mesh((4, 2), ("data", "model"))
    k = jax.random.split(jax.random.PRNGKey(9), 5)
    b, t, h, g, d = 4, 24, 4, 2, 8
    q = _normal(k[0], (b, t, h, d))
    kk, v = _normal(k[1], (b, t, g, d)), _normal(k[2], (b, t, g, d))
    seg = jnp.cumsum(jax.random.bernoulli(k[3], 0.15, (b, t)), 1).astype(jnp.int32)
    do = _normal(k[4], (b, t, h, d))

    def loss(impl):
        return lambda q, kk, v, s: jnp.sum(
            flash_attention(q, kk, v, segment_ids=s, implementation=impl) * do)

    want = jax.jit(jax.value_and_grad(loss("reference"), argnums=(0, 1, 2)))(q, kk, v, seg)
    heads = P("data", None, "model")
    with pallas_interpret("generic", target=target), jax.set_mesh(mesh), \
            kernel_axes(batch="data", heads="model"):
        placed = [jax.device_put(x, heads) for x in (q, kk, v)] + [
            jax.device_put(seg, P("data"))]
        f = jax.jit(jax.value_and_grad(loss("pallas"), argnums=(0, 1, 2)))
        text = f.lower(*placed).compile().as_text()
        got = f(*placed)
    kt.assert_close(got[0], want[0], F32_TOL, "loss")
    kt.assert_tree_close(got[1], want[1], F32_TOL, "gradients")
    assert not re.search(r"all-gather|all-to-all", text)
