"""The kernels on a real NVIDIA GPU: correctness against float64, then timings of memzoo's
Mosaic GPU and Triton kernels, the XLA path and fla's Triton kernels, in one process per case.

    python -m benchmarks.gpu --list [--mosaic-only]  the case names
    python -m benchmarks.gpu CASE [--json FILE]      one case: compile, check, then time
    python -m benchmarks.gpu CASE --dry-run h100     lower every program of the case for a
                                                     compile-only GPU (a CPU host) and print
                                                     which Pallas kernels each one holds
    python -m benchmarks.gpu --table FILE            the RESULTS table from the JSON lines
    bash benchmarks/device.sh                        every case in parallel, the kernel tests
                                                     compiled natively, one table

The implementations: "mosaic" and "triton" are implementation="pallas" inside
`gpu_backend("mosaic")` / `gpu_backend("triton")` (the ops with a Mosaic GPU kernel only; the
other cases have "triton" alone), "xla" is implementation="xla", "fla" is fla's chunk_* Triton
kernel. Every program is lowered inside its backend's context (jit's trace cache does not see
`gpu_backend`) and compiled ahead of time, in threads; which kernels each program holds
(mosaic_gpu / triton custom calls, in program order) is recorded, so a call the Mosaic GPU
kernel does not cover shows up as Triton instead of being timed under the wrong name.

Check: each Pallas backend's compiled kernel against the XLA path run in float64 on the same GPU
at a small shape, outputs and every input gradient (log gates included), relative RMSE (float32
inputs: the kernels' TF32x3 / split-bf16 products, bfloat16 inputs). Timing: bf16 inputs at
fla's benchmark shapes (SHAPES: B4 T4096 H16 d128 and B8 T2048 H16 d64; the scans get H*D
channels), forward and forward+backward (the output's cotangent only, as fla's `.backward(do)`),
median of `--repeats` calls after warm-up; fla by triton.testing.do_bench (median). Timings run
under an exclusive lock on `--gpu-lock` so that cases compiled in parallel are timed one at a
time (fla's compile and autotuning run outside it, so they may overlap another case's timings).
Missing peers read n/a.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from benchmarks._timing import time_calls
from pallas_kernels import _dispatch
from pallas_kernels._testing import custom_calls

# fla's ops benchmarks ([B, T, H, D]); B1 T8192 H96 D128 is too big for some kernels.
SHAPES = {"d128": dict(B=4, T=4096, H=16, D=128), "d64": dict(B=8, T=2048, H=16, D=64)}
SMALL = dict(B=2, T=200, H=2, D=64)

MOSAIC_CASES = ("linear_attention", "simple_gla", "gla", "delta_rule", "gated_delta_rule",
                "linear_scan", "selective_scan")
# name: (implementation=, gpu_backend)
BACKENDS = {"mosaic": ("pallas", "mosaic"), "triton": ("pallas", "triton"), "xla": ("xla", None)}
KERNEL_KINDS = {"mosaic_gpu_v2": "mosaic_gpu", "mosaic_gpu": "mosaic_gpu",
                "__gpu$xla.gpu.triton": "triton"}


def implementations(case):
    return ("mosaic", "triton", "xla") if case in MOSAIC_CASES else ("triton", "xla")


def _inputs(case, s, seed=0, dtype=np.float64):
    """(positional arrays, keyword arrays, static keywords) of a case at shape dict `s`."""
    r = np.random.default_rng(seed)
    B, T, H, D = s["B"], s["T"], s["H"], s["D"]
    normal = lambda *shape: r.standard_normal(shape, dtype=dtype)
    if case in ("linear_attention", "simple_gla", "gla", "delta_rule", "gated_delta_rule"):
        q, k, v = normal(B, T, H, D), normal(B, T, H, D), normal(B, T, H, D)
        if case.endswith("delta_rule"):
            k = k / np.linalg.norm(k, axis=-1, keepdims=True)
        args, kw = [q, k, v], {}
        if case.endswith("delta_rule"):
            args.append(1 / (1 + np.exp(-normal(B, T, H))))
        if case in ("simple_gla", "gated_delta_rule"):
            kw["log_gate"] = -np.log1p(np.exp(-normal(B, T, H) - 2))
        if case == "gla":
            kw["log_gate"] = -np.log1p(np.exp(-normal(B, T, H, D) - 3)) / 4
        return args, kw, {}
    if case == "selective_scan":
        C, N = H * D // 2, 16
        return ([normal(B, T, C), normal(B, T, C) - 2, -np.exp(normal(C, N) * 0.5),
                 normal(B, T, N), normal(B, T, N)], {}, {"delta_softplus": True})
    if case == "linear_scan":
        C = H * D
        return [r.uniform(0.5, 1.0, (B, T, C)).astype(dtype), normal(B, T, C)], {}, {}
    if case == "causal_conv1d":
        C = H * D
        return [normal(B, T, C), normal(4, C) * 0.5], {}, {}
    if case == "memory_lookup":
        rows, dim, bags, k = 65536, 1024, B * T // 4, 32
        if s is SMALL:
            rows, dim, bags, k = 512, 128, 64, 8
        return [normal(rows, dim) * 0.1, r.integers(0, rows, (bags, k)), normal(bags, k)], {}, {}
    raise ValueError(f"unknown case {case!r}")


OPS = {
    "linear_attention": pk.chunked_linear_attention,
    "simple_gla": pk.chunked_linear_attention,
    "gla": pk.chunked_linear_attention,
    "delta_rule": pk.delta_rule,
    "gated_delta_rule": pk.delta_rule,
    "selective_scan": pk.selective_scan,
    "linear_scan": pk.linear_scan,
    "causal_conv1d": pk.causal_conv1d,
    "memory_lookup": pk.memory_lookup,
}
INTEGER_ARGS = {"memory_lookup": (1,)}
PEERS = {"linear_attention": "fla chunk_linear_attn", "simple_gla": "fla chunk_simple_gla",
         "gla": "fla chunk_gla", "delta_rule": "fla chunk_delta_rule",
         "gated_delta_rule": "fla chunk_gated_delta_rule"}


def _cast(case, args, kw, dtype):
    """Every array as one flat list (positional, then keyword in `kw`'s order): the gates are
    jit arguments, not constants XLA would fold at trace time. Gates stay float32."""
    ints = INTEGER_ARGS.get(case, ())
    xs = [jnp.asarray(a, jnp.int32 if i in ints else dtype) for i, a in enumerate(args)]
    gate = dtype if dtype == jnp.float64 else jnp.float32
    return xs + [jnp.asarray(v, gate) for v in kw.values()]


def _functions(case, implementation, names, static, first_output_only=False):
    """(run(*xs) -> outputs, fwdbwd(xs, cts) -> (outputs, gradients of every float argument));
    `names` are the keyword names of the trailing arrays of xs."""
    op = OPS[case]
    ints = INTEGER_ARGS.get(case, ())

    def run(*xs):
        npos = len(xs) - len(names)
        out = op(*xs[:npos], **dict(zip(names, xs[npos:])), **static,
                 implementation=implementation)
        out = out if isinstance(out, tuple) else (out,)
        return out[:1] if first_output_only else out

    def fwdbwd(xs, cts):
        diff = [i for i in range(len(xs)) if i not in ints]

        def on_diff(*d):
            full = list(xs)
            for i, x in zip(diff, d):
                full[i] = x
            return run(*full)
        outs, pull = jax.vjp(on_diff, *[xs[i] for i in diff])
        return outs, pull(tuple(cts))

    return run, fwdbwd


def _cotangents(outs, seed):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal(o.shape), o.dtype) for o in outs]


def _abstract(tree, devices):
    if devices is None:
        return tree
    from pallas_kernels import _aot
    return jax.tree.map(lambda x: _aot.abstract(x.shape, x.dtype, devices[0]), tree)


def _lower(fn, args, backend, devices=None):
    """(lowered program, its Pallas kernels in program order), traced inside gpu_backend."""
    ctx = _dispatch.gpu_backend(backend) if backend else contextlib.nullcontext()
    if devices is not None:
        from pallas_kernels import _aot
        ctx2 = _aot.lowering(devices)
    else:
        ctx2 = contextlib.nullcontext()
    with ctx, ctx2:
        lowered = jax.jit(fn).lower(*_abstract(args, devices))
    kinds = [KERNEL_KINDS[c] for c in custom_calls(lowered.as_text()) if c in KERNEL_KINDS]
    return lowered, kinds


def programs(case, shape_names, check=True):
    """Every program a case runs: {key: dict(fn, args, backend, ...)}; keys are
    ("check", impl, dtype), ("check64", dtype) and (shape, impl, "fwd" | "fwdbwd")."""
    progs = {}
    impls = implementations(case)
    if check:
        np_args, np_kw, static = _inputs(case, SMALL, seed=1)
        names = list(np_kw)
        for dname, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            xs = _cast(case, np_args, np_kw, dtype)
            for impl in impls:
                if impl == "xla":
                    continue
                implementation, backend = BACKENDS[impl]
                run, fwdbwd = _functions(case, implementation, names, static)
                cts = _cotangents(jax.eval_shape(run, *xs), seed=2)
                progs[("check", impl, dname)] = dict(fn=fwdbwd, args=(xs, cts), backend=backend)
            # the reference sees the same (rounded) inputs and cotangents, in float64
            progs[("check64", dname)] = dict(fn=None, args=(xs, cts), names=names,
                                             static=static)
    for shape in shape_names:
        np_args, np_kw, static = _inputs(case, SHAPES[shape], dtype=np.float32)
        names = list(np_kw)
        xs = _cast(case, np_args, np_kw, jnp.bfloat16)
        del np_args, np_kw
        for impl in impls:
            implementation, backend = BACKENDS[impl]
            run, fwdbwd = _functions(case, implementation, names, static,
                                     first_output_only=True)
            cts = _cotangents(jax.eval_shape(run, *xs), seed=2)
            progs[(shape, impl, "fwd")] = dict(fn=run, args=tuple(xs), backend=backend)
            progs[(shape, impl, "fwdbwd")] = dict(fn=fwdbwd, args=(xs, cts), backend=backend)
    return progs


def _rel(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _reference(case, prog):
    """Outputs and gradients of the XLA path in float64 on the check program's inputs."""
    xs, cts = prog["args"]
    with jax.enable_x64(True):
        up = lambda x: (jnp.asarray(np.asarray(x, np.float64))
                        if jnp.issubdtype(x.dtype, jnp.floating) else x)
        _, fwdbwd64 = _functions(case, "xla", prog["names"], prog["static"])
        outs, grads = jax.jit(fwdbwd64)([up(x) for x in xs], [up(c) for c in cts])
        return [np.asarray(o) for o in outs], [np.asarray(g) for g in grads]


def _error(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _compile_all(progs, threads):
    """Lowers every program (main thread: the gpu_backend context is a contextvar) and compiles
    them in `threads` threads (XLA, Triton and ptxas run outside the GIL); sets each
    program's "kernels", "exe" and "compile_s", or its "error"."""
    lowered = {}
    for key, p in progs.items():
        if p.get("fn") is None:
            continue
        try:
            lowered[key], p["kernels"] = _lower(p["fn"], p["args"], p["backend"])
        except Exception as e:  # noqa: BLE001 - a failing program is a table entry
            p["error"] = _error(e)

    def compile_one(key):
        t0 = time.perf_counter()
        exe = lowered[key].compile()
        return exe, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        futures = {pool.submit(compile_one, k): k for k in lowered}
        for f in concurrent.futures.as_completed(futures):
            key = futures[f]
            try:
                progs[key]["exe"], progs[key]["compile_s"] = f.result()
            except Exception as e:  # noqa: BLE001
                progs[key]["error"] = _error(e)


def check(case, progs):
    """{impl: {dtype: max relative RMSE over outputs and input gradients, "kernels": ...}}."""
    result = {}
    for dname in ("float32", "bfloat16"):
        try:
            ref_o, ref_g = _reference(case, progs[("check64", dname)])
        except Exception as e:  # noqa: BLE001
            result.setdefault("reference_error", _error(e))
            continue
        for impl in implementations(case):
            p = progs.get(("check", impl, dname))
            if p is None:
                continue
            entry = result.setdefault(impl, {})
            entry[f"kernels_{dname}"] = p.get("kernels")
            if "exe" not in p:
                entry[dname] = p.get("error", "not compiled")
                continue
            try:
                outs, grads = p["exe"](*p["args"])
                entry[dname] = max([_rel(o, r) for o, r in zip(outs, ref_o)] +
                                   [_rel(g, r) for g, r in zip(grads, ref_g)])
            except Exception as e:  # noqa: BLE001
                entry[dname] = _error(e)
    return result


def time_ours(progs, shape, impls, repeats):
    out = {}
    for impl in impls:
        entry = out.setdefault(impl, {})
        for mode in ("fwd", "fwdbwd"):
            p = progs[(shape, impl, mode)]
            entry[f"kernels_{mode}"] = p.get("kernels")
            if "exe" not in p:
                entry[f"{mode}_error"] = p.get("error", "not compiled")
                continue
            entry[f"{mode}_compile_s"] = round(p["compile_s"], 1)
            exe, args = p["exe"], p["args"]
            try:
                entry[f"{mode}_ms"] = time_calls(lambda: jax.block_until_ready(exe(*args)),
                                                 repeats=repeats, warmup=2)["median_ms"]
            except Exception as e:  # noqa: BLE001
                entry[f"{mode}_error"] = _error(e)
    return out


def peer(case, shape):
    """fla's Triton kernel at `shape`, bf16: (fwd(), fwdbwd()) to time, or an error string."""
    if case not in PEERS:
        return "none (mamba-ssm's CUDA extensions need a build)"
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        return f"torch missing: {e}"
    B, T, H, D = (SHAPES[shape][n] for n in "BTHD")
    dev, bf = "cuda", torch.bfloat16

    def t(*s):
        return torch.randn(*s, device=dev, dtype=bf, requires_grad=True)

    try:
        q, v = t(B, T, H, D), t(B, T, H, D)
        if case in ("linear_attention", "simple_gla", "gla"):
            k = t(B, T, H, D)
        if case == "linear_attention":
            from fla.ops.linear_attn import chunk_linear_attn
            fn = lambda: chunk_linear_attn(q, k, v, normalize=False)[0]
        elif case == "simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla
            g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 2).requires_grad_()
            fn = lambda: chunk_simple_gla(q, k, v, g=g)[0]
        elif case == "gla":
            from fla.ops.gla import chunk_gla
            g = (F.logsigmoid(torch.randn(B, T, H, D, device=dev) + 3) / 4).requires_grad_()
            fn = lambda: chunk_gla(q, k, v, g=g)[0]
        else:
            k = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(bf).requires_grad_()
            beta = torch.rand(B, T, H, device=dev, dtype=bf).requires_grad_()
            if case == "delta_rule":
                from fla.ops.delta_rule import chunk_delta_rule
                fn = lambda: chunk_delta_rule(q, k, v, beta=beta)[0]
            else:
                from fla.ops.gated_delta_rule import chunk_gated_delta_rule
                g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 2).requires_grad_()
                fn = lambda: chunk_gated_delta_rule(q, k, v, g=g, beta=beta)[0]
        do = torch.randn(B, T, H, D, device=dev, dtype=bf)
        fn().backward(do)       # compiles and autotunes (outside the GPU lock)
        torch.cuda.synchronize()
        return fn, lambda: fn().backward(do)
    except Exception as e:  # noqa: BLE001
        return _error(e)


def time_peer(fns):
    if isinstance(fns, str):
        return {"peer_error": fns}
    fwd, fwdbwd = fns
    try:
        from triton.testing import do_bench
        return {"fwd_ms": do_bench(fwd, warmup=25, rep=100, return_mode="median"),
                "fwdbwd_ms": do_bench(fwdbwd, warmup=25, rep=100, return_mode="median")}
    except Exception as e:  # noqa: BLE001
        return {"peer_error": _error(e)}


@contextlib.contextmanager
def gpu_lock(path):
    """Exclusive use of the GPU among the case processes (flock on `path`; None: no lock)."""
    if not path:
        yield
        return
    import fcntl
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dry_run(case, target, shape_names, check_too=True):
    """Lowers (no compile, no run) every program of a case for compile-only devices of
    `target` and returns {key: kernels} (or the error)."""
    from pallas_kernels import _aot
    devices = _aot.devices(target)
    out = {}
    for key, p in programs(case, shape_names, check=check_too).items():
        if p.get("fn") is None:
            continue
        try:
            out["/".join(key)] = _lower(p["fn"], p["args"], p["backend"], devices)[1]
        except Exception as e:  # noqa: BLE001
            out["/".join(key)] = _error(e)
    return out


def run_case(case, shape_names, repeats, threads, lock, emit):
    """Compile everything, check (under the lock), then per shape: memzoo's timings under the lock (one "time"
    line), fla compiled and autotuned outside it, its timing under it (one "peer" line); each
    line is written when done, so a case stopped by a time limit keeps what it finished."""
    head = {"case": case, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    t0 = time.perf_counter()
    progs = programs(case, shape_names)
    _compile_all(progs, threads)
    head["compile_wall_s"] = round(time.perf_counter() - t0, 1)
    with gpu_lock(lock):    # small, but it would still disturb another case's timings
        emit(head | {"phase": "check", "check": check(case, progs)})
    for shape in shape_names:
        with gpu_lock(lock):
            row = head | {"phase": "time", "shape": shape, "dims": SHAPES[shape]}
            row.update(time_ours(progs, shape, implementations(case), repeats))
        emit(row)
    for shape in shape_names:
        fns = peer(case, shape)
        with gpu_lock(lock):
            emit(head | {"phase": "peer", "shape": shape,
                         "fla": time_peer(fns) | {"name": PEERS.get(case)}})


def _fmt(x):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)[:50]


def _pair(entry, a="fwd_ms", b="fwdbwd_ms"):
    entry = entry or {}
    return f"{_fmt(entry.get(a, entry.get(a.replace('_ms', '_error'))))} / " \
           f"{_fmt(entry.get(b, entry.get(b.replace('_ms', '_error'))))}"


def _kernels(entry):
    short = {"mosaic_gpu": "M", "triton": "T"}
    ks = [(entry or {}).get(f"kernels_{m}") for m in ("fwd", "fwdbwd")]
    # "-": no Pallas kernel in the program (the XLA path)
    return " / ".join("-".join(short[k] for k in x) if x else ("-" if x == [] else "?")
                      for x in ks)


def _ratio(a, b, key):
    x, y = (a or {}).get(key), (b or {}).get(key)
    return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) and y > 0 else "n/a"


def table(rows):
    """The RESULTS tables (markdown) from the JSON rows."""
    first = next((r for r in rows if "device" in r), {})
    lines = [f"{first.get('device', '?')}, JAX {first.get('jax', '?')}, bf16, medians; "
             f"kernels: M = Mosaic GPU, T = Triton, - = none (fwd / fwd+bwd)", "",
             "| op | shape | mosaic fwd / fwd+bwd ms | kernels | triton fwd / fwd+bwd ms | "
             "xla fwd / fwd+bwd ms | fla fwd / fwd+bwd ms | mosaic / fla fwd, fwd+bwd | "
             "mosaic / triton fwd, fwd+bwd |", "|---|---|---|---|---|---|---|---|---|"]
    peers = {(r["case"], r["shape"]): r.get("fla") or {} for r in rows if r.get("phase") == "peer"}
    for r in rows:
        if r.get("phase") != "time":
            continue
        m, t = r.get("mosaic"), r.get("triton")
        fla = peers.get((r["case"], r["shape"]), {"peer_error": "not run"})
        fla_s = _pair(fla) if "fwd_ms" in fla else _fmt(fla.get("peer_error"))
        lines.append(
            f"| {r['case']} | {r['shape']} | {_pair(m) if m else 'n/a'} | "
            f"{_kernels(m) if m else _kernels(t)} | {_pair(t)} | {_pair(r.get('xla'))} | "
            f"{fla_s} | {_ratio(m, fla, 'fwd_ms')}, {_ratio(m, fla, 'fwdbwd_ms')} | "
            f"{_ratio(m, t, 'fwd_ms')}, {_ratio(m, t, 'fwdbwd_ms')} |")
    lines += ["", "| op | mosaic f32 / bf16 (rel RMSE vs f64) | triton f32 / bf16 | kernels "
              "(mosaic f32 / bf16) |", "|---|---|---|---|"]
    for r in rows:
        if r.get("phase") != "check":
            continue
        c = r.get("check") or {}
        m, t = c.get("mosaic") or {}, c.get("triton") or {}
        short = {"mosaic_gpu": "M", "triton": "T"}
        ks = " / ".join("-".join(short[k] for k in (m.get(f"kernels_{d}") or []))
                        for d in ("float32", "bfloat16")) if m else "n/a"
        lines.append(f"| {r['case']} | "
                     f"{_fmt(m.get('float32')) if m else 'n/a'} / "
                     f"{_fmt(m.get('bfloat16')) if m else 'n/a'} | "
                     f"{_fmt(t.get('float32', c.get('reference_error')))} / "
                     f"{_fmt(t.get('bfloat16'))} | {ks} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--mosaic-only", action="store_true", help="--list: the Mosaic GPU ops only")
    p.add_argument("--shapes", default=os.environ.get("GPU_SHAPES", ",".join(SHAPES)),
                   help=f"comma-separated of {', '.join(SHAPES)} (env GPU_SHAPES)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=4, help="compile threads")
    p.add_argument("--gpu-lock", default=None, help="flock file serialising the timings")
    p.add_argument("--json", default=None, help="append each result as one JSON line to FILE")
    p.add_argument("--dry-run", default=None, metavar="TARGET",
                   help="lower every program for compile-only TARGET (e.g. h100), no GPU")
    p.add_argument("--table", default=None, metavar="FILE", help="print the tables of FILE")
    a = p.parse_args(argv)
    if a.list:
        print(" ".join(MOSAIC_CASES if a.mosaic_only else OPS))
        return 0
    if a.table:
        with open(a.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return 0
    if a.case not in OPS:
        p.error(f"case must be one of {', '.join(OPS)}, got {a.case!r}")
    shapes = [s for s in a.shapes.split(",") if s]
    if any(s not in SHAPES for s in shapes):
        p.error(f"--shapes: each must be one of {', '.join(SHAPES)}, got {a.shapes!r}")

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(line + "\n")

    if a.dry_run:
        emit({"case": a.case, "phase": "dry_run", "target": a.dry_run,
              "kernels": dry_run(a.case, a.dry_run, shapes)})
        return 0
    run_case(a.case, shapes, a.repeats, a.threads, a.gpu_lock, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
