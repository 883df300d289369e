"""The training command end to end: it learns delayed recall, and `--set` reaches the config."""
import io

from train.__main__ import main
from train.loop import run
import configs


def test_training_learns_delayed_recall(tmp_path):
    config = configs.resolve(sets=["optim.steps=150", "logging.log_every=75",
                                   "checkpoint.every=0", "logging.tensorboard=false",
                                   "data.loader=synthetic", f"run_dir={tmp_path}"])
    result = run(config, out=io.StringIO())
    chance = 1 / config.data.task_options["vocab_size"]
    assert result["eval_loss"] < 0.5 * result["initial_eval_loss"]
    assert result["eval_accuracy"] > 0.9 > 10 * chance


def test_main_with_overrides(tmp_path, capsys):
    rc = main(["--preset", "smoke", "--set", "model.mixer=s5", "--set", "optim.steps=3",
               "--set", f"run_dir={tmp_path}", "--set", "data.loader=synthetic"])
    out = capsys.readouterr().out
    assert rc == 0
    assert '"mixer": "s5"' in out                 # the resolved config is printed
    assert "step     3/3" in out and "eval: loss" in out
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "final_metrics.json").exists()
