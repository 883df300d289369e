"""The training command: it learns the delayed-recall task, and bad configs fail clearly."""
import io

import pytest

from configs import PRESETS, from_args
from train.__main__ import run


def test_training_learns_delayed_recall():
    config = PRESETS["delayed_recall_s4d"].replace(steps=150, log_every=75)
    result = run(config, out=io.StringIO())
    chance = 1 / config.vocab_size
    assert result["eval_loss"] < 0.5 * result["initial_eval_loss"]
    assert result["eval_accuracy"] > 0.9 > 10 * chance


def test_cli_overrides_and_presets():
    config = from_args(["--preset", "smoke", "--mixer", "s5", "--steps", "3"])
    assert (config.mixer, config.steps, config.d_model) == ("s5", 3, PRESETS["smoke"].d_model)
    out = io.StringIO()
    run(config, out=out)
    assert "step     3/3" in out.getvalue()


@pytest.mark.parametrize("argv,message", [
    (["--delay", "100"], "`delay` (100) must be smaller than `seq_len`"),
    (["--d_model", "0"], "`d_model` must be a positive integer"),
])
def test_bad_config_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        from_args(argv)
    assert message in capsys.readouterr().err


def test_unknown_mixer_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown mixer 'mamba9'.*known mixers: .*s4d"):
        run(PRESETS["smoke"].replace(mixer="mamba9"), out=io.StringIO())
