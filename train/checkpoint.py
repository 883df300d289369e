"""Checkpoints with orbax: the train state (model, optimizer, step, RNG key) sharded as the
arrays are, plus the data iterator's JSON state and the run's config, saved asynchronously.

Restoring takes the target shardings from the caller's abstract state, so a run saved on one
mesh resumes on another. A latest checkpoint that fails to restore (a crash mid-write, a
damaged file) is skipped with a warning naming it, falling back to the one before; when every
checkpoint fails, `CheckpointError` names the directory: a run that was asked to resume never
quietly starts again from step 0.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import orbax.checkpoint as ocp

from configs.base import CheckpointConfig

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str, config: CheckpointConfig):
        self.directory = os.path.abspath(directory)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, create=True,
            enable_async_checkpointing=config.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save (returns once the arrays are copied off the devices)."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
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
                    f"checkpoint {os.path.join(self.directory, str(step))} was written with a "
                    f"different {section} config ({', '.join(f'{section}.{k}' for k in keys)}:"
                    f" saved {[have.get(k) for k in keys]}, now {[want.get(k) for k in keys]});"
                    " use another run_dir to start a new run")

    def _set_aside(self, steps: list[int]) -> None:
        """Damaged steps move out of the manager's way (the resumed run saves those steps
        again) but stay on disk for a post-mortem."""
        import jax
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = f"{src}.damaged"
                n = 1
                while os.path.exists(dst):
                    dst, n = f"{src}.damaged{n}", n + 1
                os.rename(src, dst)
        self.manager.reload()

    def restore_latest(self, abstract_state, *, expect: dict | None = None
                       ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest checkpoint that restores, or None when
        the directory holds none. `abstract_state`: ShapeDtypeStructs with target shardings.
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
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                if restored.data is None or restored.meta is None:
                    raise CheckpointError("the data or meta item is missing")
            except Exception as err:  # orbax raises many types for damaged files
                message = (f"checkpoint {os.path.join(self.directory, str(step))} does not "
                           f"restore ({type(err).__name__}: {str(err)[:300]})")
                failures.append(message)
                warnings.warn(message + "; trying the previous checkpoint", stacklevel=2)
                continue
            if failures:
                self._set_aside([s for s in steps if s > step])
                warnings.warn(f"resuming from step {step}, skipping {len(failures)} damaged "
                              "newer checkpoint(s) (renamed to <step>.damaged)", stacklevel=2)
            return step, restored.state, dict(restored.data), dict(restored.meta)
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores (steps {steps}); refusing to start "
            "from scratch. Move the directory aside or set checkpoint.resume=never with a new "
            "run_dir.\n  " + "\n  ".join(failures))
