"""A gs:// run directory stays a bucket path for everything the run writes (metrics, final
metrics, checkpoints, damaged-checkpoint renames), through etils.epath. No network: "gs" is
served by an in-memory fsspec filesystem, the backend epath uses for gs:// without TensorFlow.
"""
import importlib
import io
import json

import jax
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

import train.checkpoint as checkpoint_lib
from configs.base import CheckpointConfig
from tests.train.helpers import tiny
from train.fs import JsonLines, run_path
from train.loop import run

# the module (the package's `fsspec.registry` attribute is a read-only view of its table)
fsspec_registry = importlib.import_module("fsspec.registry")


class _Bucket(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def bucket(monkeypatch):
    """gs:// in memory for this test only (a fresh store; epath's cached filesystem dropped)."""
    monkeypatch.setattr(_Bucket, "store", {})
    monkeypatch.setattr(_Bucket, "pseudo_dirs", [""])
    for name in ("gs", "gcs"):
        monkeypatch.setitem(fsspec_registry._registry, name, _Bucket)
    backend = epath.backend.fsspec_backend
    backend._get_filesystem.cache_clear()
    _Bucket.clear_instance_cache()
    yield _Bucket
    backend._get_filesystem.cache_clear()
    _Bucket.clear_instance_cache()


def test_run_path_keeps_uris_and_anchors_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(run_path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert str(run_path("runs/a")) == str(tmp_path / "runs" / "a")


def test_a_bucket_run_dir_is_written_in_the_bucket(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)       # anything written "locally" by mistake would land here
    result = run(tiny("gs://bucket/runs/tiny", "optim.steps=2", "checkpoint.every=0"),
                 out=io.StringIO(), devices=jax.devices()[:1])
    root = epath.Path("gs://bucket/runs/tiny")
    lines = (root / "metrics.jsonl").read_text().splitlines()
    assert [row["step"] for row in map(json.loads, lines) if row["split"] == "train"] == [1, 2]
    assert '"eval_loss"' in (root / "final_metrics.json").read_text()
    assert result["step"] == 2
    assert list(tmp_path.iterdir()) == []


def test_metrics_lines_survive_a_restart_in_a_bucket(bucket):
    path = epath.Path("gs://bucket/run/metrics.jsonl")
    first = JsonLines(path)
    first.write({"step": 1})
    first.write({"step": 2})
    first.close()
    again = JsonLines(path)            # a resumed run appends after the earlier lines
    again.write({"step": 3})
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3}']


class _RecordingManager:
    """Stands in for orbax's manager, whose arrays go through TensorStore's own GCS driver."""
    made: list = []

    def __init__(self, directory, options=None, item_names=None):
        self.directory = directory
        _RecordingManager.made.append(directory)

    def reload(self):
        pass


def test_checkpoints_and_damaged_renames_stay_in_the_bucket(bucket, monkeypatch):
    monkeypatch.setattr(checkpoint_lib.ocp, "CheckpointManager", _RecordingManager)
    ckpt = checkpoint_lib.Checkpointer("gs://bucket/run/checkpoints", CheckpointConfig())
    assert str(ckpt.directory) == "gs://bucket/run/checkpoints"
    assert str(_RecordingManager.made[-1]) == "gs://bucket/run/checkpoints"
    for n in range(2):                 # a second damaged copy of step 4 does not overwrite
        (ckpt.directory / "4").mkdir(parents=True, exist_ok=True)
        (ckpt.directory / "4" / "state").write_text(f"broken {n}")
        ckpt._set_aside([4])
    assert sorted(p.name for p in ckpt.directory.iterdir()) == ["4.damaged", "4.damaged1"]
    assert (ckpt.directory / "4.damaged" / "state").read_text() == "broken 0"


def test_data_states_per_process():
    saved = checkpoint_lib.gather_data_states({"next_index": 5})
    assert saved == {"num_processes": 1, "processes": [{"next_index": 5}]}
    assert checkpoint_lib.local_data_state(saved) == {"next_index": 5}
    # a checkpoint from before per-process states: the state of the one process
    assert checkpoint_lib.local_data_state({"next_index": 7}) == {"next_index": 7}
    with pytest.warns(UserWarning, match=r"from 4 process\(es\) and this run has 1: the model "
                                         r"and optimizer resume, the data order starts again"):
        assert checkpoint_lib.local_data_state(
            {"num_processes": 4, "processes": [{"next_index": i} for i in range(4)]}) is None
