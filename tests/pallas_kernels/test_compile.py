"""Every op's Pallas kernels, forward and backward, compiled by the real compilers for a TPU (v5e,
Mosaic) and a GPU (H100, Triton), on this CPU: what lowering alone cannot show (VMEM and shared
memory limits, Mosaic's layout rules, Triton's tile rules) fails here.

Needs the compilers' plugins (`pip install 'jax[tpu]' jax-cuda12-plugin`, versions matching
jax); skipped without them. The shapes are modest (compile time does not grow with the length)
at each op's largest head / state dim, in bfloat16 and float32. benchmarks/compile.py runs the
whole matrix.
"""
from __future__ import annotations

import contextlib
import os

import pytest

pytest.importorskip("jax.experimental.topologies")

from benchmarks import compile as matrix  # noqa: E402
from pallas_kernels import _aot, _dispatch  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.compile]

TARGETS = ("v5e", "h100")
LENGTH = 512
# The largest dim at which each op still runs its own kernel on the target (larger ones run the
# XLA path there by the op's own rule; benchmarks/RESULTS.md, compile matrix).
LARGEST_DIM = {"chunked_linear_attention": 256, "delta_rule": 256, "selective_scan": 256,
               "memory_lookup": 1024, "linear_scan": None, "causal_conv1d": None,
               "flash_attention": 256}
LARGEST_GPU_DIM = {**LARGEST_DIM, "delta_rule": 128, "chunked_linear_attention": 128}
CASES = [(op, variant) for op in matrix.OPS for variant in matrix.VARIANTS[op]]
# Short ids: the newest-JAX CI stage deselects tests named "bfloat16".
DTYPES = {"bf16": "bfloat16", "f32": "float32"}
KIND = {"tpu": "mosaic", "cuda": "triton"}


def _triton_on_gpus(target):
    """The GPU cases compile the Triton kernels (the A100's, and Hopper's inside
    gpu_backend("triton") or for calls no Mosaic GPU kernel covers): on an H100 the default
    backend picks the Mosaic GPU kernels where they cover a call, and those compile in
    test_mosaic_gpu.py (which also checks that choice)."""
    return _dispatch.gpu_backend("triton") if _aot.platform(target) == "cuda" else _nothing()


@contextlib.contextmanager
def _nothing():
    yield


@pytest.fixture(scope="module", autouse=True)
def _cpu_only():
    if os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu"):
        pytest.skip("compile-only devices are tested on a CPU host (JAX_PLATFORMS=cpu)")


CASE_IDS = [f"{o}-{v}" if v else o for o, v in CASES]
# The other TPU generations differ in Mosaic's backend (v6e's MXU latching, v4's and v5p's VMEM),
# so every TPU kernel compiles for each, in float32 (bfloat16 packing is v5e's cases' job).
OTHER_TPUS = ("v4", "v5p", "v6e")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("op,variant", CASES, ids=CASE_IDS)
def test_compiles_forward_and_backward(op, variant, dtype, target):
    _compiles(op, variant, DTYPES[dtype], target)


@pytest.mark.parametrize("target", OTHER_TPUS)
@pytest.mark.parametrize("op,variant", CASES, ids=CASE_IDS)
def test_compiles_for_every_tpu_generation(op, variant, target):
    _compiles(op, variant, "float32", target)


def _compiles(op, variant, dtype, target):
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    dim = (LARGEST_DIM if _aot.platform(target) == "tpu" else LARGEST_GPU_DIM)[op]
    case = matrix.Case(op, variant, dim, dtype, "fwd+bwd", LENGTH, target)
    fn, args = matrix._program(case)
    with _triton_on_gpus(target):
        compiled, _ = _aot.compile(fn, *(_aot.abstract(s, d, target) for s, d in args))
    rep = _aot.report(compiled)
    kinds = {k["kind"] for k in rep["kernels"]}
    if (op, variant, _aot.platform(target)) == ("flash_attention", "window", "cuda"):
        # The Triton kernel has no local mask: the op's rule sends a window to XLA there.
        assert not kinds, f"kernels: {rep['kernels']}"
        return
    # The op's own kernel, not an XLA fallback: at least the forward kernel is in the program.
    assert kinds == {KIND[_aot.platform(target)]}, f"kernels: {rep['kernels']}"
    assert rep["memory"]["arguments"] > 0
    if _aot.platform(target) == "tpu" and op != "flash_attention":
        # (splash attention, JAX's kernel, declares no scoped VMEM configuration to read)
        assert all(k["vmem_bytes"] > 0 for k in rep["kernels"]), rep["kernels"]


HOPPER_ONLY_BACKWARDS = [("delta_rule", "gated", 64),
                         ("chunked_linear_attention", "vector_gate", 128)]


@pytest.mark.parametrize("target,kernels", [("a100", 1), ("h100", 2)])
@pytest.mark.parametrize("op,variant,dim", HOPPER_ONLY_BACKWARDS,
                         ids=[f"{o}-{v}-d{d}" for o, v, d in HOPPER_ONLY_BACKWARDS])
def test_slow_backward_kernels_are_built_from_hopper_on(op, variant, dim, target, kernels):
    """The H100 program holds the Triton forward and backward kernels; the A100's only the
    forward (those backward kernels took 48 s / 37 s to compile there: XLA's backward instead)."""
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    case = matrix.Case(op, variant, dim, "float32", "fwd+bwd", LENGTH, target)
    fn, args = matrix._program(case)
    with _triton_on_gpus(target):
        compiled, _ = _aot.compile(fn, *(_aot.abstract(s, d, target) for s, d in args))
    found = [k["kind"] for k in _aot.report(compiled)["kernels"]]
    assert found == ["triton"] * kernels, found


def test_specs_and_errors():
    assert _aot.platform("v5e:4x4") == "tpu" and _aot.platform("h100x8") == "cuda"
    for bad in ("v9", "h100:2x2", "v5e:2x", "a100x0", ""):
        with pytest.raises(ValueError, match="spec"):
            _aot.devices(bad)


@pytest.mark.parametrize("spec,count", [("v5e:2x2", 4), ("h100x8", 8)])
def test_multi_device_collectives(spec, count):
    """A sharded program on a slice / a host of GPUs: its collectives are found in the report."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    if not _aot.available(spec):
        pytest.skip(f"no compiler plugin for {spec}")
    devs = _aot.devices(spec)
    assert len(devs) == count
    mesh = Mesh(np.array(devs), ("d",))
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, P("d", None)))
    compiled, _ = _aot.compile(lambda a: jnp.sum(a @ a.T, axis=0), x, mesh=mesh)
    rep = _aot.report(compiled)
    assert rep["collective_counts"], rep
    assert set(rep["collective_counts"]) <= set(_aot.COLLECTIVES)
    # Each device holds its shard of the argument: 256 * 512 * 4 bytes / count.
    assert rep["memory"]["arguments"] == 256 * 512 * 4 // count


# dplr_delta_rule (not in benchmarks/compile.py's matrix yet): its Pallas kernel is the forward;
# the backward is the XLA pass (as on every platform), whose TPU compile at these shapes takes
# minutes of CPU, so the forward program is what is compiled here.
DPLR_DIM = {"tpu": 256, "cuda": 128}


@pytest.mark.parametrize("target,dtype", [("v5e", "bf16"), ("v5e", "f32"), ("h100", "bf16"),
                                          ("h100", "f32"), ("v4", "f32"), ("v5p", "f32"),
                                          ("v6e", "f32")])
def test_dplr_delta_rule_forward_compiles(target, dtype):
    import jax.numpy as jnp
    import pallas_kernels as pk
    if not _aot.available(target):
        pytest.skip(f"no compiler plugin for {target}")
    dim = DPLR_DIM[_aot.platform(target)]
    dt = jnp.dtype(DTYPES[dtype])
    shapes = [((2, LENGTH, 8, dim), dt)] * 5 + [((2, LENGTH, 8, dim), jnp.float32)]

    def fn(q, k, v, a, b, w):
        o, final = pk.dplr_delta_rule(q, k, v, a, b, log_decay=w, implementation="pallas")
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    compiled, _ = _aot.compile(fn, *(_aot.abstract(s, d, target) for s, d in shapes))
    rep = _aot.report(compiled)
    assert [k["kind"] for k in rep["kernels"]] == [KIND[_aot.platform(target)]], rep["kernels"]
    if _aot.platform(target) == "tpu":
        assert all(k["vmem_bytes"] > 0 for k in rep["kernels"]), rep["kernels"]
