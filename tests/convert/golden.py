"""What the golden tests share: run a reference script under the peers' torch, then compare a
converted memzoo model's logits (parallel form, prefill + token-by-token decoding) with the
reference's, and write the model back out to check the round trip."""
from __future__ import annotations

import json
import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS_PYTHON = os.path.join(ROOT, ".peers", "torch", "bin", "python")
TOL = 1e-4  # relative RMSE of float32 logits


def rel_rmse(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)))


def require_peers():
    if not os.path.isfile(PEERS_PYTHON):
        pytest.skip(f"the reference implementations are not built ({PEERS_PYTHON} missing); "
                    f"build them with: bash ../shared/peers/setup.sh .peers")


def run_reference(script: str, *args) -> None:
    """Run tests/convert/<script> under the peers' torch with JSON-able args."""
    require_peers()
    cmd = [PEERS_PYTHON, os.path.join(os.path.dirname(__file__), script)]
    cmd += [a if isinstance(a, str) else json.dumps(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


@nnx.jit
def _prefill(model, tokens, cache):
    return model.prefill(tokens, cache)


@nnx.jit
def _decode(model, token, cache):
    return model.decode_step(token, cache)


def check_logits(model, tokens, logits, split: int = 8) -> dict:
    """The converted model against the reference logits [b, t, v]: the parallel form, and a
    prefill of `split` tokens followed by token-by-token decoding from the cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    full = rel_rmse(_forward(model, tokens), logits)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    first, cache = _prefill(model, tokens[:, :split], cache)
    steps = [np.asarray(first)]
    for t in range(split, tokens.shape[1]):
        l_t, cache = _decode(model, tokens[:, t], cache)
        steps.append(np.asarray(l_t)[:, None])
    decoded = rel_rmse(np.concatenate(steps, axis=1), logits)
    assert full <= TOL, f"parallel logits: relative RMSE {full:.2e} > {TOL}"
    assert decoded <= TOL, f"decoded logits: relative RMSE {decoded:.2e} > {TOL}"
    return dict(full=full, decoded=decoded)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
