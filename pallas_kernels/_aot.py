"""Compile-only accelerators on a CPU host: proving that kernels and programs compile for real chips.

Both real compilers run without the hardware (deviceless ahead-of-time compilation):

- TPU: libtpu (`pip install 'jax[tpu]'`) describes a slice by name ("v5e:2x2") and hands out
  compile-only devices; Mosaic compiles every Pallas TPU kernel for that generation and refuses
  one that overflows VMEM or breaks a layout rule.
- NVIDIA GPU: the CUDA PJRT plugin (`pip install jax-cuda12-plugin`, which brings
  jax-cuda12-pjrt; no CUDA libraries are needed to compile) builds devices from a
  `GpuTargetConfigProto`. We write that proto from the small table `GPUS` below; Triton kernels
  are compiled to sm_80 / sm_90a and one that needs more shared memory than the GPU has is refused.

Run with `JAX_PLATFORMS=cpu` (the CUDA plugin otherwise tries to open a GPU). Typical use:

    from pallas_kernels import _aot
    x = _aot.abstract((2, 4096, 8, 128), jnp.bfloat16, "h100")
    compiled, seconds = _aot.compile(fn, x, x)
    print(_aot.format_report(_aot.report(compiled)))

Specs name a target and how many devices: "v5e" (one chip), "v5e:2x2", "v5e:4x4" (a pod slice),
"v5p:2x2x1", "h100" (one GPU), "h100x8" (eight GPUs of one host), "h200x2".
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    name: str
    topology: str        # the smallest slice libtpu accepts: one chip
    description: str


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """The figures XLA needs to compile for an NVIDIA GPU (the fields of `GpuDeviceInfoProto`).

    Source: XLA's own device specs, openxla/xla xla/backends/gpu/target_config/specs/
    (a100_sxm_80.txtpb, h100_sxm.txtpb, h200.txtpb), which record what the CUDA driver reports
    on those parts; they agree with NVIDIA's tuning guides (A100: 164 KiB shared memory per
    block opt-in, 108 SMs; H100 SXM / H200: 227 KiB, 132 SMs).
    """
    name: str
    description: str            # the device_kind JAX reports
    compute_capability: tuple[int, int]
    accelerated_features: bool  # sm_90a: wgmma / TMA instructions (Hopper)
    core_count: int             # SMs
    fpus_per_core: int
    shared_memory_per_block_optin: int
    shared_memory_per_core: int
    memory_bandwidth: int       # bytes / s
    l2_cache_size: int
    clock_rate_ghz: float
    device_memory_size: int

    def target_config(self) -> str:
        """The text of the GpuTargetConfigProto for this GPU (limits common to sm_80 and sm_90)."""
        major, minor = self.compute_capability
        extension = "ACCELERATED_FEATURES" if self.accelerated_features else "NONE"
        return "\n".join([
            "gpu_device_info {",
            "  threads_per_block_limit: 1024",
            "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",
            f"  shared_memory_per_core: {self.shared_memory_per_core}",
            "  threads_per_core_limit: 2048",
            f"  core_count: {self.core_count}",
            f"  fpus_per_core: {self.fpus_per_core}",
            "  block_dim_limit_x: 2147483647",
            "  block_dim_limit_y: 65535",
            "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {self.memory_bandwidth}",
            f"  l2_cache_size: {self.l2_cache_size}",
            f"  clock_rate_ghz: {self.clock_rate_ghz}",
            f"  device_memory_size: {self.device_memory_size}",
            f"  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} "
            f"feature_extension: {extension} }}",
            "  registers_per_core_limit: 65536",
            "  registers_per_block_limit: 65536",
            "  thread_dim_limit_x: 1024",
            "  thread_dim_limit_y: 1024",
            "  thread_dim_limit_z: 64",
            "}",
            'platform_name: "CUDA"',
            f'device_description_str: "{self.description}"',
            "",
        ])


# Figures from openxla/xla xla/backends/gpu/target_config/specs/{a100_sxm_80,h100_sxm,h200}.txtpb.
GPUS: dict[str, GpuTarget] = {
    "a100": GpuTarget("a100", "NVIDIA A100-SXM4-80GB", (8, 0), False, 108, 64,
                      166912, 167936, 2039040000000, 41943040, 1.41, 85100068864),
    "h100": GpuTarget("h100", "NVIDIA H100 80GB HBM3", (9, 0), True, 132, 128,
                      232448, 233472, 3352320000000, 52428800, 1.98, 84942979072),
    "h200": GpuTarget("h200", "NVIDIA H200 141GB HBM3e", (9, 0), True, 132, 128,
                      232448, 233472, 4800000000000, 52428800, 1.98, 151397597184),
}

TPUS: dict[str, TpuTarget] = {
    "v4": TpuTarget("v4", "1x1x1", "TPU v4 (32 MiB VMEM per core, megacore)"),
    "v5e": TpuTarget("v5e", "1x1", "TPU v5e (v5 lite; 128 MiB VMEM, one core)"),
    "v5p": TpuTarget("v5p", "1x1x1", "TPU v5p (megacore)"),
    "v6e": TpuTarget("v6e", "1x1", "TPU v6e (Trillium; 256-wide MXU)"),
}

TARGETS: tuple[str, ...] = (*TPUS, *GPUS)


# HBM per chip of the TPU generations (Google Cloud's TPU pages); GPUs carry theirs in GPUS.
TPU_HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}


def hbm_bytes(target: str) -> int:
    """Device memory per chip of `target` ("v5e", "h100", or a spec such as "v5e:4x4")."""
    name = parse_spec(target)[0]
    if name in TPU_HBM_BYTES:
        return TPU_HBM_BYTES[name]
    return GPUS[name].device_memory_size


def platform(target: str) -> str:
    """'tpu' or 'cuda' for a target name or spec ("v5e:2x2" -> 'tpu', "h100x8" -> 'cuda')."""
    return "tpu" if parse_spec(target)[0] in TPUS else "cuda"


def parse_spec(spec: str) -> tuple[str, str]:
    """spec -> (target name, topology string for get_topology_desc)."""
    if not isinstance(spec, str):
        raise ValueError(f"spec must be a string like 'v5e:2x2' or 'h100x8', got {spec!r}")
    s = spec.strip().lower()
    if s in TPUS:
        return s, TPUS[s].topology
    if s in GPUS:
        return s, "1x1x1"
    if ":" in s:
        name, topology = s.split(":", 1)
        if name in TPUS and re.fullmatch(r"\d+(x\d+){1,2}", topology):
            return name, topology
    m = re.fullmatch(r"([a-z0-9]+?)x(\d+)", s)
    if m and m.group(1) in GPUS and int(m.group(2)) >= 1:
        return m.group(1), f"1x1x{int(m.group(2))}"
    raise ValueError(
        f"spec: expected a TPU name with an optional topology ({', '.join(TPUS)}; e.g. 'v5e:2x2'"
        f") or a GPU name with an optional count ({', '.join(GPUS)}; e.g. 'h100x8'), got {spec!r}")


@functools.lru_cache(maxsize=None)
def _topology(name: str, topology: str):
    from jax.experimental import topologies
    # Compile-only use touches no chip: let several processes (pytest workers, other jobs) load
    # libtpu at once instead of failing on its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if name in TPUS:
        return topologies.get_topology_desc(platform="tpu", topology_name=f"{name}:{topology}")
    make = lambda: topologies.get_topology_desc(
        platform="cuda", target_config=GPUS[name].target_config(), topology=topology)
    try:
        return make()
    except NotImplementedError:
        if not _register_cuda_plugin():
            raise
        return make()


def _register_cuda_plugin() -> bool:
    """Registers the CUDA plugin when JAX's discovery skipped it.

    Unless JAX_PLATFORMS excludes cuda, the plugin checks the CUDA libraries' versions first and
    is not registered when they are missing, as on a CPU host that only compiles. Compiling
    needs none of them: register it again without the check.
    """
    import importlib
    try:
        plugin = importlib.import_module("jax_plugins.xla_cuda12")
    except ImportError:
        return False
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    try:
        plugin.initialize()
    except Exception:  # noqa: BLE001 -- an unusable plugin means: not available
        return False
    return True


def devices(spec: str) -> list:
    """The compile-only devices of `spec` (cached): one per TPU chip / per GPU."""
    return list(_topology(*parse_spec(spec)).devices)


@functools.lru_cache(maxsize=None)
def _available(name: str) -> bool:
    try:
        _topology(*parse_spec(name))
    except Exception:  # no plugin, or a plugin that cannot describe this part
        return False
    return True


def available(target: str) -> bool:
    """Whether this host can compile for `target` (its compiler plugin is installed and works)."""
    return _available(parse_spec(target)[0])


def abstract(shape: Sequence[int], dtype, spec: str | Any, *, device_index: int = 0):
    """A ShapeDtypeStruct placed on one compile-only device of `spec` (or on a given device)."""
    from jax.sharding import SingleDeviceSharding
    device = devices(spec)[device_index] if isinstance(spec, str) else spec
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=SingleDeviceSharding(device))


def _set_mesh(mesh):
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)  # older JAX


@contextlib.contextmanager
def lowering(spec_or_devices: str | Sequence[Any], mesh=None) -> Iterator[None]:
    """The context to lower (trace + lower + compile) in for compile-only devices.

    Pallas asks the current mesh's device which chip it targets (Triton: the GPU's compute
    capability; Mosaic: the TPU generation, for some kernels), since the process's own backend
    is the CPU. This sets a mesh: `mesh` if given (a program's own mesh over these devices),
    else a one-device mesh on the first device.
    """
    devs = devices(spec_or_devices) if isinstance(spec_or_devices, str) else list(spec_or_devices)
    if mesh is None and devs:
        mesh = jax.sharding.Mesh(np.array(devs[:1]), ("x",))
    if mesh is None:
        yield
        return
    with _set_mesh(mesh):
        yield


def _arg_devices(args) -> list:
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return list(sharding.device_set)
    return []


def compile(fn: Callable, *abstract_args, mesh=None, **jit_kwargs):
    """jit(fn).lower(*abstract_args).compile() for compile-only devices -> (compiled, seconds).

    The devices are those of the arguments' shardings (see `abstract`); `fn` may already be
    jitted. Raises what the compiler raises (e.g. Mosaic's VMEM errors, Triton's "Shared memory
    size limit exceeded").
    """
    jitted = fn if hasattr(fn, "lower") and not jit_kwargs else jax.jit(fn, **jit_kwargs)
    devs = _arg_devices(abstract_args)
    ctx = lowering(devs, mesh) if (devs or mesh is not None) else contextlib.nullcontext()
    start = time.perf_counter()
    with ctx:
        compiled = jitted.lower(*abstract_args).compile()
    return compiled, time.perf_counter() - start


def first_line(error: BaseException) -> str:
    """The first informative line of a compiler error (for tables)."""
    for line in str(error).splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "The above exception", "---")):
            return f"{type(error).__name__}: {line}"[:300]
    return type(error).__name__


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) +
    r")(?P<start>-start)?\(")
_CUSTOM_CALL = re.compile(r'custom_call_target="(?P<target>[^"]+)"')
_KERNEL_NAMES = {"tpu_custom_call": "mosaic", "__gpu$xla.gpu.triton": "triton",
                 "mosaic_gpu": "mosaic_gpu", "mosaic_gpu_v2": "mosaic_gpu"}


def _kernel(line: str, target: str) -> dict:
    kernel: dict[str, Any] = {"kind": _KERNEL_NAMES.get(target, target)}
    m = re.search(r'op_name="([^"]*)"', line)
    if m:
        kernel["op_name"] = m.group(1)
    m = re.search(r'"used_scoped_memory_configs":\[(.*?)\]', line)
    if m:  # Mosaic: the VMEM (memory_space 1) the kernel reserved
        sizes = [int(s) for space, s in re.findall(
            r'"memory_space":"(\d+)","offset":"\d+","size":"(\d+)"', m.group(1)) if space == "1"]
        kernel["vmem_bytes"] = sum(sizes)
    for key in ("num_warps", "num_stages", "grid_x", "grid_y", "grid_z"):
        m = re.search(rf"\b{key} = (\d+)", line)
        if m:
            kernel[key] = int(m.group(1))
    m = re.search(r', name = "([^"]+)"', line)
    if m:
        kernel["name"] = m.group(1)
    return kernel


def _memory(compiled) -> dict | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "aliased": "alias_size_in_bytes", "temporaries": "temp_size_in_bytes",
              "generated_code": "generated_code_size_in_bytes"}
    out = {k: int(getattr(stats, f, 0) or 0) for k, f in fields.items()}
    # What the program holds at once on each device: its buffers in and out (aliased ones once)
    # plus its scratch.
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return {}
    out = {}
    if "flops" in cost:
        out["flops"] = float(cost["flops"])
    if "bytes accessed" in cost:
        out["bytes_accessed"] = float(cost["bytes accessed"])
    return out


# XLA logs each Triton kernel's shared memory when it compiles it (at verbosity 2 of its
# xtile_compiler module); nothing in the compiled module records it. These variables must be in
# the environment before XLA first loads (a fresh process: see benchmarks/compile.py).
KERNEL_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "xtile_compiler=2"}
_SHARED = re.compile(r"Shared memory usage: (\d+) B")
_SHARED_LIMIT = re.compile(r"Shared memory size limit exceeded: requested (\d+)")


@contextlib.contextmanager
def compiler_log() -> Iterator[list]:
    """Captures what the compilers write to stderr (file descriptor 2) inside the context; the
    yielded list holds the text after exit. Pass it to `report(compiled, log=...)`."""
    import sys
    import tempfile
    out: list = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def shared_memory(log: str) -> dict:
    """Triton shared memory figures in a compiler log: per kernel used, and any refused request."""
    out: dict[str, Any] = {"triton_shared_bytes": [int(n) for n in _SHARED.findall(log)]}
    refused = [int(n) for n in _SHARED_LIMIT.findall(log)]
    if refused:
        out["triton_shared_refused_bytes"] = refused
    return out


def report(compiled, log: str | None = None) -> dict:
    """What a compiled program costs on each device.

    memory: bytes per device (arguments, outputs, aliased, temporaries, generated code; total =
      arguments + outputs - aliased + temporaries), from memory_analysis().
    flops, bytes_accessed: XLA's cost_analysis() where the backend gives one (Pallas kernels
      count as zero FLOPs there).
    collectives: each collective in the compiled module (all-gather, all-reduce, reduce-scatter,
      all-to-all, collective-permute; async ones by their -start), with its result shape.
    kernels: each Pallas kernel's custom call: kind (mosaic / triton), name, Mosaic's reserved
      VMEM bytes (vmem_bytes), Triton's num_warps / num_stages / grid.
    triton_shared_bytes: with `log` (the text `compiler_log` captured around the compile, in a
      process started with KERNEL_LOG_ENV), the shared memory of each Triton kernel compiled.
    """
    text = compiled.as_text()
    collectives, kernels = [], []
    for line in text.splitlines():
        m = _COLLECTIVE.match(line)
        if m:
            collectives.append({"op": m.group("op"), "shape": m.group("shape").strip()})
            continue
        m = _CUSTOM_CALL.search(line)
        if m and m.group("target") in _KERNEL_NAMES:
            kernels.append(_kernel(line, m.group("target")))
    counts: dict[str, int] = {}
    for c in collectives:
        counts[c["op"]] = counts.get(c["op"], 0) + 1
    rep = {"memory": _memory(compiled), **_cost(compiled), "collectives": collectives,
           "collective_counts": counts, "kernels": kernels}
    if log is not None:
        rep.update(shared_memory(log))
    return rep


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def format_report(rep: dict) -> str:
    """A few readable lines of `report(...)`."""
    lines = []
    mem = rep.get("memory")
    if mem:
        lines.append("memory per device: " + ", ".join(
            f"{k} {_mib(v)}" for k, v in mem.items()))
    if "flops" in rep:
        lines.append(f"flops {rep['flops']:.4g}, bytes accessed {rep.get('bytes_accessed', 0):.4g}")
    if rep["collective_counts"]:
        lines.append("collectives: " + ", ".join(
            f"{op} x{n}" for op, n in sorted(rep["collective_counts"].items())))
        for c in rep["collectives"][:20]:
            lines.append(f"  {c['op']}: {c['shape'][:120]}")
    for k in rep["kernels"]:
        extra = ", ".join(f"{key}={k[key]}" for key in
                          ("vmem_bytes", "num_warps", "num_stages") if key in k)
        lines.append(f"kernel {k['kind']} {k.get('name', k.get('op_name', ''))} {extra}".rstrip())
    if rep.get("triton_shared_bytes"):
        lines.append(f"triton shared memory: {rep['triton_shared_bytes']} bytes")
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    return json.dumps(rep, indent=1, sort_keys=True)
