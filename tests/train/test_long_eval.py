"""data.eval_seq_len: a second final evaluation at another length, through the same generator
(length extrapolation, e.g. Mamba's induction heads trained short and tested long)."""
import io

import jax
import pytest

import configs
from tests.train.helpers import tiny


def test_eval_at_a_longer_length(tmp_path):
    from train.loop import run
    config = tiny(tmp_path, "data.task=induction_heads", "data.task_options={\"vocab_size\": 8}",
                  "optim.steps=2", "data.eval_seq_len=40")
    out = io.StringIO()
    result = run(config, out=out, devices=jax.devices()[:1])
    assert result["eval_seq_len"] == 40
    assert 0.0 <= result["long_eval_accuracy"] <= 1.0 and result["long_eval_loss"] > 0
    # A different length, so a different held-out set: not the training-length numbers.
    assert result["long_eval_loss"] != result["eval_loss"]
    assert "eval at length 40 (trained at 16)" in out.getvalue()
    # Off by default: no second evaluation.
    plain = run(tiny(tmp_path / "plain", "optim.steps=1"), out=io.StringIO(),
                devices=jax.devices()[:1])
    assert "long_eval_accuracy" not in plain


@pytest.mark.parametrize("value", ["-1", "true", "x"])
def test_eval_seq_len_must_be_a_non_negative_int(value):
    with pytest.raises(configs.ConfigError, match="data.eval_seq_len"):
        configs.resolve(preset="smoke", sets=[f"data.eval_seq_len={value}"])
