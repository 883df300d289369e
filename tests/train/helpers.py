"""A tiny run shared by the train tests: seconds on one CPU core."""
import os
import subprocess
import sys

import configs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["data.loader=synthetic", "model.d_model=16", "data.batch_size=8", "optim.steps=12",
        "optim.warmup_steps=2", "logging.log_every=1", "logging.tensorboard=false"]


def tiny_sets(run_dir, *sets) -> list[str]:
    return [*BASE, f"run_dir={run_dir}", *sets]


def tiny(run_dir, *sets) -> configs.TrainConfig:
    return configs.resolve(preset="smoke", sets=tiny_sets(run_dir, *sets))


def losses(result) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in result["history"]}


def train_command(run_dir, *sets) -> list[str]:
    argv = [sys.executable, "-m", "train", "--preset", "smoke"]
    for item in tiny_sets(run_dir, *sets):
        argv += ["--set", item]
    return argv


def subprocess_env(devices: int = 1, **extra) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT, **extra)
    return env


def run_command(argv, env, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
