"""recurrentgemma's XLA scans, timed like benchmarks/linear_scan.py times ours; prints JSON.

Runs in the peers' venv (.peers/jax, built by shared/peers/setup.sh), where memzoo is not
installed; the harness starts it with PYTHONPATH at the repo root for benchmarks._timing only.

    .peers/jax/bin/python benchmarks/_peer_recurrentgemma.py --shape 8 4096 1024
"""
import argparse
import json

import jax
import jax.numpy as jnp
from recurrentgemma import common
from recurrentgemma.jax import scan

from benchmarks import _timing


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=3, required=True, metavar=("B", "T", "D"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=None)
    args = parser.parse_args()
    shape = tuple(args.shape)
    # The same inputs as benchmarks/linear_scan.make_inputs.
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.uniform(ka, shape, jnp.float32, 0.0, 0.5)
    b = jax.random.normal(kb, shape, jnp.float32)
    timing = dict(repeats=args.repeats, warmup=args.warmup, budget_s=args.budget)
    results = []
    for name in ("LINEAR_NATIVE", "ASSOCIATIVE_NATIVE"):
        scan_type = common.ScanType[name]

        # recurrentgemma takes the inputs first: linear_scan(x, a) with h_t = a_t h_{t-1} + x_t.
        def fn(x, a, scan_type=scan_type):
            return scan.linear_scan(x, a, scan_type=scan_type)

        fresh = jax.jit(fn)
        donated = jax.jit(fn, donate_argnums=0)
        grad = jax.jit(jax.grad(lambda x, a, fn=fn: jnp.sum(fn(x, a)[0]), argnums=(0, 1)))
        steps = {"fresh": _timing.fresh_step(fresh, b, a),
                 "donated": _timing.donated_step(donated, (jnp.copy(b), a), 0),
                 "fwd+bwd": _timing.fresh_step(grad, b, a)}
        for mode, step in steps.items():
            results.append({"scan_type": name, "mode": mode, **_timing.time_calls(step, **timing)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
