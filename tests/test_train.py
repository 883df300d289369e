"""The training command end to end: it learns delayed recall, and `--set` reaches the config."""
import io
import os

import jax

import configs
from train.__main__ import main
from train.loop import run


def test_training_learns_delayed_recall(tmp_path):
    config = configs.resolve(sets=["optim.steps=150", "logging.log_every=75",
                                   "checkpoint.every=0", "logging.tensorboard=false",
                                   "data.loader=synthetic", f"run_dir={tmp_path}"])
    result = run(config, out=io.StringIO(), devices=jax.devices()[:1])
    chance = 1 / config.data.task_options["vocab_size"]
    assert result["eval_loss"] < 0.5 * result["initial_eval_loss"]
    assert result["eval_accuracy"] > 0.9 > 10 * chance


def test_main_with_overrides(tmp_path, capsys):
    """`--set` reaches the run; the run dir gets metrics, TensorBoard events and a profile."""
    sets = ["model.mixer=s5", "optim.steps=3", f"run_dir={tmp_path}", "data.loader=synthetic",
            "data.batch_size=8", "logging.profile_start=2", "logging.profile_stop=3",
            "logging.tensorboard=true", "checkpoint.every=2"]
    rc = main(["--preset", "smoke"] + [a for s in sets for a in ("--set", s)])
    out = capsys.readouterr().out
    assert rc == 0
    assert '"mixer": "s5"' in out                 # the resolved config is printed
    assert "step     3/3" in out and "ETA" in out and "eval: loss" in out
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "final_metrics.json").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert any(files for _, _, files in os.walk(tmp_path / "profile"))
