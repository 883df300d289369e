"""dplr_delta_rule's XLA backward: its deviceless GPU compile time and its CPU time.

    JAX_PLATFORMS=cpu python -m benchmarks.dplr_backward compile [--target h100] [--module PATH]
    JAX_PLATFORMS=cpu python -m benchmarks.dplr_backward cpu [--module PATH]

`compile` compiles the backward alone (`xla.dplr_backward` from abstract inputs, float32,
B2 T512 H8 d64) for a compile-only device (pallas_kernels._aot; the venv with the CUDA plugin).
`cpu` times jitted forward + backward of the public op (implementation="xla") at B2 T1024 H4
d64 on the host: the median of a few runs after a warm-up. `--module PATH` swaps in the
`dplr_backward` of another copy of xla.py (e.g. an earlier commit's, from `git show`), so both
sides are measured by the same script.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.dplr_delta_rule import xla as _xla


def _backward(module):
    if module is None:
        return _xla.dplr_backward
    spec = importlib.util.spec_from_file_location("_dplr_xla_other", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.dplr_backward


def _cpu_seconds() -> float:
    """This process's CPU seconds and its finished children's (ptxas runs as a child)."""
    import resource
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def compile_time(target, module, shape=(2, 512, 8, 64, 64), chunk=64):
    from pallas_kernels import _aot
    batch, length, heads, kd, vd = shape
    backward = _backward(module)
    f32 = jnp.float32
    tk, tv, state = (batch, length, heads, kd), (batch, length, heads, vd), (batch, heads, kd, vd)
    shapes = [tk, tk, tv, tk, tk, tk, state, (batch, length),
              (batch, heads, -(-length // chunk), kd, vd), tv, state]
    args = [(s, f32) for s in shapes]   # q k v a b w h0 reset states do dfinal

    def fn(q, k, v, a, b, w, h0, reset, states, do, dfinal):
        return backward(q, k, v, a, b, w, h0, reset, states, do, dfinal, scale=kd ** -0.5,
                        chunk_size=chunk, segmented=True)

    cpu = _cpu_seconds()
    _, seconds = _aot.compile(fn, *(_aot.abstract(s, d, target) for s, d in args))
    return dict(target=target, shape=shape, wall_s=round(seconds, 1),
                cpu_s=round(_cpu_seconds() - cpu, 1))


def cpu_time(module, shape=(2, 1024, 4, 64, 64), repeats=5):
    from pallas_kernels import dplr_delta_rule
    if module is not None:
        _xla.dplr_backward = _backward(module)   # what the custom VJP calls
    batch, length, heads, kd, vd = shape
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(
        jax.random.normal(k, (batch, length, heads, kd)))
    kappa = unit(ks[2])
    xs = (jax.random.normal(ks[0], (batch, length, heads, kd)), unit(ks[1]),
          jax.random.normal(ks[4], (batch, length, heads, vd)), -kappa,
          kappa * jax.random.uniform(ks[3], kappa.shape),
          -jax.random.uniform(ks[5], kappa.shape, maxval=1.0))

    def loss(q, k, v, a, b, w):
        o, final = dplr_delta_rule(q, k, v, a, b, log_decay=w, implementation="xla")
        return jnp.sum(o ** 2) + jnp.sum(final)

    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
    start = time.perf_counter()
    jax.block_until_ready(step(*xs))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*xs))
        times.append(time.perf_counter() - start)
    return dict(shape=shape, first_call_s=round(first, 2),
                median_ms=round(1e3 * statistics.median(times), 1),
                runs_ms=[round(1e3 * t, 1) for t in times])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.dplr_backward", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("compile", "cpu"))
    p.add_argument("--target", default="h100")
    p.add_argument("--module", default=None, help="another xla.py whose dplr_backward to measure")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.mode == "compile":
        print(compile_time(args.target, args.module), flush=True)
    else:
        print(cpu_time(args.module, repeats=args.repeats), flush=True)


if __name__ == "__main__":
    main()
