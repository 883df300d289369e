"""Two processes on localhost (jax.distributed, CPU collectives over gloo), one CPU device each:
they train the same run as one process on one device (the same losses to float32 tolerance);
a preemption notice on one host stops both at one step with one checkpoint holding both hosts'
data iterator states; the states are gathered in process order."""
import io
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

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


def _start_two(directory, port, *sets, **env):
    return [subprocess.Popen(
        train_command(directory, *sets) + [
            "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
            "--process_id", str(pid)],
        cwd=ROOT, env=subprocess_env(1, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for pid in range(2)]


def _finish(procs, timeout=240):
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _run_two(run_dir, first_port=None):
    """Both processes' (returncode, stdout, stderr). The port is picked and then bound by the
    coordinator later, so another process can take it in between: a bind failure is retried
    on a fresh port (and a fresh run dir), any other failure is returned as is."""
    for attempt in range(ATTEMPTS):
        port = first_port if attempt == 0 and first_port else _free_port()
        directory = run_dir / f"attempt{attempt}"
        procs = _start_two(directory, port, "optim.steps=4")
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


@pytest.mark.parametrize("service", ["true", "false"])
def test_preemption_notice_on_one_host_stops_both_at_one_step(tmp_path, service):
    """SIGTERM reaches process 1 only (a scheduler evicting one host). Both stop at one step
    (named by JAX's preemption service, or, with the service off, agreed by OR-ing the hosts'
    flags at a log step); the checkpoint of that step holds both processes' data states, and
    rerunning the command on two processes resumes from it."""
    sets = ("checkpoint.every=1000", "optim.steps=1000", "logging.log_every=1")
    for attempt in range(ATTEMPTS):
        directory = tmp_path / f"attempt{attempt}"
        procs = _start_two(directory, _free_port(), *sets, MEMZOO_TEST_STEP_SLEEP="0.05",
                           JAX_ENABLE_PREEMPTION_SERVICE=service)
        metrics = directory / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.exists() and '"split": "train"' in metrics.read_text()):
            if procs[0].poll() is not None or time.time() > deadline:
                break
            time.sleep(0.1)
        if procs[0].poll() is None:
            break
        (out0, err0), _ = _finish(procs)
        if not (_port_taken(err0) and attempt + 1 < ATTEMPTS):
            raise AssertionError(f"process 0 ended before training:\n{err0[-4000:]}")
    procs[1].send_signal(signal.SIGTERM)
    (out0, err0), (out1, err1) = _finish(procs)
    assert procs[0].returncode == 0, err0[-4000:]
    assert procs[1].returncode == 0, err1[-4000:]
    steps = [int(out.split("SIGTERM at step ")[1].split(" ")[0]) for out in (out0, out1)]
    assert "(process 0 of 2)" in out0 and "(process 1 of 2)" in out1
    assert steps[0] == steps[1] and 1 <= steps[0] < 1000, steps
    step = steps[0]
    ckpt = directory / "checkpoints" / str(step)
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.parent.iterdir()) == [str(step)]
    data = json.loads(next((ckpt / "data").glob("*")).read_text())
    assert data["num_processes"] == 2 and len(data["processes"]) == 2
    assert all(isinstance(state, dict) and state for state in data["processes"])

    procs = _start_two(directory, _free_port(), "checkpoint.every=1000",
                       f"optim.steps={step + 2}", "logging.log_every=1")
    (out0, err0), (_, err1) = _finish(procs)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, (err0[-3000:], err1[-3000:])
    assert f"resumed from step {step}" in out0
    rows = [json.loads(line) for line in open(directory / "metrics.jsonl")]
    trained = [r["step"] for r in rows if r["split"] == "train"]
    assert trained[-2:] == [step + 1, step + 2], trained[-5:]


GATHER = textwrap.dedent("""
    import sys
    import jax
    jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
    from train.checkpoint import gather_data_states, local_data_state
    me = jax.process_index()
    # different lengths on purpose: the gather pads to the longest
    state = {"next_index": 10 + me, "note": "x" * (7 * me)}
    saved = gather_data_states(state)
    assert saved == {"num_processes": 2, "processes": [
        {"next_index": 10, "note": ""}, {"next_index": 11, "note": "x" * 7}]}, saved
    assert local_data_state(saved) == state
    print("ok", me)
""")


def test_data_states_are_gathered_in_process_order(tmp_path):
    for attempt in range(ATTEMPTS):
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, "-c", GATHER, str(port), str(pid)],
                                  cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for pid in range(2)]
        results = _finish(procs, timeout=120)
        if procs[0].returncode != 0 and _port_taken(results[0][1]) and attempt + 1 < ATTEMPTS:
            continue
        for pid, ((out, err), p) in enumerate(zip(results, procs)):
            assert p.returncode == 0 and f"ok {pid}" in out, err[-3000:]
        return


def test_damaged_checkpoint_is_skipped_by_both_processes(tmp_path):
    """Two processes resume from the same older step when the newest checkpoint is damaged:
    they agree on which checkpoint restores, and process 0 alone sets the damaged one aside."""
    sets = ("checkpoint.every=2", "optim.steps=4")
    for attempt in range(ATTEMPTS):
        directory = tmp_path / f"attempt{attempt}"
        procs = _start_two(directory, _free_port(), *sets)
        (out0, err0), (_, err1) = _finish(procs)
        if procs[0].returncode != 0 and _port_taken(err0) and attempt + 1 < ATTEMPTS:
            continue
        assert procs[0].returncode == procs[1].returncode == 0, (err0[-3000:], err1[-3000:])
        break
    ckpts = directory / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4"]
    for path in (ckpts / "4" / "state").rglob("*"):          # a crash mid-write of step 4
        if path.is_file() and path.name != "commit_success.txt":
            path.unlink()
    procs = _start_two(directory, _free_port(), "checkpoint.every=2", "optim.steps=5")
    (out0, err0), (out1, err1) = _finish(procs)
    assert procs[0].returncode == procs[1].returncode == 0, (err0[-3000:], err1[-3000:])
    assert "resumed from step 2" in out0
    assert "checkpoints/4 does not restore" in err0 and "checkpoints/4 does not restore" in err1
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "4.damaged", "5"]
    rows = [json.loads(line) for line in open(directory / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 3, 4, 5]
