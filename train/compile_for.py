"""python -m train --compile_for TARGET: a run's sharded train step compiled for a pod, without one.

    python -m train --preset lm350m_attention --compile_for v5e:4x4
    python -m train --preset lm1300m_mamba2 --compile_for h100x8

The step is the one `python -m train` runs (train/trainer.py `Trainer.jitted_steps`), with the
same mesh axes (config mesh: data, fsdp, tensor, sequence; their product must be the target's
device count) and the same shardings (train/mesh.py LOGICAL_AXIS_RULES) on compile-only devices.
The train state and the batch are abstract (`jax.eval_shape`; the batch layout from
`train.data.example_layout`): nothing is allocated and no data is read. Mixers keep
`implementation="auto"`, which picks at lowering time, so a TPU target compiles the Pallas
kernels into the step and a GPU target the ones `pallas_kernels._dispatch.AUTO_ON_CUDA` picks
(the scans; XLA's path for the chunked matmul ops).

The report: per-device memory (arguments, outputs, temporaries, donated-and-aliased, code; total
against the device's HBM), XLA's FLOPs per step per device (with layers scanned, XLA counts the
loop body once; 6 x parameters x tokens beside it), the collectives in the compiled module (kind,
count, bytes; a scanned body's appear once) and the seconds spent lowering and compiling. A step
that does not fit raises `DoesNotFit` naming the overflow ("temporaries 32.5 GiB ..."): the TPU
compiler itself refuses temporaries beyond HBM (CompileTimeHbmOom, turned into the same message);
other targets compile and the memory analysis is checked. `python -m train` then exits 1.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import time

import jax
import numpy as np

from configs.base import ConfigError, TrainConfig
from train import mesh as mesh_lib

GIB = 1024 ** 3


class DoesNotFit(ValueError):
    """The compiled step needs more memory per device than the target has."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: tuple
    device_kind: str
    hbm_bytes: int


def target_devices(spec: str) -> Target:
    """Compile-only devices for `spec` ("v5e:4x4", "h100x8", ...: pallas_kernels._aot) and the
    HBM of one."""
    from pallas_kernels import _aot
    name, _ = _aot.parse_spec(spec)
    if not _aot.available(spec):
        raise ValueError(f"--compile_for {spec!r}: this host cannot compile for {name} (TPU: "
                         "`pip install 'jax[tpu]'` for libtpu; GPU: `pip install "
                         "jax-cuda12-plugin`, and JAX_PLATFORMS=cpu so that JAX does not start "
                         "the plugin as a backend, which needs a GPU)")
    devices = tuple(_aot.devices(spec))
    hbm = _aot.hbm_bytes(name)
    return Target(spec, devices, devices[0].device_kind, hbm)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}


def _shape_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO result shape ("bf16[16,4096]{1,0}" or a tuple of them)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]", shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(aot_report: dict) -> dict[str, tuple[int, int]]:
    """kind -> (count, bytes of their results) from pallas_kernels._aot.report's collectives.
    An asynchronous one is counted once, by its -start, whose result holds operand and result."""
    found: dict[str, list[int]] = {}
    for c in aot_report["collectives"]:
        entry = found.setdefault(c["op"], [0, 0])
        entry[0] += 1
        entry[1] += _shape_bytes(c["shape"])
    return {k: (v[0], v[1]) for k, v in sorted(found.items())}
# ------------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


@dataclasses.dataclass
class CompileReport:
    """What one ahead-of-time compile of the train step shows (per device unless named)."""
    target: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    num_params: int
    global_batch: int
    seq_len: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops: float | None
    collectives: dict[str, tuple[int, int]]
    kernels: int                     # Pallas kernel calls (Mosaic / Triton) in the module
    lower_seconds: float
    compile_seconds: float
    scanned: bool = False            # layers in a loop: XLA's cost analysis counts its body once

    @property
    def model_flops(self) -> float:
        """6 x parameters x this device's tokens: the matmuls' forward + backward (no attention
        T^2 term, no recomputation); comparable across mixers and with XLA's count."""
        return 6 * self.num_params * self.global_batch * self.seq_len / self.num_devices

    @property
    def total_bytes(self) -> int:
        """Live at the peak: arguments + outputs (less what donation aliases) + temporaries +
        code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def parts(self) -> list[tuple[str, int]]:
        return [("arguments", self.argument_bytes), ("outputs", self.output_bytes),
                ("aliased (donated)", -self.alias_bytes), ("temporaries", self.temp_bytes),
                ("code", self.code_bytes)]

    def format(self) -> str:
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"compiled for {self.target} ({self.num_devices} x {self.device_kind}), mesh "
                 f"{mesh}: {self.num_params / 1e6:,.1f}M parameters, global batch "
                 f"{self.global_batch} x {self.seq_len} tokens",
                 f"  lowered in {self.lower_seconds:.1f} s, compiled in "
                 f"{self.compile_seconds:.1f} s",
                 "  memory per device:"]
        for name, size in self.parts():
            lines.append(f"    {name:<18} {_size(size):>12}")
        share = 100 * self.total_bytes / self.hbm_bytes
        lines.append(f"    {'total':<18} {_size(self.total_bytes):>12} of "
                     f"{self.hbm_bytes / GIB:.3g} GiB HBM ({share:.0f}%)"
                     f"{'' if self.fits else '  DOES NOT FIT'}")
        flops = "n/a" if self.flops is None else _flops(self.flops)
        lines.append(f"  FLOPs per step per device: {flops} (XLA cost analysis"
                     f"{'; a scanned layer loop counted once' if self.scanned else ''}), "
                     f"{_flops(self.model_flops)} (6 x parameters x tokens)")
        lines.append(f"  Pallas kernel calls in the module: {self.kernels}")
        if self.collectives:
            lines.append("  collectives in the compiled module (kind: count, result bytes):")
            for kind, (count, size) in self.collectives.items():
                lines.append(f"    {kind:<20} {count:5d}  {_size(size):>12}")
        else:
            lines.append("  collectives: none")
        return "\n".join(lines)

    def check_fits(self) -> None:
        """Raise DoesNotFit, naming the overflow, when the step needs more than the HBM."""
        if not self.fits:
            raise DoesNotFit(self.overflow_message())

    def overflow_message(self) -> str:
        parts = sorted(((n, s) for n, s in self.parts() if s > 0), key=lambda p: -p[1])
        listed = ", ".join(f"{n} {s / GIB:.1f} GiB" for n, s in parts)
        return (f"train step needs {self.total_bytes / GIB:.1f} GiB per device of {self.target} "
                f"({self.device_kind}, {self.hbm_bytes / GIB:.3g} GiB HBM): {listed}; {_ADVICE}")


_ADVICE = ("reduce data.batch_size / data.seq_len, enable model.remat, or shard more "
           "(mesh.fsdp, mesh.tensor)")


def _refusal_message(error: str, tgt: Target) -> str:
    """The TPU compiler refuses a program whose temporaries overflow HBM (CompileTimeHbmOom)
    before any memory analysis exists: its figures, in the report's words."""
    head = f"{tgt.name} ({tgt.device_kind}, {tgt.hbm_bytes / GIB:.3g} GiB HBM)"
    m = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", error)
    if m:
        return (f"train step needs {float(m.group(1)):.1f} GiB per device of {head}: temporaries "
                f"{float(m.group(1)):.1f} GiB alone exceed the {float(m.group(2)):.2f} GiB the "
                f"compiler can use (XLA refused it: CompileTimeHbmOom); {_ADVICE}")
    first = next((line for line in error.splitlines() if "RESOURCE_EXHAUSTED" in line), error)
    return f"train step does not fit on {head}: {first.strip()[:300]}; {_ADVICE}"


def resolve_mesh_sizes(config: TrainConfig, num_devices: int, target: str) -> dict[str, int]:
    """The config's mesh sizes for `num_devices` (-1 filled in); a ConfigError naming the mesh
    keys when their product is not the target's device count."""
    sizes = dict(zip(mesh_lib.MESH_AXES, (config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                          config.mesh.sequence)))
    fixed = math.prod(s for s in sizes.values() if s != -1)
    free = [k for k, s in sizes.items() if s == -1]
    if free and num_devices % fixed == 0:
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        given = " x ".join(f"mesh.{k}={v}" for k, v in sizes.items())
        raise ConfigError(f"{given} is {math.prod(sizes.values())} devices, but {target} has "
                          f"{num_devices}; set "
                          f"mesh.data, mesh.fsdp, mesh.tensor, mesh.sequence so their product is "
                          f"{num_devices} (one of them may be -1)")
    return sizes


def abstract_batch(config: TrainConfig, mesh) -> tuple[dict[str, jax.ShapeDtypeStruct], int,
                                                       int | None]:
    """The global batch as abstract arrays with the loop's shardings; (batch, vocab, classes).
    Never reads data (data.data_dir is not touched)."""
    from train import data
    d = config.data
    try:
        example, vocab_size, num_classes = data.example_layout(d.task, seq_len=d.seq_len,
                                                               **d.task_options)
    except ValueError as err:
        raise ConfigError(f"config key 'data.task': {err}") from None
    batch = {}
    for key, value in example.items():
        value = np.asarray(value)
        shape = (d.batch_size, *value.shape)
        batch[key] = jax.ShapeDtypeStruct(shape, value.dtype,
                                          sharding=mesh_lib.batch_sharding(mesh, len(shape)))
    return batch, vocab_size, num_classes


def compile_for(config: TrainConfig, target: str) -> CompileReport:
    """Lower and compile the train step of `config` for `target`; the report (module docstring).
    Raises ConfigError for a mesh that does not match the target."""
    from train.trainer import Trainer
    tgt = target_devices(target)
    sizes = resolve_mesh_sizes(config, len(tgt.devices), target)
    mesh = mesh_lib.make_mesh(config.mesh, tgt.devices)
    batch, vocab_size, num_classes = abstract_batch(config, mesh)
    if config.data.batch_size % (sizes["data"] * sizes["fsdp"]):
        raise ConfigError(f"config key 'data.batch_size': {config.data.batch_size} rows do not "
                          f"split over mesh.data x mesh.fsdp = {sizes['data'] * sizes['fsdp']}")
    trainer = Trainer(config, mesh, vocab_size=vocab_size, num_classes=num_classes)
    train_step, _ = trainer.jitted_steps(batch)
    from pallas_kernels import _aot
    t0 = time.perf_counter()
    with _aot.lowering(tgt.devices, mesh):
        lowered = train_step.lower(trainer.abstract_state, batch)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            raise DoesNotFit(_refusal_message(str(err), tgt)) from None
    t2 = time.perf_counter()
    rep = _aot.report(compiled)
    memory = rep["memory"]
    return CompileReport(
        target=target, device_kind=tgt.device_kind, num_devices=len(tgt.devices),
        mesh=dict(mesh.shape), num_params=trainer.num_params, global_batch=config.data.batch_size,
        seq_len=config.data.seq_len, argument_bytes=memory["arguments"],
        output_bytes=memory["outputs"], alias_bytes=memory["aliased"],
        temp_bytes=memory["temporaries"], code_bytes=memory["generated_code"],
        hbm_bytes=tgt.hbm_bytes, flops=rep.get("flops") or None,
        collectives=collectives(rep), kernels=len(rep["kernels"]),
        lower_seconds=t1 - t0, compile_seconds=t2 - t1,
        scanned=config.model.scan_layers and config.model.num_layers >= len(
            config.model.mixer.split(",")))


def main(config: TrainConfig, target: str, out=None) -> int:
    """The command: print the report; 1 (and the overflow named) when the step does not fit."""
    out = out or sys.stdout
    try:
        report = compile_for(config, target)
        print(report.format(), file=out, flush=True)
        report.check_fits()
    except DoesNotFit as err:
        print(f"python -m train: error: {err}", file=sys.stderr)
        return 1
    return 0
