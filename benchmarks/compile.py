"""The compile matrix: every Pallas kernel compiled for real TPUs and GPUs, from a CPU.

    JAX_PLATFORMS=cpu python -m benchmarks compile [--targets v5e,h100] [--ops delta_rule]
        [--quick] [--known] [--dims 128] [--dtypes bfloat16] [--modes fwd+bwd]
        [--lengths 4096] [--timeout 120] [--json out.json] [--markdown out.md]

Each case is an op (and variant), a head / state / value dim where the op has one, a dtype, a
mode (fwd: the op's outputs; fwd+bwd: the gradients of their sum), a length, and a target from
pallas_kernels._aot.TARGETS, all with implementation="pallas". It is traced, lowered and compiled
for the target's compile-only device (libtpu's Mosaic for TPUs, XLA's Triton pipeline for GPUs).
Per case: compiled or not (and the error's first line), compile seconds, Mosaic's VMEM
reservation per kernel (TPU) or Triton's shared memory per kernel (GPU, from XLA's log), and the
per-device HBM XLA plans (memory_analysis).

Cases run in a worker process (restarted after a timeout or a crash), so one compile that hangs
costs `--timeout` seconds, not the run; the worker starts with the log settings that make XLA
report Triton's shared memory.

--quick: the largest dim of each op, bf16 and f32, fwd+bwd, one length (8192), v5e and h100.
--known: the cases issue 13 reported failing, on every target.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any

OPS = ("linear_scan", "chunked_linear_attention", "delta_rule", "selective_scan",
       "causal_conv1d", "memory_lookup", "flash_attention")
# (op, variant) pairs; the variant picks the op's options (gates).
VARIANTS = {
    "linear_scan": ("",),
    "chunked_linear_attention": ("no_gate", "scalar_gate", "vector_gate"),
    "delta_rule": ("plain", "gated"),
    "selective_scan": ("",),
    "causal_conv1d": ("",),
    "memory_lookup": ("",),
    # GQA (4 query heads per key/value head) and packed documents; "window": a 1024-token
    # sliding window (splash's local mask on TPU, XLA's path on GPU).
    "flash_attention": ("causal", "window"),
}
# The dim each op is swept over: head dim (key = value) of the attention-like ops, the SSM state
# of selective_scan, the value width of memory_lookup; None: the op has none (channels fixed).
DIMS = {
    "linear_scan": (None,),
    "chunked_linear_attention": (64, 128, 256),
    "delta_rule": (64, 128, 256),
    "selective_scan": (16, 64, 128, 256),
    "causal_conv1d": (None,),
    "memory_lookup": (256, 1024),
    "flash_attention": (64, 128, 256),
}
DTYPES = ("float32", "bfloat16")
MODES = ("fwd", "fwd+bwd")
LENGTHS = (4096, 16384, 65536)
BATCH, HEADS, CHANNELS, CONV_WIDTH = 2, 8, 1024, 4
TABLE_ROWS, BAG = 65536, 32


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    variant: str
    dim: int | None
    dtype: str
    mode: str
    length: int
    target: str
    batch: int = BATCH
    heads: int = HEADS

    @property
    def name(self) -> str:
        v = f"[{self.variant}]" if self.variant else ""
        return f"{self.op}{v}"

    def shape(self) -> str:
        if self.op in ("chunked_linear_attention", "delta_rule", "flash_attention"):
            return f"B{self.batch} T{self.length} H{self.heads} d{self.dim}"
        if self.op == "selective_scan":
            return f"B{self.batch} T{self.length} C{CHANNELS} N{self.dim}"
        if self.op == "memory_lookup":
            return f"{TABLE_ROWS}x{self.dim} table, {self.length} bags of {BAG}"
        return f"B{self.batch} T{self.length} C{CHANNELS}"


def _build(case: Case):
    """(function of arrays, [(shape, dtype)], indices of the float arguments to differentiate)."""
    import jax.numpy as jnp
    import pallas_kernels as pk

    dt = jnp.dtype(case.dtype)
    f32 = jnp.float32
    b, t, h, d = case.batch, case.length, case.heads, case.dim
    impl = "pallas"
    if case.op == "linear_scan":
        args = [((b, t, CHANNELS), dt)] * 2
        fn = lambda a, x: pk.linear_scan(a, x, implementation=impl)
    elif case.op == "chunked_linear_attention":
        args = [((b, t, h, d), dt)] * 3
        if case.variant == "scalar_gate":
            args.append(((b, t, h), f32))
        elif case.variant == "vector_gate":
            args.append(((b, t, h, d), f32))
        gated = case.variant != "no_gate"
        fn = lambda q, k, v, *g: pk.chunked_linear_attention(
            q, k, v, log_gate=g[0] if gated else None, implementation=impl)
    elif case.op == "delta_rule":
        args = [((b, t, h, d), dt)] * 3 + [((b, t, h), dt)]
        gated = case.variant == "gated"
        if gated:
            args.append(((b, t, h), f32))
        fn = lambda q, k, v, beta, *g: pk.delta_rule(
            q, k, v, beta, log_gate=g[0] if gated else None, implementation=impl)
    elif case.op == "flash_attention":
        args = [((b, t, h, d), dt), ((b, t, h // 4, d), dt), ((b, t, h // 4, d), dt),
                ((b, t), jnp.int32)]
        window = 1024 if case.variant == "window" else None
        fn = lambda q, k, v, seg: pk.flash_attention(q, k, v, segment_ids=seg, window=window,
                                                     implementation=impl)
    elif case.op == "selective_scan":
        c, n = CHANNELS, d
        # Mamba-1 as its block calls it: softplus(delta + bias), D skip, silu(z) gate.
        args = [((b, t, c), dt), ((b, t, c), dt), ((c, n), f32), ((b, t, n), dt), ((b, t, n), dt),
                ((c,), f32), ((b, t, c), dt), ((c,), f32)]
        fn = lambda u, delta, A, B, C, D, z, bias: pk.selective_scan(
            u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
            implementation=impl)
    elif case.op == "causal_conv1d":
        args = [((b, t, CHANNELS), dt), ((CONV_WIDTH, CHANNELS), dt), ((CHANNELS,), dt)]
        fn = lambda x, w, bias: pk.causal_conv1d(x, w, bias=bias, activation="silu",
                                                 implementation=impl)
    elif case.op == "memory_lookup":
        args = [((TABLE_ROWS, d), dt), ((t, BAG), jnp.int32), ((t, BAG), dt)]
        fn = lambda values, idx, w: pk.memory_lookup(values, idx, w, implementation=impl)
    else:
        raise ValueError(f"compile: unknown op {case.op!r}; expected one of {OPS}")
    diff = [i for i, (_, a_dt) in enumerate(args) if jnp.issubdtype(a_dt, jnp.floating)]
    return fn, args, diff


def _program(case: Case):
    import jax
    import jax.numpy as jnp
    fn, args, diff = _build(case)
    if case.mode == "fwd":
        return fn, args

    def loss(*xs):
        out = fn(*xs)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(out))
    return jax.value_and_grad(loss, argnums=tuple(diff)), args


def _cpu_seconds() -> float:
    """CPU seconds of this process's threads and of its finished children: less at the mercy of
    a shared machine's load than the wall clock. The children matter: XLA's GPU compiler runs
    ptxas as a subprocess, and for the Triton kernels ptxas is most of the compile (66 s of the
    A100 delta_rule backward's)."""
    import resource
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_case(case: Case) -> dict[str, Any]:
    """Compiles one case in this process (which should have KERNEL_LOG_ENV set) -> a result row."""
    from pallas_kernels import _aot
    row: dict[str, Any] = {**dataclasses.asdict(case), "shape": case.shape()}
    if not _aot.available(case.target):
        row.update(status="unavailable", error=f"no compiler plugin for {case.target}")
        return row
    fn, args = _program(case)
    abstract = [_aot.abstract(s, d, case.target) for s, d in args]
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    log: list = []
    try:
        with _aot.compiler_log() as log:
            compiled, seconds = _aot.compile(fn, *abstract)
        row["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 2)
    except Exception as e:  # the compiler's refusal is the result
        row.update(status="failed", seconds=round(time.perf_counter() - start, 2),
                   error=_aot.first_line(e))
        shared = _aot.shared_memory((log[0] if log else "") + "\n" + str(e))
        if shared.get("triton_shared_refused_bytes"):
            row["shared_refused_bytes"] = max(shared["triton_shared_refused_bytes"])
        return row
    rep = _aot.report(compiled, log=log[0] if log else "")
    vmem = [k["vmem_bytes"] for k in rep["kernels"] if "vmem_bytes" in k]
    shared = rep.get("triton_shared_bytes") or []
    row.update(status="ok", seconds=round(seconds, 2),
               kernels=len(rep["kernels"]),
               vmem_bytes=max(vmem) if vmem else None,
               shared_bytes=max(shared) if shared else None,
               hbm_bytes=(rep["memory"] or {}).get("total"),
               temp_bytes=(rep["memory"] or {}).get("temporaries"))
    return row


def _worker(inbox, outbox):
    import queue
    parent = os.getppid()
    while True:
        try:
            case = inbox.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the run was killed: do not outlive it
                return
            continue
        if case is None:
            return
        try:
            outbox.put(run_case(case))
        except BaseException as e:  # noqa: BLE001 -- report, keep serving
            from pallas_kernels import _aot
            outbox.put({**dataclasses.asdict(case), "shape": case.shape(), "status": "failed",
                        "error": _aot.first_line(e)})


class _Pool:
    """One worker process; restarted when a case times out or kills it."""

    def __init__(self):
        from pallas_kernels import _aot
        os.environ.update(_aot.KERNEL_LOG_ENV)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        self.ctx = mp.get_context("spawn")
        self.proc = None

    def _start(self):
        self.inbox, self.outbox = self.ctx.Queue(), self.ctx.Queue()
        self.proc = self.ctx.Process(target=_worker, args=(self.inbox, self.outbox), daemon=True)
        self.proc.start()

    def run(self, case: Case, timeout: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.inbox.put(case)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.outbox.get(timeout=1.0)
            except Exception:  # queue.Empty
                pass
            if not self.proc.is_alive() or time.monotonic() > deadline:
                timed_out = self.proc.is_alive()
                self.proc.kill()
                self.proc.join()
                code = self.proc.exitcode
                self.proc = None
                row = {**dataclasses.asdict(case), "shape": case.shape(), "status": "failed"}
                row["error"] = (f"timeout: no result in {timeout:.0f} s" if timed_out
                                else f"worker died (exit code {code})")
                return row

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            self.inbox.put(None)
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()


def known_cases(targets) -> list[Case]:
    """Issue 13's reported failures, on every target."""
    cases = []
    for target in targets:
        # Shared memory over the H100's 232,448 bytes (327,680 requested).
        cases.append(Case("delta_rule", "gated", 128, "float32", "fwd+bwd", 2048, target))
        # 202 s on the H100.
        cases.append(Case("delta_rule", "gated", 64, "float32", "fwd+bwd", 2048, target))
        # Mosaic: a bf16 row is not a whole (16, 128) tile.
        cases.append(Case("memory_lookup", "", 1024, "bfloat16", "fwd", 4096, target))
    return cases


def matrix(ops, targets, dims, dtypes, modes, lengths, quick) -> list[Case]:
    cases = []
    for op in ops:
        op_dims = DIMS[op]
        if quick:
            op_dims = op_dims[-1:]
        elif dims:
            op_dims = tuple(d for d in op_dims if d is None or d in dims) or op_dims[-1:]
        for target in targets:
            for variant in VARIANTS[op]:
                for d in op_dims:
                    for dtype in dtypes:
                        for mode in modes:
                            for length in lengths:
                                cases.append(Case(op, variant, d, dtype, mode, length, target))
    return cases


def _fmt_bytes(n):
    if n is None:
        return "-"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"


def markdown(rows) -> str:
    lines = ["| op | shape | dtype | mode | target | compiled | s (cpu s) | VMEM / smem per kernel (max) "
             "| HBM per device | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        on_chip = r.get("vmem_bytes") if r.get("vmem_bytes") is not None else r.get("shared_bytes")
        if r.get("shared_refused_bytes"):
            on_chip = r["shared_refused_bytes"]
        name = r["op"] + (f"[{r['variant']}]" if r.get("variant") else "")
        seconds = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        if r.get("cpu_seconds") is not None:
            seconds += f" ({r['cpu_seconds']:.1f})"
        err = (r.get("error") or "").replace("|", "/")[:160]
        lines.append(f"| {name} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['target']} | "
                     f"{'yes' if r['status'] == 'ok' else r['status']} | {seconds} | "
                     f"{_fmt_bytes(on_chip)} | {_fmt_bytes(r.get('hbm_bytes'))} | {err} |")
    return "\n".join(lines)


def _csv(text, cast=str):
    return tuple(cast(x) for x in text.split(",") if x) if text else ()


def main(argv=None) -> int:
    from pallas_kernels import _aot
    p = argparse.ArgumentParser(prog="python -m benchmarks compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=None, help=f"comma list of {','.join(_aot.TARGETS)}")
    p.add_argument("--ops", default=None, help=f"comma list of {','.join(OPS)}")
    p.add_argument("--dims", default=None, help="comma list of dims to keep (e.g. 128,256)")
    p.add_argument("--dtypes", default=None, help="float32,bfloat16")
    p.add_argument("--modes", default=None, help="fwd,fwd+bwd")
    p.add_argument("--lengths", default=None, help=f"default {','.join(map(str, LENGTHS))}")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--known", action="store_true", help="only issue 13's reported failures")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)
    targets = _csv(a.targets) or (("v5e", "h100") if a.quick else _aot.TARGETS)
    for t in targets:
        if t not in _aot.TARGETS:
            p.error(f"--targets: {t!r} is not one of {_aot.TARGETS}")
    ops = _csv(a.ops) or OPS
    for op in ops:
        if op not in OPS:
            p.error(f"--ops: {op!r} is not one of {OPS}")
    if a.known:
        cases = [c for c in known_cases(targets) if c.op in ops]
    else:
        cases = matrix(ops, targets, _csv(a.dims, int), _csv(a.dtypes) or DTYPES,
                       _csv(a.modes) or (("fwd+bwd",) if a.quick else MODES),
                       _csv(a.lengths, int) or ((8192,) if a.quick else LENGTHS), a.quick)
    print(f"compile: {len(cases)} cases", file=sys.stderr)
    pool = _Pool()
    rows = []
    try:
        for i, case in enumerate(cases):
            row = pool.run(case, a.timeout)
            rows.append(row)
            status = "ok" if row["status"] == "ok" else row.get("error", row["status"])
            print(f"[{i + 1}/{len(cases)}] {case.name} {case.shape()} {case.dtype} {case.mode} "
                  f"{case.target}: {row.get('seconds')} s (cpu {row.get('cpu_seconds')} s), vmem {row.get('vmem_bytes')}, "
                  f"smem {row.get('shared_bytes')}, {status}", file=sys.stderr, flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(rows, f, indent=1)
    finally:
        pool.close()
    table = markdown(rows)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")
    print(table)
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} compiled", file=sys.stderr)
    return 0
