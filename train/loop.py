"""The training run: data, sharded state, resume, steps, logs, checkpoints, evaluation."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from configs.base import TrainConfig
from train import input as input_lib
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train.checkpoint import CheckpointError, Checkpointer
from train.fs import run_path, write_json
from train.trainer import Trainer

# A test hook: seconds to sleep after every step, so a subprocess can be killed mid-run.
_STEP_SLEEP = float(os.environ.get("MEMZOO_TEST_STEP_SLEEP", "0") or 0)
# A test hook: after this step (its metrics and checkpoint written) the run sleeps until it is
# killed, so a test can kill -9 it mid-run without racing the run's end.
_HANG_AFTER_STEP = int(os.environ.get("MEMZOO_TEST_HANG_AFTER_STEP", "0") or 0)


def _chance(info) -> float:
    chance = getattr(info, "chance_accuracy", None)
    return chance if chance else 1 / (getattr(info, "num_classes", None) or info.vocab_size)


class _Preemption:
    """When to stop for a preemption notice (SIGTERM): the loop saves a checkpoint after that
    step and returns. Saving inside a signal handler would race the step in flight and donated
    buffers.

    Every host of a job must stop at the same step, or their checkpoints disagree (and the
    collectives of the hosts that go on hang). Several processes under jax.distributed use
    JAX's preemption service: the coordination service hears SIGTERM on any host and names one
    step (the largest any host has reached, plus one) at which `reached_preemption_sync_point`
    turns true on all of them. Its notifier owns SIGTERM then; a Python handler would replace
    it and the notice would never leave the host. One process (or the service switched off):
    a Python handler sets a flag, and with several processes the flags are OR-ed across them
    at log steps (a host collective, so not every step).
    """

    def __init__(self, start_step: int):
        self.requested, self.previous, self.service = False, None, False
        if jax.process_count() > 1:
            try:
                multihost_utils.reached_preemption_sync_point(start_step)
                self.service = True
            except RuntimeError:   # jax_enable_preemption_service is off
                pass

    def __enter__(self):
        if not self.service and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int, log_step: bool) -> bool:
        """Called by every process after every step."""
        if self.service:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.requested
        if not log_step:
            return False
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def run(config: TrainConfig, *, out=None, devices=None) -> dict:
    """Train and evaluate; returns final metrics and the logged history. `devices`: the mesh's
    devices (default all); `out`: where progress goes (default stdout)."""
    out = out or sys.stdout
    is_main = jax.process_index() == 0

    def say(*args):
        if is_main:
            print(*args, file=out, flush=True)

    run_dir = run_path(config.resolved_run_dir)
    say("memzoo train, resolved config:\n" + json.dumps(config.to_dict(), indent=2))
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    say(f"devices: {mesh.devices.size} x {mesh.devices.flat[0].platform} in "
        f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}; run dir {run_dir}")

    d = config.data
    if d.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size {d.batch_size} does not split over "
                         f"{jax.process_count()} processes")

    def loader(split: str, seq_len: int = d.seq_len):
        return input_lib.build(
            d.task, loader=d.loader, split=split, batch_size=d.batch_size // jax.process_count(),
            seq_len=seq_len, seed=config.seed, data_dir=d.data_dir,
            shard_index=jax.process_index(), shard_count=jax.process_count(), **d.task_options)

    train_it, info = loader("train")
    num_classes = info.num_classes if getattr(info, "loss", "next_token") == "classification" \
        else None
    trainer = Trainer(config, mesh, vocab_size=info.vocab_size, num_classes=num_classes)
    say(f"model: {config.model.num_layers} x {config.model.mixer}, {trainer.num_params:,} "
        f"parameters, compute {config.model.dtype}; task {d.task}, vocab {info.vocab_size}")

    # -- resume or start -----------------------------------------------------------------------
    ckpt_cfg = config.checkpoint
    ckpt = None
    ckpt_dir = run_dir / "checkpoints"
    # A run dir that holds checkpoints resumes even when this run saves none (every=0).
    if ckpt_cfg.every > 0 or ckpt_cfg.resume == "require" or ckpt_dir.is_dir():
        ckpt = Checkpointer(ckpt_dir, ckpt_cfg)
    restored = None
    if ckpt is not None and ckpt_cfg.resume != "never":
        restored = ckpt.restore_latest(trainer.abstract_state,
                                       expect={"model": config.to_dict()["model"]})
        if restored is None and ckpt_cfg.resume == "require":
            raise CheckpointError(f"checkpoint.resume=require but {ckpt.directory} holds no "
                                  "checkpoint")
    elif ckpt is not None and ckpt.steps():
        raise CheckpointError(f"checkpoint.resume=never but {ckpt.directory} already holds "
                              f"steps {ckpt.steps()}; choose another run_dir")
    if restored is not None:
        start_step, state, data_state, _ = restored
        if data_state is not None:
            train_it.set_state(data_state)
        say(f"resumed from step {start_step} ({ckpt.directory})")
    else:
        start_step, state = 0, trainer.init()
        wanted = trainer.retriever_documents
        if wanted:
            # the same documents on every process (shard 0 of 1), so all fit one retriever
            fit_it, _ = input_lib.build(
                d.task, loader=d.loader, split="train", batch_size=d.batch_size, seq_len=d.seq_len,
                seed=config.seed, data_dir=d.data_dir, shard_index=0, shard_count=1,
                **d.task_options)
            rows, segs, got = [], [], 0
            while got < wanted:
                try:
                    b = next(fit_it)
                except StopIteration:
                    break
                rows.append(np.asarray(b["inputs"]))
                if "segment_ids" in b:
                    segs.append(np.asarray(b["segment_ids"]))
                got += len(rows[-1])
            state, fits = trainer.fit_retrievers(
                state, np.concatenate(rows)[:wanted],
                np.concatenate(segs)[:wanted] if segs else None)
            used = [int(np.count_nonzero(f["leaf_sizes"])) for f in fits]
            say(f"retrievers fitted on {fits[0]['documents']} training documents (hierarchical "
                f"k-means); leaves holding documents: {used} of {len(fits[0]['leaf_sizes'])}")

    long_eval = []  # the eval step jitted for data.eval_seq_len, built on first use

    def evaluate(state, seq_len: int | None = None) -> tuple[float, float]:
        """Held-out loss and accuracy at the training length, or at `seq_len` (the same
        generator's validation split at another length: length extrapolation)."""
        it, _ = loader("validation", seq_len or d.seq_len)
        totals = np.zeros(3)
        for _ in range(d.eval_batches):
            try:
                batch = next(it)
            except StopIteration:
                break
            batch = trainer.shard_batch(batch)
            if seq_len is None:
                r = trainer.eval_step(state, batch)
            else:
                if not long_eval:
                    long_eval.append(trainer.jitted_steps(batch)[1])
                with jax.set_mesh(trainer.mesh):
                    r = long_eval[0](state, batch)
            r = jax.device_get(r)
            totals += [r["loss_sum"], r["correct"], r["count"]]
        count = max(totals[2], 1.0)
        return float(totals[0] / count), float(totals[1] / count)

    # -- compile, measure ------------------------------------------------------------------------
    total = config.optim.steps
    batch = trainer.shard_batch(next(train_it)) if start_step < total else None
    t0 = time.perf_counter()
    if batch is not None:
        trainer.compile(state, batch)
        say(f"compiled in {time.perf_counter() - t0:.1f} s; "
            f"{(trainer.flops_per_step or 0) / 1e9:.3f} GFLOP per step per device")
    ceiling = metrics_lib.matmul_ceiling()
    say(f"matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s (float32 1024^2, one device)")
    writers = metrics_lib.Writers(run_dir, tensorboard=config.logging.tensorboard,
                                  enabled=is_main)
    initial_loss, initial_acc = evaluate(state)
    writers.write(start_step, {"loss": initial_loss, "accuracy": initial_acc}, prefix="eval")
    say(f"eval at step {start_step}: loss {initial_loss:.4f}  accuracy {initial_acc:.3f}")

    bar = metrics_lib.ProgressBar(total, start_step=start_step, out=out,
                                  enabled=is_main and config.logging.progress)
    profiler = metrics_lib.ProfilerWindow(config.logging.profile_start,
                                          config.logging.profile_stop,
                                          os.fspath(run_dir / "profile"))
    meta = {"config": config.to_dict()}
    tokens_per_step = d.batch_size * d.seq_len
    history: list[dict] = []
    preempted = False
    step = start_step
    t_last, steps_since = time.perf_counter(), 0
    try:
        with _Preemption(start_step) as preemption:
            for step in range(start_step + 1, total + 1):
                if batch is None:
                    batch = trainer.shard_batch(next(train_it))
                profiler.before_step(step)
                state, m = trainer.train_step(state, batch)
                batch = None
                profiler.after_step(step, m)
                steps_since += 1
                if _STEP_SLEEP:
                    time.sleep(_STEP_SLEEP)
                log_step = step % config.logging.log_every == 0 or step == total
                if log_step:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}
                    now = time.perf_counter()
                    dt = (now - t_last) / steps_since
                    t_last, steps_since = now, 0
                    row = {"loss": m["loss"], "accuracy": m["accuracy"],
                           "grad_norm": m["grad_norm"], "tokens/s": tokens_per_step / dt,
                           "step_ms": 1e3 * dt}
                    if trainer.flops_per_step:
                        row["flops_fraction"] = trainer.flops_per_step / dt / ceiling
                    bar.update(step, {k: row[k] for k in ("loss", "accuracy", "tokens/s",
                                                           "step_ms", "flops_fraction")
                                      if k in row})
                    writers.write(step, row)
                    history.append({"step": step, **row})
                if ckpt is not None and ckpt_cfg.every and step % ckpt_cfg.every == 0:
                    ckpt.save(step, state, train_it.get_state(), meta)
                if config.logging.eval_every and step % config.logging.eval_every == 0:
                    loss, acc = evaluate(state)
                    writers.write(step, {"loss": loss, "accuracy": acc}, prefix="eval")
                    say(f"eval at step {step}: loss {loss:.4f}  accuracy {acc:.3f}")
                if preemption.reached(step, log_step):
                    preempted = True
                    break
                if step == _HANG_AFTER_STEP:
                    while True:
                        time.sleep(60)
        if preempted:
            # Every host says where it stopped: one host's log then shows the agreed step.
            where = (f" (process {jax.process_index()} of {jax.process_count()})"
                     if jax.process_count() > 1 else "")
            if ckpt is None:
                print(f"SIGTERM at step {step}{where}: checkpoints are off "
                      "(checkpoint.every=0), nothing saved; exiting", file=out, flush=True)
            else:
                if step not in ckpt.steps():
                    ckpt.save(step, state, train_it.get_state(), meta, force=True)
                ckpt.wait()
                print(f"SIGTERM at step {step}{where}: checkpoint saved in {ckpt.directory}; "
                      "exiting cleanly (rerun the same command to resume)", file=out,
                      flush=True)
            return {"step": step, "preempted": True, "history": history}
        if ckpt is not None and step > start_step and step not in ckpt.steps():
            ckpt.save(step, state, train_it.get_state(), meta, force=True)
        eval_loss, eval_acc = evaluate(state)   # overlaps the final checkpoint's write
        writers.write(step, {"loss": eval_loss, "accuracy": eval_acc}, prefix="eval")
        if d.eval_seq_len:
            long_loss, long_acc = evaluate(state, d.eval_seq_len)
            writers.write(step, {"loss": long_loss, "accuracy": long_acc}, prefix="eval_long")
    finally:
        profiler.close()
        if ckpt is not None:
            ckpt.close()
        writers.close()

    say(f"eval: loss {initial_loss:.4f} -> {eval_loss:.4f}, accuracy {initial_acc:.3f} -> "
        f"{eval_acc:.3f} (held-out batches; chance {_chance(info):.3f})")
    result = {"step": step, "preempted": False, "initial_eval_loss": initial_loss,
              "initial_eval_accuracy": initial_acc, "eval_loss": eval_loss,
              "eval_accuracy": eval_acc, "num_params": trainer.num_params, "history": history}
    if d.eval_seq_len:
        say(f"eval at length {d.eval_seq_len} (trained at {d.seq_len}): loss {long_loss:.4f}  "
            f"accuracy {long_acc:.3f}")
        result.update(eval_seq_len=d.eval_seq_len, long_eval_loss=long_loss,
                      long_eval_accuracy=long_acc)
    if history:
        last = history[-1]
        say("final: " + "  ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
            + f"  eval_loss {eval_loss:.4f}  eval_accuracy {eval_acc:.3f}")
    if config.eval.enabled:   # train/eval.py on the final state: eval.json + tables in run_dir
        from train import eval as eval_lib
        result["lm_eval"] = eval_lib.evaluate(config, trainer, state, run_dir=run_dir, out=out,
                                              step=step)
    if is_main:
        write_json(run_dir / "final_metrics.json",
                   {k: v for k, v in result.items() if k != "history"})
    return result
