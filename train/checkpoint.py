"""Checkpoints with orbax: the train state (model, optimizer, step, RNG key) sharded as the
arrays are, plus every process's data iterator state (JSON) and the run's config, saved
asynchronously. The directory is an etils.epath path: local, or a bucket (gs://) shared by the
hosts of a pod.

Restoring takes the target shardings from the caller's abstract state, so a run saved on one
mesh resumes on another. A latest checkpoint that fails to restore (a crash mid-write, a
damaged file) is skipped with a warning naming it, falling back to the one before; when every
checkpoint fails, `CheckpointError` names the directory: a run that was asked to resume never
quietly starts again from step 0. With several processes they agree on every step of that: a
checkpoint is taken only when it restored on every host, and only process 0 renames damaged
steps, with a barrier before anyone lists the directory again.
"""
from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from configs.base import CheckpointConfig
from train.fs import run_path

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory, config: CheckpointConfig):
        self.directory = run_path(directory)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, create=True,
            enable_async_checkpointing=config.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save (returns once the arrays are copied off the devices).
        Every process calls it at the same step with its own iterator's `data_state`."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(gather_data_states(data_state)),
            meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _check_config(self, step: int, expect: dict) -> None:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception:
            return  # unreadable: the full restore reports it as damaged
        saved = (meta or {}).get("config", {})
        for section, want in expect.items():
            have = saved.get(section)
            if have is not None and have != want:
                keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} was written with a "
                    f"different {section} config ({', '.join(f'{section}.{k}' for k in keys)}:"
                    f" saved {[have.get(k) for k in keys]}, now {[want.get(k) for k in keys]});"
                    " use another run_dir to start a new run")

    def _set_aside(self, steps: list[int]) -> None:
        """Damaged steps move out of the manager's way (the resumed run saves those steps
        again) but stay on disk for a post-mortem."""
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                dst, n = self.directory / f"{step}.damaged", 1
                while dst.exists():
                    dst, n = self.directory / f"{step}.damaged{n}", n + 1
                src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("memzoo_checkpoint_set_aside")
        self.manager.reload()

    def restore_latest(self, abstract_state, *, expect: dict | None = None
                       ) -> tuple[int, Any, dict | None, dict] | None:
        """(step, state, data_state, meta) of the newest checkpoint that restores, or None when
        the directory holds none. `abstract_state`: ShapeDtypeStructs with target shardings.
        data_state is this process's iterator state (`local_data_state`).
        `expect`: config sections ({"model": {...}}) the checkpoint must have been written with;
        a mismatch is an error, not a damaged checkpoint (resuming another model is a mistake).
        """
        steps = self.steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            if expect:
                self._check_config(step, expect)
            error = None
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                if restored.data is None or restored.meta is None:
                    raise CheckpointError("the data or meta item is missing")
            except Exception as err:  # orbax raises many types for damaged files
                error = f"{type(err).__name__}: {str(err)[:300]}"
            # A host that read a damaged shard must not resume while the others go on from an
            # older step: a checkpoint counts only when every process restored it.
            bad = _failed_anywhere(error is not None)
            if bad:
                message = (f"checkpoint {self.directory / str(step)} does not restore ("
                           f"{error or f'it failed on process(es) {bad}'})")
                failures.append(message)
                warnings.warn(message + "; trying the previous checkpoint", stacklevel=2)
                continue
            if failures:
                self._set_aside([s for s in steps if s > step])
                warnings.warn(f"resuming from step {step}, skipping {len(failures)} damaged "
                              "newer checkpoint(s) (renamed to <step>.damaged)", stacklevel=2)
            return (step, restored.state, local_data_state(dict(restored.data)),
                    dict(restored.meta))
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores (steps {steps}); refusing to start "
            "from scratch. Move the directory aside or set checkpoint.resume=never with a new "
            "run_dir.\n  " + "\n  ".join(failures))


def _failed_anywhere(failed: bool) -> list[int]:
    """The processes on which something failed (every process calls this at the same point)."""
    if jax.process_count() == 1:
        return [0] if failed else []
    flags = np.asarray(multihost_utils.process_allgather(np.array(failed))).reshape(-1)
    return [int(i) for i in np.flatnonzero(flags)]


def gather_data_states(state: dict) -> dict:
    """Every process's iterator state, in process order: the checkpoint's data item.

    Each host reads its own shard of the data, so each has its own position; orbax writes JSON
    items from one process only, so the states travel to it first (two small host collectives,
    at checkpoint steps only).
    """
    if jax.process_count() == 1:
        return {"num_processes": 1, "processes": [state]}
    data = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return {"num_processes": int(sizes.size),
            "processes": [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]}


def local_data_state(saved: dict) -> dict | None:
    """This process's iterator state from a checkpoint's data item, or None (with a warning)
    when the checkpoint was written by a different number of processes: the shards then split
    the data differently and no saved position means the same thing."""
    if "processes" not in saved:            # written before per-process states: one process
        saved = {"num_processes": 1, "processes": [saved]}
    n = saved["num_processes"]
    if n != jax.process_count():
        warnings.warn(f"the checkpoint's data iterator states are from {n} process(es) and this "
                      f"run has {jax.process_count()}: the model and optimizer resume, the data "
                      "order starts again from its beginning", stacklevel=2)
        return None
    return saved["processes"][jax.process_index()]
