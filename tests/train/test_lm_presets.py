"""The language-model presets (configs/lm.py): the sizes their names promise, the precision of
a pod run, and a CPU-size variant of each architecture that trains here."""
import io

import jax
import numpy as np
import pytest
from flax import nnx

import configs
from configs import lm
from tests.train.helpers import tiny_sets
from train.data import byte_lm
from train.loop import run
from train.trainer import build_model

NOMINAL = {"125m": 125e6, "350m": 350e6, "1300m": 1.3e9}


def num_params(config) -> int:
    model = nnx.eval_shape(lambda: build_model(config, byte_lm.VOCAB_SIZE, nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("size", sorted(NOMINAL))
def test_pod_presets_have_their_size(size):
    for mixer in lm.MIXERS:
        config = configs.resolve(preset=f"lm{size}_{mixer}")
        n = num_params(config)
        assert 0.93 * NOMINAL[size] < n < 1.07 * NOMINAL[size], (mixer, n)
        m = config.model
        assert (m.dtype, m.remat, m.scan_layers, config.data.seq_len) == \
            ("bfloat16", "full", True, 4096)
        assert config.eval.enabled


def test_tiny_variants_are_the_same_architectures():
    for mixer in lm.MIXERS:
        big, small = (configs.resolve(preset=f"lm{s}_{mixer}").model for s in ("350m", "tiny"))
        assert small.mixer == big.mixer and small.dtype == big.dtype == "bfloat16"
        assert small.mlp_ratio == big.mlp_ratio and small.d_model == 128
        assert num_params(configs.resolve(preset=f"lmtiny_{mixer}")) < 1e6


def test_tiny_hybrid_trains_in_bfloat16(tmp_path):
    """Gated DeltaNet and attention layers, bf16 compute: the held-out loss falls in a few
    steps on a small corpus (documents packed with segment ids). (That bf16 runs keep the
    dynamics in float32: tests/memzoo/test_param_groups.py.)"""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["memory", "state", "decay", "gate", "delta", "rule", "chunk", "scan", "token"]
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 200)) + "\n")
    sets = [s for s in tiny_sets(tmp_path / "run") if not s.startswith(("data.", "model."))]
    config = configs.resolve(preset="lmtiny_hybrid", sets=[
        *sets, "optim.steps=6", "optim.warmup_steps=1", "data.seq_len=64", "data.batch_size=4",
        # documents go to splits by a hash of their path (tmp_path varies): with 40 files a 5%
        # validation share is empty one run in eight, 30% almost never (0.7^40 < 1e-6)
        f"data.task_options={{\"corpus\": \"{corpus}\", \"pattern\": \"*.txt\", "
        f"\"validation_fraction\": 0.3, \"test_fraction\": 0.0}}",
        f"data.data_dir={tmp_path / 'data'}", "checkpoint.every=0", "logging.eval_every=0",
        "eval.enabled=false"])
    result = run(config, out=io.StringIO(), devices=jax.devices()[:1])
    assert np.isfinite([r["loss"] for r in result["history"]]).all()
    assert result["eval_loss"] < result["initial_eval_loss"] - 0.5, result
