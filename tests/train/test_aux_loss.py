"""optim.aux_loss_weight: the train loss is the model's loss + weight * the layers' sown
"aux_loss" (the memory bank's route balance here), held-out losses stay the model's, the state
keeps its structure; bad settings (and the scanned stack, where nnx.capture sees nothing) are
refused. Weight 0 runs the code that was there before the hook (the other trainer tests)."""
import jax
import numpy as np
import pytest
from flax import nnx

import configs
from memzoo import losses as losses_lib
from tests.train.helpers import tiny
from train import mesh as mesh_lib
from train import trainer as trainer_lib
from train.input import build

BANK = {"hidden": 8, "branching": [2, 3], "block_width": 4, "key_dim": 4}


def _config(tmp_path, sow: bool, weight: float, scan: bool = False):
    return tiny(tmp_path, "optim.steps=1").overrides({
        "model.mixer": "attention", "model.mixer_options": {"num_heads": 2},
        "model.num_layers": 2, "model.scan_layers": scan, "model.mlp": "memory_bank",
        "model.mlp_options": dict(BANK, sow_aux_loss=sow), "optim.aux_loss_weight": weight})


def _trainer(config):
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    return trainer_lib.Trainer(config, mesh, vocab_size=config.data.task_options["vocab_size"])


def test_train_loss_is_model_loss_plus_weight_times_aux(tmp_path):
    weight = 0.5
    config = _config(tmp_path, sow=True, weight=weight)
    it, _ = build(config.data.task, loader="synthetic", split="train",
                  batch_size=config.data.batch_size, seq_len=config.data.seq_len, seed=0,
                  **config.data.task_options)
    batch = next(it)
    # the reference, apart from the trainer: the same initial model, eagerly
    model = trainer_lib.build_model(config, config.data.task_options["vocab_size"],
                                    nnx.Rngs(config.seed))
    features, aux = nnx.capture(lambda m, x: m.features(x), nnx.Intermediate)(
        model, batch["inputs"])
    values = [float(np.sum(v)) for v in jax.tree.leaves(aux)]
    assert len(values) == 2 and all(v >= 1.0 - 1e-5 for v in values)   # one per layer, >= 1
    mask = np.ones(batch["targets"].shape, np.float32) if "mask" not in batch \
        else np.asarray(batch["mask"], np.float32)
    loss_sum, _ = losses_lib.cross_entropy_sums(features, model.project, batch["targets"], mask)
    model_loss = float(loss_sum) / mask.sum()

    t = _trainer(config)
    s = t.init()
    held_out = t.eval_step(s, t.shard_batch(batch))
    np.testing.assert_allclose(float(held_out["loss_sum"]) / float(held_out["count"]),
                               model_loss, rtol=1e-5)
    structure = jax.tree.structure(s)
    new, m = t.train_step(s, t.shard_batch(batch))
    np.testing.assert_allclose(float(m["loss"]), model_loss + weight * sum(values), rtol=1e-5)
    assert jax.tree.structure(new) == structure      # no sown variable leaks into the state


def test_bad_settings_are_refused(tmp_path):
    for bad in (-0.1, True, "0.1"):
        with pytest.raises(configs.ConfigError, match="optim.aux_loss_weight"):
            configs.OptimConfig(aux_loss_weight=bad)
    with pytest.raises(configs.ConfigError, match="optim.aux_loss_weight.*sow_aux_loss"):
        _trainer(_config(tmp_path, sow=True, weight=0.0))
    with pytest.raises(configs.ConfigError, match="scan_layers=false"):
        _trainer(_config(tmp_path, sow=True, weight=0.1, scan=True))
