"""Choosing an implementation of an op: `implementation="auto" | "pallas" | "xla" | "reference"`.

Every public op takes `implementation=` and hands its array arguments to `dispatch`, with one
callable per implementation. The choice for "auto" is made with `jax.lax.platform_dependent`, at
lowering time, not by asking `jax.devices()` while tracing: a function traced once and exported
with `jax.export(..., platforms=("cpu", "tpu", "cuda"))` then carries the right implementation for
each platform, and lowering for "tpu" or "cuda" on a CPU-only machine picks the Pallas kernel.

    platform | "auto"                        | "pallas"
    ---------+-------------------------------+------------------------------------------
    tpu      | Pallas, Mosaic TPU            | Pallas, Mosaic TPU
    cuda     | per op, `AUTO_ON_CUDA`        | Pallas: Mosaic GPU on Hopper, else Triton
    other    | XLA path                      | Pallas (GPU variant), generic interpret mode (slow)

Where a "cuda" Pallas kernel runs, `gpu_backend` ("auto" by default) picks its Pallas backend:
the Mosaic GPU kernel on a GPU known to be Hopper (compute capability 9.x) with a JAX that has
Mosaic GPU, for the calls that kernel covers; Triton elsewhere.

Partitioning: every Pallas call goes through `partitioned(op, kernel, Partition(...), *args)`,
so that under a mesh the kernel runs on each shard's local arrays. The op's `Partition` names the
factor of each argument dim; factors not in `whole` are free (the math is independent along
them) and are split as the operands are; a sharded whole factor (time, contracted dims) is
gathered first, with a warning naming op, argument and dim; a free factor absent from a result
means that result is summed over it (psum). GPU kernels and interpreters: `custom_partitioning`
(real operand shardings at compile time, any jit). TPU kernels: libtpu has no partitioner for
custom_partitioning (jax#38196), so a `shard_map` over the context mesh (`jax.set_mesh`): Auto
axes split as `kernel_axes` says (by default the batch over the mesh axes that divide it),
Explicit axes follow the operands' types. Without a context
mesh a sharded TPU call still fails to compile. Inside a shard_map
(manual axes) and on one device: the plain call.

`pallas_interpret(...)` is the test hook: inside it "auto" and "pallas" both run the Pallas
kernels in the given interpret mode on whatever backend is present, so a whole model can be run
through its kernels on a CPU. The mode is read when a function is traced; jit caches do not see
it, so build fresh jitted functions inside the context (tests do).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import itertools
import warnings
from typing import Any, Callable, Literal, NamedTuple

import jax

IMPLEMENTATIONS = ("auto", "pallas", "xla", "reference")

Implementation = Literal["auto", "pallas", "xla", "reference"]

# The kernel variants a Pallas module provides, by the hardware they are written for. Either can
# also run through an interpreter on any backend (see `pallas_interpret`).
PALLAS_TARGETS = ("tpu", "cuda")

# What "auto" runs on an NVIDIA GPU, per op: the faster of the two on an H200 (JAX 0.11.2, bf16,
# B8 T4096 H16 d128 / 1024 channels; benchmarks/RESULTS.md, "The kernels compiled natively on an
# H200"). The Triton scans win where XLA has no fusion for a sequential recurrence (linear_scan
# 13x fwd+bwd, selective_scan 2x); XLA wins where the work is batched matmuls cuBLAS does well
# (chunked linear attention 4.5x fwd+bwd, the delta rule 1.8x), a few elementwise taps
# (causal_conv1d 4x) or a gather (memory_lookup, a tie: XLA saves the kernel's compile). The
# Triton matrix-state kernels also cost ~50 s of first-call compile there. Ops not listed: Pallas.
# On TPU "auto" is always the Mosaic kernel. Note that float32 matmuls on XLA's GPU path use
# TF32 by default (relative error ~1e-3); the Triton kernels use TF32x3 (~1e-6):
# `implementation="pallas"` or jax_default_matmul_precision="highest" where that matters.
AUTO_ON_CUDA: dict[str, Literal["pallas", "xla"]] = {
    # Not measured on a GPU yet: chosen for memory (XLA's path holds [B, H, T, T] scores).
    "flash_attention": "pallas",
    "linear_scan": "pallas",
    "selective_scan": "pallas",
    "chunked_linear_attention": "xla",
    "delta_rule": "xla",
    # Not measured on a GPU yet: like delta_rule, batched matmuls XLA does well.
    "dplr_delta_rule": "xla",
    "causal_conv1d": "xla",
    "memory_lookup": "xla",
}


def auto_runs_pallas(op: str, platform: str) -> bool:
    """Whether implementation="auto" runs `op`'s Pallas kernel when lowered for `platform`."""
    if platform == "tpu":
        return True
    if platform == "cuda":
        return AUTO_ON_CUDA.get(op, "pallas") == "pallas"
    return False


# NVIDIA device kinds (as jax reports them, "NVIDIA A100-SXM4-80GB") to compute capability, for
# the abstract devices of a context mesh, which carry a kind but no compute capability.
_CUDA_KINDS = (("GH200", 90), ("GB200", 100), ("A100", 80), ("A800", 80), ("A30", 80),
               ("A40", 86), ("A10", 86), ("L40", 89), ("L4", 89), ("H100", 90), ("H800", 90),
               ("H200", 90), ("H20", 90), ("B200", 100), ("B100", 100))


def cuda_compute_capability() -> int | None:
    """The compute capability (80, 90, ...) of the NVIDIA GPU a Triton kernel traced now is built
    for: the context mesh's device (`jax.set_mesh`; deviceless compiles for a target set one,
    and inside jit only its abstract device is visible), else the default device when it is a
    GPU; None where neither tells (a CPU host lowering for "cuda" with no mesh, where JAX's
    Triton lowering assumes Hopper, as the ops' Triton choices then do; `gpu_backend("auto")`
    keeps Triton there). Read at trace time, like the kernels' other per-target choices."""
    try:
        abstract = jax.sharding.get_abstract_mesh().abstract_device
    except Exception:   # an older JAX: no abstract devices
        abstract = None
    if abstract is not None and getattr(abstract, "platform", None) in ("gpu", "cuda"):
        words = str(abstract.device_kind).upper().replace("-", " ").split()
        for name, cc in _CUDA_KINDS:
            if name in words:
                return cc
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return None
    cc = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and cc:
        try:
            return int(str(cc).replace(".", ""))
        except ValueError:
            return None
    return None


_interpret_mode: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "memzoo_pallas_interpret", default=None)

# Which Pallas backend the "cuda" kernels use (see `gpu_backend`).
_gpu_backend: contextvars.ContextVar[str] = contextvars.ContextVar(
    "memzoo_gpu_backend", default="auto")
GPU_BACKENDS = ("auto", "triton", "mosaic")


@contextlib.contextmanager
def gpu_backend(backend: Literal["auto", "triton", "mosaic"]):
    """Which Pallas backend runs the "cuda" kernels of ops that have a Mosaic GPU (Hopper)
    kernel: chunked_linear_attention's and delta_rule's forward and backward (16-bit and float32
    inputs), linear_scan's real and selective_scan's forwards (each kernel's `supports` says which
    calls). Read when an op is traced.

    "auto" (the default): the Mosaic GPU kernel where the GPU is known to be Hopper (compute
    capability 9.x, from `cuda_compute_capability`: the context mesh's device or the default
    GPU), the installed JAX has Mosaic GPU and the kernel covers the call (its `supports`);
    the Triton kernel elsewhere: A100 and other GPUs before Hopper (Mosaic GPU emits sm_90a
    code), an older JAX, uncovered calls, and lowerings whose GPU is unknown (a CPU host
    lowering or exporting for "cuda" with no mesh): such a module may run on any NVIDIA GPU,
    and Triton kernels are compiled for the GPU they land on, a Mosaic GPU kernel only runs
    on Hopper.
    "mosaic": the Mosaic GPU kernel where it covers the call and the JAX has Mosaic GPU, on
    Hopper or where the GPU is unknown at lowering (the Triton path assumes Hopper there too).
    "triton": always the Triton kernels.
    The forward and the backward of an op decide alike (the same context, the same
    predicate), so a backward reads the chunk states its own kernel family wrote."""
    if backend not in GPU_BACKENDS:
        raise ValueError(f"gpu_backend: backend must be one of {GPU_BACKENDS}, got {backend!r}")
    token = _gpu_backend.set(backend)
    try:
        yield
    finally:
        _gpu_backend.reset(token)


@functools.lru_cache(maxsize=None)
def mosaic_gpu_available() -> bool:
    """Whether the installed JAX has Pallas Mosaic GPU as memzoo's kernels are written for it
    (JAX 0.12: older ones have the module with other signatures, e.g. `plgpu.load`)."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return False
    version = tuple(int(p) for p in jax.__version_info__[:2])
    return version >= (0, 12) and all(
        hasattr(plgpu, n) for n in ("emit_pipeline", "wgmma", "kernel", "ACC"))


def use_mosaic_gpu(interpret) -> bool:
    """Whether a "cuda" kernel traced now with this `interpret=` setting is the Mosaic GPU one
    (where its `supports` covers the call): under Mosaic GPU's interpreter
    (`pallas_interpret("gpu")`), or compiled for Hopper as `gpu_backend` says."""
    if is_gpu_interpret(interpret):
        return True
    backend = _gpu_backend.get()
    if interpret is not None or backend == "triton" or not mosaic_gpu_available():
        return False
    cc = cuda_compute_capability()
    if backend == "mosaic":
        return (cc or 90) // 10 == 9
    return cc is not None and cc // 10 == 9


def is_gpu_interpret(interpret) -> bool:
    return type(interpret).__name__ == "InterpretGPUParams"


def triton_interpret(interpret):
    """The `interpret=` a Triton kernel takes where a Mosaic GPU one was asked for but does not
    cover the call: Mosaic GPU's interpreter runs only Mosaic GPU kernels, so the generic one."""
    return True if is_gpu_interpret(interpret) else interpret


def gpu_interpret_params():
    """Mosaic GPU interpret mode as the kernel tests ask: race detection on, uninitialised
    memory NaN."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")


def tpu_interpret_params():
    """TPU interpret mode as the contract asks: race detection on, uninitialised memory NaN."""
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")


@contextlib.contextmanager
def pallas_interpret(mode: Literal["generic", "tpu", "gpu"] = "generic",
                     target: Literal["tpu", "cuda"] | None = None):
    """Runs every memzoo Pallas kernel traced inside in interpret mode.

    mode="generic": Pallas' generic interpreter (any backend; uninitialised outputs read as NaN).
    mode="tpu": Pallas' TPU interpreter with `detect_races=True, uninitialized_memory="nan"`, which
    also models TPU semantics (grid order, scratch persistence, DMA races).
    mode="gpu": Pallas Mosaic GPU's interpreter (`plgpu.InterpretGPUParams`, race detection on,
    uninitialised memory NaN) on the "cuda" kernels that have a Mosaic GPU (Hopper) variant;
    calls those do not cover run their Triton kernel in the generic interpreter.
    target: which kernel variant to interpret, the TPU one or the GPU (Triton) one; by default
    "tpu" for mode="tpu" and "cuda" for mode="generic" and "gpu".
    """
    if mode == "generic":
        value: Any = True
    elif mode == "tpu":
        value = tpu_interpret_params()
    elif mode == "gpu":
        value = gpu_interpret_params()
    else:
        raise ValueError(
            f"pallas_interpret: mode must be 'generic', 'tpu' or 'gpu', got {mode!r}")
    target = target or ("tpu" if mode == "tpu" else "cuda")
    if target not in PALLAS_TARGETS:
        raise ValueError(f"pallas_interpret: target must be one of {PALLAS_TARGETS}, got {target!r}")
    if mode == "tpu" and target != "tpu":
        raise ValueError("pallas_interpret: TPU interpret mode runs only the 'tpu' kernels")
    if mode == "gpu" and target != "cuda":
        raise ValueError("pallas_interpret: GPU interpret mode runs only the 'cuda' kernels")
    token = _interpret_mode.set((value, target))
    try:
        yield
    finally:
        _interpret_mode.reset(token)


def current_interpret():
    """None outside `pallas_interpret`; else (`interpret=` value for `pl.pallas_call`, target)."""
    return _interpret_mode.get()


# Set by `pallas_kernels.sequence_parallel(...)`; read when an op is traced.
_sequence_parallel: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "memzoo_sequence_parallel", default=None)


def set_sequence_parallel(setting):
    return _sequence_parallel.set(setting)


def reset_sequence_parallel(token) -> None:
    _sequence_parallel.reset(token)


def sequence_parallel_op(op: str):
    """Decorates a state-carrying public op: inside `pallas_kernels.sequence_parallel(axis)` and
    under a mesh that splits that axis, the op runs with time split over it
    (pallas_kernels/sequence_parallel.py); otherwise it is called as is. `__wrapped__` is the
    undecorated op."""
    def wrap(fn):
        @functools.wraps(fn)
        def public(*args, **kwargs):
            setting = _sequence_parallel.get()
            if setting is not None:
                # imported here: sequence_parallel imports the ops, which import this module
                sp = importlib.import_module("pallas_kernels.sequence_parallel")
                out = sp.run(op, fn, setting, args, kwargs)
                if out is not NotImplemented:
                    return out
            return fn(*args, **kwargs)
        return public
    return wrap


def check_implementation(implementation: str, op: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def dispatch(
    op: str,
    implementation: str,
    *args,
    reference: Callable[..., Any],
    xla: Callable[..., Any],
    pallas: Callable[..., Any] | None,
    partition: "Partition | None" = None,
    differentiable: bool = False,
):
    """Calls the implementation of `op` chosen by `implementation` on `args` (arrays or None).

    `pallas(*args, target=..., interpret=...)` is called with target in PALLAS_TARGETS and
    interpret None (compile for that target) or an interpreter setting; the other callables take
    `*args`. All branches must return the same pytree of shapes and dtypes
    (platform_dependent requires it, and it is what makes them interchangeable).
    `partition`: how the Pallas call splits under a mesh (`Partition`); None: not split.
    `differentiable`: the kernels carry their own custom VJPs and the op is differentiated
    through this call (JAX's shipped flash-attention kernels), so every target splits through
    a shard_map over the context mesh, which autodiff passes through (custom_partitioning does
    not); without a context mesh the call is not split.
    """
    check_implementation(implementation, op)
    if implementation == "reference":
        return reference(*args)
    if implementation == "xla" or (pallas is None and implementation == "auto"):
        return xla(*args)
    if pallas is None:
        raise ValueError(f"{op}: implementation='pallas' is not available for this op")

    interpreting = current_interpret()
    if interpreting is not None:
        interpret, target = interpreting
        kernel = functools.partial(pallas, target=target, interpret=interpret)
        if interpret is not True:
            # TPU interpret mode runs the kernel through ordered io_callbacks, an effect that
            # neither custom_partitioning nor shard_map carries: it runs unsplit (it is a
            # correctness tool; the generic interpreter is the one the partitioning tests use).
            return kernel(*args)
        return partitioned(op, kernel, partition, *args, mosaic=target == "tpu",
                           shard_map_only=differentiable)

    def on(target, interpret=None):
        kernel = functools.partial(pallas, target=target, interpret=interpret)
        return lambda *a: partitioned(op, kernel, partition, *a, mosaic=target == "tpu",
                                      shard_map_only=differentiable)

    if implementation == "pallas":
        return jax.lax.platform_dependent(*args, tpu=on("tpu"), cuda=on("cuda"),
                                          default=on("cuda", True))
    cuda = on("cuda") if auto_runs_pallas(op, "cuda") else xla
    return jax.lax.platform_dependent(*args, tpu=on("tpu"), cuda=cuda, default=xla)


class Partition(NamedTuple):
    """How a kernel's arguments and results split over a mesh (see `partitioned`).

    inputs: one (name, dims) per positional argument: dims a space-separated string with one
      factor name per axis ("b t h k"), or None for an argument that is None.
    outputs: the kernel's result pytree with the same kind of string (or None) at each leaf.
    whole: the factors that must stay whole on every device (time, contracted dims). Every
      other factor is free: the kernel's math is independent along it. A free factor missing
      from an output means that output is a sum over it (a gradient), so it is summed
      across the shards.
    tied: {factor: leader}: the factor is split exactly as the leader is (grouped channels: the
      group axis of B/C follows the channel axis); where it cannot be, the leader stays whole.
      A tied factor of size 1 (one group for all channels) is left whole.
    """
    inputs: tuple
    outputs: Any
    whole: str = ""
    tied: tuple = ()


# Which mesh axes each kind of free kernel dim is split over under Auto axes (`kernel_axes`), as
# factor names of the ops' Partition rules: rows of a batch ("b"; memory_lookup's bags "n"),
# heads ("h"), channels ("c").
_KERNEL_KINDS = {"batch": ("b", "n"), "heads": ("h",), "channels": ("c",)}
_kernel_axes: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "memzoo_kernel_axes", default=None)


@contextlib.contextmanager
def kernel_axes(*, batch=(), heads=(), channels=()):
    """Tells the TPU kernels how activations are split over the context mesh's Auto axes.

    A TPU kernel runs in a shard_map whose split is fixed while tracing, before XLA has
    propagated any sharding, so under Auto axes it cannot see how its operands arrive. Inside
    this context it splits batch rows, heads (the attention-like ops' head dim) and channels
    (the scans' and convolutions' channel dim) over the mesh axes named here: the split the
    model's own layout gives them, so nothing is resharded around the kernel. Without it the
    batch alone is split, over the mesh axes that divide it. (train/trainer.py does not set it
    yet: for the tensor-parallel GLA and Mamba-2 steps, whose mixers do not pin their kernel
    operands' layout, GSPMD then moved about as many bytes as without it; RESULTS.md.) Each argument is a mesh axis name or a tuple of
    them; axes the mesh lacks are ignored, and a dim they do not divide stays whole. Explicit
    axes need none of this: the operands' types say how they are split.
    """
    table = {}
    for kind, axes in (("batch", batch), ("heads", heads), ("channels", channels)):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if not all(isinstance(a, str) and a for a in axes):
            raise ValueError(f"kernel_axes: {kind} must be a mesh axis name or a tuple of them, "
                             f"got {axes!r}")
        for factor in _KERNEL_KINDS[kind]:
            table[factor] = axes
    token = _kernel_axes.set(table)
    try:
        yield
    finally:
        _kernel_axes.reset(token)


def _manual_axes() -> frozenset:
    mesh = jax.sharding.get_abstract_mesh()
    return frozenset(getattr(mesh, "manual_axes", ()) or ())


def partitioned(op: str, kernel: Callable[..., Any], part: Partition | None, *args,
                mosaic: bool = False, shard_map_only: bool = False):
    """`kernel(*args)`, run per shard wherever the compiler partitions the call.

    A custom_partitioning call whose partitioner reads the operands' shardings at compile time
    (no mesh needed when tracing; plain jit of NamedSharding inputs works as well as
    `jax.set_mesh`). `mosaic=True` (TPU kernels, which custom_partitioning cannot carry on
    TPU) and meshes with Explicit axes: a shard_map over the context mesh (`_shard_mapped`).
    Inside a shard_map (manual axes), the plain call: the caller already handles the split.
    """
    if part is None or _manual_axes():
        return kernel(*args)
    specs = [None if d is None else tuple(d.split()) for _, d in part.inputs]
    names = [n for n, _ in part.inputs]
    if len(specs) != len(args):
        raise ValueError(f"{op}: partition rule names {len(specs)} arguments, got {len(args)}")
    for name, spec, x in zip(names, specs, args):
        if (spec is None) != (x is None) or (x is not None and len(spec) != x.ndim):
            raise ValueError(f"{op}: partition rule for `{name}` is {spec}, "
                             f"got shape {None if x is None else x.shape}")
    present = [i for i, x in enumerate(args) if x is not None]
    out_specs = part.outputs
    mesh = _context_mesh()
    if shard_map_only and mesh is None:
        return kernel(*args)
    if mesh is not None and (mosaic or shard_map_only or _explicit_axes(mesh)):
        return _shard_mapped(op, kernel, [names[i] for i in present], [specs[i] for i in present],
                             part, present, len(args), mesh, *[args[i] for i in present])
    return _partitioned_call(op, kernel, [names[i] for i in present],
                             [specs[i] for i in present], out_specs, part, present, len(args),
                             *[args[i] for i in present])


def _context_mesh():
    """The mesh set with `jax.set_mesh` / `use_mesh` when it spans several devices, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", True) or mesh.size == 1:
        return None
    return mesh


def _explicit_axes(mesh) -> list:
    return [a for a, t in zip(mesh.axis_names, mesh.axis_types)
            if t == jax.sharding.AxisType.Explicit]


def _shard_mapped(op, kernel, names, specs, part, present, nargs, mesh, *arrays):
    """The kernel under a shard_map over the context mesh (the Mosaic path; see `partitioned`).

    Operands whose types carry their sharding (Explicit mesh axes) are split as they are, by
    the same rule as the partitioner's. Under Auto axes the shardings are unknown while tracing:
    they are taken from `kernel_axes` where it is set; otherwise the batch (the leading factor
    of the first operand that leads with a free one) is split over as many mesh axes, in mesh
    order, as divide it, and every other factor is kept whole.
    """
    from jax.sharding import PartitionSpec
    whole, tied = set(part.whole.split()), dict(part.tied)
    leaves, out_tree = jax.tree.flatten(part.outputs)
    flat_out = [tuple(o.split()) for o in leaves]
    pspecs = []
    for x, spec in zip(arrays, specs):
        sharding = getattr(jax.typeof(x), "sharding", None)
        pspecs.append(_spec_of(sharding, len(spec)) if sharding is not None
                      else [()] * len(spec))
    mesh_shape = dict(mesh.shape)
    hint = _kernel_axes.get()
    if any(axes for p in pspecs for axes in p):
        chosen = _plan(op, names, specs, [x.shape for x in arrays], pspecs, mesh_shape, whole,
                       tied, warn=True)
    elif hint is not None:
        # The operands taken as split the way the hint says; the rule decides as for real ones.
        assumed = [[tuple(a for a in hint.get(f, ()) if a in mesh_shape) for f in spec]
                   for spec in specs]
        chosen = _plan(op, names, specs, [x.shape for x in arrays], assumed, mesh_shape, whole,
                       tied, warn=False)
    else:
        lead = next(i for i, s in enumerate(specs) if s and s[0] not in whole)
        batch, size, axes = specs[lead][0], arrays[lead].shape[0], []
        for a in mesh.axis_names:
            if size % (_size(mesh_shape, axes) * mesh_shape[a]) == 0:
                axes.append(a)
        chosen = {batch: tuple(axes)} if axes and batch not in whole else {}
    summed = _summed(specs, flat_out, chosen, tied)

    def body(*arrs):
        args = [None] * nargs
        for i, x in zip(present, arrs):
            args[i] = x
        outs = jax.tree.leaves(kernel(*args))
        outs = [jax.lax.psum(o, axes) if axes else o for o, axes in zip(outs, summed)]
        return out_tree.unflatten(outs)

    def spec(factors):
        return PartitionSpec(*[chosen.get(f) for f in factors])

    in_specs = tuple(spec(s) for s in specs)
    if _explicit_axes(mesh):
        # Explicit axes: shard_map takes operands only as their types say they are split.
        arrays = [x if _spec_of(jax.typeof(x).sharding, x.ndim) == _spec_of(
            _Spec(p), x.ndim) else jax.sharding.reshard(x, p) for x, p in zip(arrays, in_specs)]
    # check_vma=False: Pallas calls carry no varying-axes types.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                         out_specs=out_tree.unflatten([spec(s) for s in flat_out]),
                         check_vma=False)(*arrays)


def _partitioned_call(op, kernel, names, specs, out_specs, part, present, nargs, *arrays):
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec

    def full(arrs):
        args = [None] * nargs
        for i, x in zip(present, arrs):
            args[i] = x
        return args

    def call(*arrs):
        return kernel(*full(arrs))

    whole = set(part.whole.split())
    tied = dict(part.tied)
    leaves, out_tree = jax.tree.flatten(out_specs)
    flat_out = [tuple(s.split()) for s in leaves]

    def plan(mesh, arg_shapes, warn):
        return _plan(op, names, specs, [a.shape for a in arg_shapes],
                     [_spec_of(a.sharding, len(s)) for a, s in zip(arg_shapes, specs)],
                     dict(mesh.shape), whole, tied, warn)

    def shard(mesh, chosen, spec):
        return NamedSharding(mesh, PartitionSpec(*[chosen.get(f) for f in spec]))

    def infer(mesh, arg_shapes, result_shape):
        chosen = plan(mesh, arg_shapes, warn=False)
        return out_tree.unflatten([shard(mesh, chosen, s) for s in flat_out])

    def partition(mesh, arg_shapes, result_shape):
        chosen = plan(mesh, arg_shapes, warn=True)
        summed = _summed(specs, flat_out, chosen, tied)

        def lower(*arrs):
            outs = jax.tree.leaves(call(*arrs))
            outs = [jax.lax.psum(o, axes) if axes else o for o, axes in zip(outs, summed)]
            return out_tree.unflatten(outs)

        arg_shardings = tuple(shard(mesh, chosen, s) for s in specs)
        return mesh, lower, out_tree.unflatten([shard(mesh, chosen, s) for s in flat_out]), \
            arg_shardings

    letters = {}

    def letter(f):
        return letters.setdefault(f, "abcdefghijklmnopqrstuvwxyz"[len(letters)])

    rule = (", ".join(" ".join(letter(f) for f in s) for s in specs) + " -> "
            + ", ".join(" ".join(letter(f) for f in s) for s in flat_out))

    cp = custom_partitioning(call)
    cp.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=rule)

    @jax.custom_batching.custom_vmap
    def run(*arrs):
        return cp(*arrs)

    @run.def_vmap
    def run_batched(axis_size, in_batched, *arrs):
        # vmap adds a leading axis, free like a batch axis, to the batched operands and to
        # every result: the batched call is partitioned the same way.
        fresh = f"vmap{next(_fresh)}"
        axes = [0 if b else None for b in in_batched]
        new_specs = [((fresh,) + s) if b else s for s, b in zip(specs, in_batched)]
        new_out = jax.tree.map(lambda s: f"{fresh} {s}", out_specs)
        batched_kernel = jax.vmap(call, in_axes=axes)
        out = _partitioned_call(op, batched_kernel, names, new_specs, new_out, part, list(range(len(arrs))),
                                len(arrs), *arrs)
        return out, jax.tree.map(lambda _: True, out)

    return run(*arrays)


_fresh = itertools.count()


def _plan(op, names, specs, shapes, pspecs, mesh_shape, whole, tied, warn):
    """{factor: mesh axes} that the kernel is run split along, from the operands' dims
    (`pspecs`: the mesh axes each dim is split over)."""
    sizes, chosen, used = {}, {}, set()
    for name, spec, shape, pspec in zip(names, specs, shapes, pspecs):
        for dim, (f, axes) in enumerate(zip(spec, pspec)):
            sizes[f] = shape[dim]
            if not axes:
                continue
            if f in whole:
                if warn:
                    warnings.warn(
                        f"{op}: argument `{name}` is sharded along its dim {dim} ({f!r}, over "
                        f"mesh axes {axes}), which the kernel needs whole: it is gathered "
                        f"before the call", stacklevel=3)
                continue
            if f in chosen or f in tied or used & set(axes):
                continue
            if shape[dim] % _size(mesh_shape, axes):
                continue
            chosen[f] = axes
            used |= set(axes)
    for f, leader in tied.items():
        if leader not in chosen or sizes.get(f, 1) == 1:
            continue
        if sizes[f] % _size(mesh_shape, chosen[leader]):
            axes = chosen.pop(leader)
            if warn:
                warnings.warn(f"{op}: {leader!r} is sharded over mesh axes {axes}, which do not "
                              f"divide {f!r} ({sizes[f]}): it is gathered before the call",
                              stacklevel=3)
        else:
            chosen[f] = chosen[leader]
    return chosen


def _summed(specs, out_specs, chosen, tied):
    """Per output, the mesh axes its per-shard results are summed over: those of the split
    factors it lacks (a tied factor is split with its leader, not summed over)."""
    factors = sorted({f for s in specs for f in s})
    return [tuple(a for f in factors if f in chosen and f not in s and f not in tied
                  for a in chosen[f]) for s in out_specs]


class _Spec(NamedTuple):
    spec: Any


def _spec_of(sharding, ndim):
    """Mesh axes (a tuple, empty when whole) along each of `ndim` dims of a NamedSharding."""
    spec = tuple(getattr(sharding, "spec", ())) + (None,) * ndim
    out = []
    for entry in spec[:ndim]:
        if entry is None:
            out.append(())
        elif isinstance(entry, str):
            out.append((entry,))
        else:
            out.append(tuple(entry))
    return out


def _size(mesh_shape, axes):
    n = 1
    for a in axes:
        n *= mesh_shape[a]
    return n
