"""The kernels on a real NVIDIA GPU: correctness against float64, then timings against fla's
Triton kernels and mamba-ssm's Triton SSD, in one process per case.

    python -m benchmarks.gpu --list                  the case names
    python -m benchmarks.gpu CASE [--json FILE]      one case: check, then time
    bash benchmarks/device.sh                        every case with a time limit each, the
                                                     kernel tests compiled natively, one table

Each case first checks memzoo's Pallas kernel (compiled for the GPU, not interpreted) against
the XLA path run in float64 on the same GPU, at a small shape, forward and all input gradients
(relative RMSE; the bound is the project's: float32 <= 1e-5 would need exact float32 matmuls,
and Triton's float32 dots run TF32, so float32 is held to 3e-3 here, bfloat16 to 2e-2; NaN never
passes). It then times at fla's benchmark shape, bf16 inputs: forward and forward+backward,
median of `--repeats` calls after warm-up, for implementation="pallas", "xla" and the peer
(torch CUDA events via triton.testing.do_bench, median). Peers missing on the machine read n/a.
"""
from __future__ import annotations

import argparse
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

# fla's ops benchmarks use [B, T, H, D] = [8, T, 16, 128]-class shapes; one long T here.
SHAPE = dict(B=8, T=4096, H=16, D=128)
SMALL = dict(B=2, T=200, H=2, D=64)


def _rng(seed):
    return np.random.default_rng(seed)


def _inputs(case, s, dtype, seed=0):
    """(memzoo arguments as numpy float64, kwargs) for a case at shape dict `s`."""
    r = _rng(seed)
    B, T, H, D = s["B"], s["T"], s["H"], s["D"]
    if case in ("linear_attention", "simple_gla", "gla", "delta_rule", "gated_delta_rule"):
        q = r.standard_normal((B, T, H, D))
        k = r.standard_normal((B, T, H, D))
        if case.endswith("delta_rule"):
            k = k / np.linalg.norm(k, axis=-1, keepdims=True)
        v = r.standard_normal((B, T, H, D))
        args = [q, k, v]
        kw = {}
        if case.endswith("delta_rule"):
            args.append(1 / (1 + np.exp(-r.standard_normal((B, T, H)))))
        if case in ("simple_gla", "gated_delta_rule"):
            kw["log_gate"] = -np.log1p(np.exp(-r.standard_normal((B, T, H)) - 2))
        if case == "gla":
            kw["log_gate"] = -np.log1p(np.exp(-r.standard_normal((B, T, H, D)) - 3)) / 4
        return args, kw
    if case == "selective_scan":
        C, N = H * D // 2, 16
        u = r.standard_normal((B, T, C))
        delta = r.standard_normal((B, T, C)) - 2
        A = -np.exp(r.standard_normal((C, N)) * 0.5)
        Bm = r.standard_normal((B, T, N))
        Cm = r.standard_normal((B, T, N))
        return [u, delta, A, Bm, Cm], {"delta_softplus": True}
    if case == "linear_scan":
        C = H * D
        return [r.uniform(0.5, 1.0, (B, T, C)), r.standard_normal((B, T, C))], {}
    if case == "causal_conv1d":
        C = H * D
        return [r.standard_normal((B, T, C)), r.standard_normal((4, C)) * 0.5], {}
    if case == "memory_lookup":
        rows, dim, bags, k = 65536, 1024, B * T // 4, 32
        if s is SMALL:
            rows, dim, bags, k = 512, 128, 64, 8
        return [r.standard_normal((rows, dim)) * 0.1, r.integers(0, rows, (bags, k)),
                r.standard_normal((bags, k))], {}
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


def _cast(case, args, kw, dtype):
    ints = INTEGER_ARGS.get(case, ())
    args = [jnp.asarray(a, jnp.int32 if i in ints else dtype) for i, a in enumerate(args)]
    kw = {k: jnp.asarray(v, jnp.float32 if dtype != jnp.float64 else dtype)
          for k, v in kw.items() if not isinstance(v, bool)} | \
         {k: v for k, v in kw.items() if isinstance(v, bool)}
    return args, kw


def _vjp_fn(case, implementation, kw, args):
    """(run(*args) -> outputs, fwdbwd(args, cotangents) -> (outputs, input gradients)); the
    integer arguments (memory_lookup's indices) are held fixed."""
    op = OPS[case]
    ints = INTEGER_ARGS.get(case, ())
    diff = [i for i in range(len(args)) if i not in ints]

    def run(*xs):
        out = op(*xs, **kw, implementation=implementation)
        return out if isinstance(out, tuple) else (out,)

    def fwdbwd(xs, cts):
        def on_diff(*d):
            full = list(xs)
            for i, x in zip(diff, d):
                full[i] = x
            return run(*full)
        outs, pull = jax.vjp(on_diff, *[xs[i] for i in diff])
        return outs, pull(tuple(cts))

    return run, fwdbwd


def _cotangents(outs, seed):
    r = _rng(seed)
    return [jnp.asarray(r.standard_normal(o.shape), o.dtype) for o in outs]


def _rel(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check(case):
    """Max relative RMSE (outputs, final state, every input gradient) of the compiled Pallas
    kernel against the XLA path in float64 on the same inputs, per input dtype."""
    np_args, np_kw = _inputs(case, SMALL, np.float64, seed=1)
    errors = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a, k = _cast(case, np_args, np_kw, dtype)
        run, fwdbwd = _vjp_fn(case, "pallas", k, a)
        cts = _cotangents(jax.eval_shape(run, *a), seed=2)
        outs, grads = jax.jit(fwdbwd)(a, cts)
        with jax.enable_x64(True):
            # the reference sees the same (rounded) inputs, in float64
            up = lambda x: (jnp.asarray(np.asarray(x, np.float64))
                            if jnp.issubdtype(x.dtype, jnp.floating) else x)
            a64 = [up(x) for x in a]
            k64 = {n: (up(v) if hasattr(v, "dtype") else v) for n, v in k.items()}
            run64, fwdbwd64 = _vjp_fn(case, "xla", k64, a64)
            ref_o, ref_g = jax.jit(fwdbwd64)(a64, [up(c) for c in cts])
            ref_o = [np.asarray(o) for o in ref_o]
            ref_g = [np.asarray(g) for g in ref_g]
        errors[name] = max([_rel(o, r) for o, r in zip(outs, ref_o)] +
                           [_rel(g, r) for g, r in zip(grads, ref_g)])
    return errors


def _median_ms(step, repeats):
    return time_calls(step, repeats=repeats, warmup=1)["median_ms"]


def time_ours(case, repeats):
    np_args, np_kw = _inputs(case, SHAPE, np.float32)
    a, k = _cast(case, np_args, np_kw, jnp.bfloat16)
    out = {}
    for impl in ("pallas", "xla"):
        run, fwdbwd = _vjp_fn(case, impl, k, a)
        cts = _cotangents(jax.eval_shape(run, *a), seed=2)
        fwd = jax.jit(run)
        both = jax.jit(fwdbwd)
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(*a))
            jax.block_until_ready(both(a, cts))
            out[f"{impl}_compile_s"] = round(time.perf_counter() - t0, 1)
            out[f"{impl}_fwd_ms"] = _median_ms(lambda: jax.block_until_ready(fwd(*a)), repeats)
            out[f"{impl}_fwdbwd_ms"] = _median_ms(lambda: jax.block_until_ready(both(a, cts)),
                                                  repeats)
        except Exception as e:  # noqa: BLE001 - a failing implementation is a table entry
            out[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def time_peer(case, repeats):
    """fla / mamba-ssm Triton kernels at the same shape, bf16, or {} when not importable."""
    try:
        import torch
        from triton.testing import do_bench
    except ImportError as e:
        return {"peer_error": f"torch/triton missing: {e}"}
    B, T, H, D = SHAPE["B"], SHAPE["T"], SHAPE["H"], SHAPE["D"]
    dev, bf = "cuda", torch.bfloat16

    def t(*shape, req=True):
        return torch.randn(*shape, device=dev, dtype=bf, requires_grad=req)

    try:
        if case == "linear_attention":
            from fla.ops.linear_attn import chunk_linear_attn
            q, k, v = t(B, T, H, D), t(B, T, H, D), t(B, T, H, D)
            name = "fla chunk_linear_attn"
            fn = lambda: chunk_linear_attn(q, k, v, normalize=False)[0]
        elif case == "simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla
            q, k, v = t(B, T, H, D), t(B, T, H, D), t(B, T, H, D)
            g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev)).requires_grad_()
            name = "fla chunk_simple_gla"
            fn = lambda: chunk_simple_gla(q, k, v, g=g)[0]
        elif case == "gla":
            from fla.ops.gla import chunk_gla
            q, k, v = t(B, T, H, D), t(B, T, H, D), t(B, T, H, D)
            g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device=dev)) / 16
                 ).requires_grad_()
            name = "fla chunk_gla"
            fn = lambda: chunk_gla(q, k, v, g=g)[0]
        elif case in ("delta_rule", "gated_delta_rule"):
            q, v = t(B, T, H, D), t(B, T, H, D)
            k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev), dim=-1) \
                .to(bf).requires_grad_()
            beta = torch.rand(B, T, H, device=dev, dtype=bf).requires_grad_()
            if case == "delta_rule":
                from fla.ops.delta_rule import chunk_delta_rule
                name = "fla chunk_delta_rule"
                fn = lambda: chunk_delta_rule(q, k, v, beta=beta)[0]
            else:
                from fla.ops.gated_delta_rule import chunk_gated_delta_rule
                g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev)) \
                    .requires_grad_()
                name = "fla chunk_gated_delta_rule"
                fn = lambda: chunk_gated_delta_rule(q, k, v, g=g, beta=beta)[0]
        else:
            return {"peer": "none on this machine (mamba-ssm's CUDA extensions need a build)"}
        fwd = do_bench(fn, warmup=25, rep=100, return_mode="median")
        do = torch.randn(B, T, H, D, device=dev, dtype=bf)
        fb = do_bench(lambda: fn().backward(do), warmup=25, rep=100, return_mode="median")
        return {"peer": name, "peer_fwd_ms": fwd, "peer_fwdbwd_ms": fb}
    except Exception as e:  # noqa: BLE001
        return {"peer_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--phase", choices=("check", "time", "all"), default="all",
                   help="check: correctness + compile the timed executables (fills JAX's "
                        "compilation cache; cases can run in parallel); time: the timings "
                        "(run cases one at a time)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help="append the result as one JSON line to FILE")
    a = p.parse_args(argv)
    if a.list:
        print(" ".join(OPS))
        return 0
    if a.case not in OPS:
        p.error(f"case must be one of {', '.join(OPS)}, got {a.case!r}")
    row = {"case": a.case, "phase": a.phase, "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "shape": SHAPE}
    if a.phase in ("check", "all"):
        try:
            row["check_rel_rmse"] = check(a.case)
        except Exception as e:  # noqa: BLE001
            row["check_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if a.phase in ("time", "all"):
        row.update(time_ours(a.case, a.repeats))
        row.update(time_peer(a.case, a.repeats))
    else:
        row.update(time_ours(a.case, 1))     # compiles (and caches) what the time phase runs
    line = json.dumps(row)
    print(line)
    if a.json:
        with open(a.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
