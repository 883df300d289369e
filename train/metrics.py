"""Run metrics: the matmul ceiling, a console progress bar, TensorBoard and JSONL logs, and the
profiler window."""
from __future__ import annotations

import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp

from train.fs import JsonLines, run_path


def matmul_ceiling(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul on one device: the yardstick for achieved FLOP/s.

    Measured, not looked up, so the fraction means the same on a laptop CPU and a TPU core.
    """
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """One line per log step: bar, step, metrics, ETA. No dependency; works in logs and pipes."""

    def __init__(self, total: int, *, start_step: int = 0, width: int = 20, out=None,
                 enabled: bool = True):
        self.total, self.start_step, self.width = total, start_step, width
        self.out = out or sys.stdout
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step / self.total
        filled = int(self.width * done)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * (self.width - filled - 1)
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        fields = "  ".join(_fmt(k, v) for k, v in metrics.items())
        print(f"[{bar[:self.width]}] step {step:5d}/{self.total}  {fields}  ETA {_duration(eta)}",
              file=self.out, flush=True)


def _fmt(key: str, value) -> str:
    if key == "tokens/s":
        return f"{value:,.0f} tok/s"
    if key == "step_ms":
        return f"{value:.1f} ms/step"
    if key == "flops_fraction":
        return f"{100 * value:.1f}% of matmul peak"
    return f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"


class Writers:
    """TensorBoard event files (tensorboardX, no TensorFlow) and metrics.jsonl in the run dir
    (a local or gs:// epath; tensorboardX writes to buckets itself).

    Only process 0 writes; the others get a no-op.
    """

    def __init__(self, run_dir, *, tensorboard: bool, enabled: bool):
        self.enabled, self.tb, self.jsonl = enabled, None, None
        if not enabled:
            return
        run_dir = run_path(run_dir)
        self.jsonl = JsonLines(run_dir / "metrics.jsonl")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.fspath(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboardX is not installed: no TensorBoard logs "
                              "(pip install tensorboardX)", stacklevel=2)

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.jsonl.write({"step": step, "split": prefix, **metrics})
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class ProfilerWindow:
    """A jax.profiler trace of steps [start, stop): the steady state, not the compile."""

    def __init__(self, start: int, stop: int, directory: str):
        self.start, self.directory, self.active = start, directory, False
        self.stop = stop if stop >= 0 else start + 1

    def before_step(self, step: int) -> None:
        if self.start >= 0 and step == self.start and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, sync) -> None:
        if self.active and step + 1 >= self.stop:
            jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile: steps [{self.start}, {self.stop}) written to {self.directory}")

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
