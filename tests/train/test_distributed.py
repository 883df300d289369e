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


ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _port_taken(err: str) -> bool:
    """The coordinator could not bind its port (another process took it after _free_port)."""
    return any(m in err for m in ("ddress already in use", "Failed to add port"))


def _run_two(run_dir, first_port=None):
    """Both processes' (returncode, stdout, stderr). The port is picked and then bound by the
    coordinator later, so another process can take it in between: a bind failure is retried
    on a fresh port (and a fresh run dir), any other failure is returned as is."""
    for attempt in range(ATTEMPTS):
        port = first_port if attempt == 0 and first_port else _free_port()
        directory = run_dir / f"attempt{attempt}"
        procs = [subprocess.Popen(
            train_command(directory, "optim.steps=4") + [
                "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                "--process_id", str(pid)],
            cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for pid in range(2)]
        try:
            out0, err0 = procs[0].communicate(timeout=240)
            if procs[0].returncode != 0 and _port_taken(err0) and attempt + 1 < ATTEMPTS:
                procs[1].kill()
                procs[1].communicate()
                continue
            out1, err1 = procs[1].communicate(timeout=240)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        return directory, [(procs[0].returncode, out0, err0), (procs[1].returncode, out1, err1)]
    raise AssertionError("unreachable")


def test_two_processes_match_one(tmp_path):
    # The first attempt gets a port this test holds (what a racing process does to a port
    # picked by _free_port): the coordinator cannot bind it and the run is retried elsewhere.
    with socket.socket() as holder:
        holder.bind(("localhost", 0))
        holder.listen()
        directory, results = _run_two(tmp_path / "two", first_port=holder.getsockname()[1])
    assert directory.name != "attempt0"
    outs = [(out, err) for _, out, err in results]
    for rc, _, err in results:
        assert rc == 0, err[-4000:]
    assert "devices: 2 x cpu in 2 process(es)" in outs[0][0]
    rows = [json.loads(line) for line in open(directory / "metrics.jsonl")]
    two = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    one = losses(run(tiny(tmp_path / "one", "optim.steps=4"), out=io.StringIO(),
                     devices=jax.devices()[:1]))
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5)
