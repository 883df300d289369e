"""What the golden tests share: run a reference script under the peers' torch, then compare a
converted memzoo model's logits (parallel form, prefill + token-by-token decoding) with the
reference's, and write the model back out to check the round trip."""
from __future__ import annotations

import json
import os
import subprocess

import jax.numpy as jnp
import numpy as np

from tests.memzoo.helpers import forward, lm_prefill_then_decode, peers_missing, relative_rmse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS_PYTHON = os.path.join(ROOT, ".peers", "torch", "bin", "python")
TOL = 1e-4  # relative RMSE of float32 logits


def require_peers():
    if not os.path.isfile(PEERS_PYTHON):
        peers_missing(f"the reference implementations are not built ({PEERS_PYTHON} missing); "
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


def check_logits(model, tokens, logits, split: int = 8) -> dict:
    """The converted model against the reference logits [b, t, v]: the parallel form, and a
    prefill of `split` tokens followed by token-by-token decoding from the cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    full = relative_rmse(forward(model, tokens), logits)
    decoded = relative_rmse(lm_prefill_then_decode(model, tokens, split), logits)
    assert full <= TOL, f"parallel logits: relative RMSE {full:.2e} > {TOL}"
    assert decoded <= TOL, f"decoded logits: relative RMSE {decoded:.2e} > {TOL}"
    return dict(full=full, decoded=decoded)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


def assert_golden_round_trip(script: str, tmp_path, *args):
    """The reference script builds and saves its model under tmp_path with its logits; memzoo
    loads the checkpoint and must give those logits (parallel and decoded), write the same
    tensors back, and the reference must load what memzoo wrote and give the same logits again.
    Returns the directory memzoo wrote."""
    from memzoo.convert import load_checkpoint, read_tensors, save_checkpoint
    run_reference(script, str(tmp_path), *args)
    ref = np.load(tmp_path / "reference.npz")
    model, config = load_checkpoint(str(tmp_path / "checkpoint"))
    check_logits(model, ref["tokens"], ref["logits"])
    out = tmp_path / "written"
    save_checkpoint(model, config, str(out))
    assert_same_tensors(read_tensors(str(out))[0], read_tensors(str(tmp_path / "checkpoint"))[0])
    run_reference(script, str(tmp_path), "reload", str(out))
    return out
