"""Two processes on localhost (jax.distributed, CPU collectives over gloo), one CPU device each,
train the same run as one process on one device: the same losses to float32 tolerance."""
import io
import json
import socket
import subprocess

import jax
import numpy as np

from tests.train.helpers import ROOT, losses, subprocess_env, tiny, train_command
from train.loop import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        argv = train_command(tmp_path / "two", "optim.steps=4") + [
            "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
            "--process_id", str(pid)]
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=subprocess_env(1),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "devices: 2 x cpu in 2 process(es)" in outs[0][0]
    rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    two = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    one = losses(run(tiny(tmp_path / "one", "optim.steps=4"), out=io.StringIO(),
                     devices=jax.devices()[:1]))
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5)
