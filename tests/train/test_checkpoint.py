"""Checkpoints: kill -9 then restart continues with exactly the uninterrupted run's losses (and,
restored onto a 2 x 2 x 2 mesh, the same losses to float32 tolerance); SIGTERM saves and exits 0;
a damaged newest checkpoint is skipped with a warning, and when none restores the run refuses,
naming the directory."""
import io
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.train.helpers import ROOT, losses, subprocess_env, tiny, train_command
from train.checkpoint import CheckpointError
from train.loop import run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """12 uninterrupted steps on one device, no checkpoints."""
    return losses(run(tiny(tmp_path_factory.mktemp("ref")), out=io.StringIO(),
                      devices=jax.devices()[:1]))


def _wait_for(predicate, proc, timeout=180):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (rc {proc.returncode}) before the condition:\n"
                                 f"{out[-2000:]}\n{err[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def _logged_step(run_dir, step) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and f'"step": {step},' in path.read_text()


def test_kill_9_then_resume_is_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    # The child stops making progress after step 7 (checkpoint 6 written, step 7 not saved) and
    # waits there to be killed: the kill cannot race the end of the run.
    proc = subprocess.Popen(train_command(run_dir, "checkpoint.every=3"), cwd=ROOT,
                            env=subprocess_env(1, MEMZOO_TEST_HANG_AFTER_STEP="7"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (ckpts / "6").is_dir() and _logged_step(run_dir, 7), proc)
    assert proc.poll() is None
    proc.kill()                                        # SIGKILL: no handler runs
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    other_mesh = tmp_path / "other_mesh"
    shutil.copytree(run_dir, other_mesh)

    resumed = run(tiny(run_dir, "checkpoint.every=3"), out=io.StringIO(),
                  devices=jax.devices()[:1])
    got = losses(resumed)
    first = min(got)
    assert first >= 7 and max(got) == 12
    assert got == {s: reference[s] for s in got}      # bit-identical continuation

    # the same checkpoint restored onto data=2 x fsdp=2 x tensor=2 of 8 devices
    moved = losses(run(tiny(other_mesh, "checkpoint.every=3", "mesh.data=2", "mesh.fsdp=2",
                            "mesh.tensor=2"), out=io.StringIO()))
    assert set(moved) == set(got)
    np.testing.assert_allclose([moved[s] for s in sorted(moved)],
                               [reference[s] for s in sorted(moved)], rtol=1e-5)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_command(run_dir, "checkpoint.every=100", "optim.steps=200"),
                            cwd=ROOT, env=subprocess_env(1, MEMZOO_TEST_STEP_SLEEP="0.1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists()
              and (run_dir / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM at step" in out and "checkpoint saved in" in out
    step = int(out.split("SIGTERM at step ")[1].split(":")[0])
    assert 1 <= step < 200
    assert (run_dir / "checkpoints" / str(step)).is_dir()


def _damage(step_dir):
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            if name != "commit_success.txt":
                os.remove(os.path.join(root, name))


def test_damaged_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    one = jax.devices()[:1]
    run(tiny(run_dir, "checkpoint.every=2", "optim.steps=4"), out=io.StringIO(), devices=one)
    ckpts = run_dir / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["2", "4"]

    _damage(ckpts / "4")                               # e.g. a crash mid-write of step 4
    with pytest.warns(UserWarning, match=r"checkpoints/4 does not restore"):
        result = run(tiny(run_dir, "checkpoint.every=2", "checkpoint.resume=require",
                          "optim.steps=4"), out=io.StringIO(), devices=one)
    assert min(losses(result)) == 3                    # resumed from step 2
    assert sorted(os.listdir(ckpts)) == ["2", "4", "4.damaged"]   # kept for a post-mortem

    _damage(ckpts / "2")
    _damage(ckpts / "4")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError,
                                                  match=f"no checkpoint in {ckpts} restores"):
        run(tiny(run_dir, "checkpoint.every=2", "optim.steps=6"), out=io.StringIO(),
            devices=one)

    with pytest.raises(CheckpointError, match=r"written with a different model config "
                                              r"\(model.d_model: saved \[16\], now \[8\]\)"):
        run(tiny(run_dir, "model.d_model=8"), out=io.StringIO(), devices=one)

    with pytest.raises(CheckpointError, match="resume=require but .*empty.* holds no checkpoint"):
        run(tiny(tmp_path / "empty", "checkpoint.resume=require"), out=io.StringIO(),
            devices=one)


def test_resume_with_the_data_package_loader(tmp_path):
    """The grain loader's JSON state travels in the checkpoint: resuming from step 2 replays
    steps 3..6 exactly."""
    one = jax.devices()[:1]
    sets = ("data.loader=data", "checkpoint.every=2", "optim.steps=6")
    whole = losses(run(tiny(tmp_path / "a", *sets), out=io.StringIO(), devices=one))
    ckpts = tmp_path / "a" / "checkpoints"
    for step in ("4", "6"):
        shutil.rmtree(ckpts / step)
    resumed = losses(run(tiny(tmp_path / "a", *sets), out=io.StringIO(), devices=one))
    assert sorted(resumed) == [3, 4, 5, 6]
    assert resumed == {s: whole[s] for s in resumed}
