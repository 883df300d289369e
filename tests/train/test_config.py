"""Config errors name the offending key (and a near miss), presets and files resolve, and the
command line reports errors without a traceback."""
import pytest

import configs
from configs import ConfigError
from train.__main__ import main


@pytest.mark.parametrize("item,message", [
    ("model.mixr=s5", "unknown config key 'model.mixr'; did you mean model.mixer?"),
    ("optim.stepz=3", "did you mean optim.steps?"),
    ("optim.steps=abc", "config key 'optim.steps': expected int, got 'abc'"),
    ("optim.steps=0", "config key 'optim.steps': expected a positive integer"),
    ("model.dtype=float16", "config key 'model.dtype': expected one of ('float32', 'bfloat16')"),
    ("mesh.data=0", "config key 'mesh.data': expected a positive integer or -1"),
    ("checkpoint.resume=maybe", "config key 'checkpoint.resume'"),
    ("optim.grad_accum=5", "config key 'optim.grad_accum': expected a divisor of data.batch_size"),
    ("model.max_positions=8", "config key 'model.max_positions': expected 0 or at least the "
                              "longest sequence (64"),
    ("model.mixer=s4d,mamba9", "config key 'model.mixer': expected names from memzoo.MIXERS "
                               "(attention, "),
    ("model.mixer=s4d,mamba9", "unknown: mamba9"),
    ("data.task=mqra", "config key 'data.task': expected one of delayed_recall, mqar"),
    ("optim.loss_chunk=-2", "config key 'optim.loss_chunk': expected an integer >= 0"),
    ("model=s5", "config key 'model' is a section"),
    ("model.mixer.x=1", "'model.mixer' has no sub-keys"),
    ("optim.steps", "expected key=value"),
])
def test_bad_override_names_the_key(item, message):
    with pytest.raises(ConfigError) as err:
        configs.resolve(sets=[item])
    assert message in str(err.value)


def test_overrides_are_typed_and_nested():
    c = configs.resolve(preset="smoke", sets=[
        "model.mixer=s5", "optim.learning_rate=1e-2", "model.mixer_options.state_size=4",
        "optim.lr_multipliers={\"ssm_dynamics\": 0.1}", "logging.progress=false",
        "run_dir=none"])
    assert (c.model.mixer, c.optim.learning_rate, c.logging.progress) == ("s5", 0.01, False)
    assert c.model.mixer_options == {"state_size": 4}
    assert c.optim.lr_multipliers == {"ssm_dynamics": 0.1}
    assert c.run_dir is None and c.resolved_run_dir == "runs/smoke"
    assert c.model.d_model == configs.PRESETS["smoke"]().model.d_model


def test_config_files_and_presets():
    assert configs.resolve("configs/mqar.py").data.task == "mqar"
    assert configs.resolve().name == configs.DEFAULT_PRESET
    for name, make in configs.PRESETS.items():
        assert isinstance(make(), configs.TrainConfig), name
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        configs.resolve(preset="nope")
    with pytest.raises(ConfigError, match="no such file"):
        configs.resolve("configs/missing.py")


def test_command_line_error_is_one_line(capsys):
    assert main(["--set", "model.mixr=s5"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.mixr'; did you mean model.mixer?" in err
    assert "Traceback" not in err


def test_short_options_and_help(capsys):
    from train.__main__ import parse_args
    args = parse_args(["--preset", "delayed_recall_s5", "--steps", "500", "--mixer=s4d,s5",
                       "--set", "optim.steps=7"])
    config = configs.resolve(args.config, args.preset, args.set)
    assert (config.model.mixer, config.optim.steps) == ("s4d,s5", 7)   # explicit --set wins
    with pytest.raises(SystemExit):
        parse_args(["--stepz", "3"])
    assert "unknown option --stepz; did you mean --steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "optim.lr_multipliers" in help_text and "delayed_recall_hybrid" in help_text
