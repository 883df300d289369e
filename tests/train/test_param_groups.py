"""The trainer's optimizer groups come from the parameters' tags (memzoo.layers.param), not their
names: Gated DeltaNet's dt bias, stored as `decay_proj.bias`, is an SSM time scale."""
import jax
import numpy as np
from flax import nnx

import configs
from memzoo import layers
from tests.train.helpers import tiny
from train import mesh as mesh_lib
from train import trainer as trainer_lib
from train.checkpoint import Checkpointer
from train.input import build


def flat_labels(params, config) -> dict[str, str]:
    labels = trainer_lib.param_labels(params, config.optim)
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(labels)}


def test_labels_follow_the_tags():
    config = configs.resolve(preset="smoke", sets=[
        "model.mixer=gated_deltanet,mamba2,mom,s4d", "model.num_layers=4",
        'model.mixer_options={"state_size": 4, "mamba2": {"head_dim": 8}}'])
    model = trainer_lib.build_model(config, 16, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    labels = flat_labels(params, config)
    tagged = {"/".join(map(str, p)): layers.param_group_of(v)
              for p, v in nnx.to_flat_state(params)}
    for path, group in tagged.items():
        if group == "ssm_dynamics":
            assert labels[path] == "ssm_dynamics/no_decay", path
    dynamics = {p.split("mixer/")[-1] for p, g in tagged.items() if g == "ssm_dynamics"}
    # Gated DeltaNet's and MoM's dt bias: the name says "bias", the tag says dynamics
    assert {"decay_proj/bias", "log_A", "A_log", "dt_bias", "core/log_dt"} <= dynamics
    by_leaf = {}
    for path, label in labels.items():
        by_leaf.setdefault(path.split("mixer/")[-1], set()).add(label)
    assert by_leaf["decay_proj/bias"] == {"ssm_dynamics/no_decay"}
    assert by_leaf["decay_proj/kernel"] == {"default"}
    assert by_leaf["D_skip"] == {"default/no_decay"}        # tagged weight_decay=False


def test_dynamics_learning_rate_zero_freezes_the_tagged_parameters_through_a_checkpoint(tmp_path):
    """With optim.lr_multipliers.ssm_dynamics = 0 the Gated DeltaNet decay (log_A and the dt bias
    in decay_proj.bias) stays put while the rest trains; a checkpoint restored onto the
    trainer's abstract state keeps the tags, so the labels (and the optimizer) are unchanged."""
    config = tiny(tmp_path, "model.mixer=gated_deltanet", "model.num_layers=1",
                  'optim.lr_multipliers={"ssm_dynamics": 0.0}', "optim.steps=2")
    it, _ = build(config.data.task, loader="synthetic", split="train",
                  batch_size=config.data.batch_size, seq_len=config.data.seq_len, seed=0,
                  **config.data.task_options)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    t = trainer_lib.Trainer(config, mesh, vocab_size=config.data.task_options["vocab_size"])
    state = t.init()
    for _ in range(2):
        state, _ = t.train_step(state, t.shard_batch(next(it)))   # donates its input
    before = dict(nnx.to_flat_state(t.init()["params"]))
    frozen = set()
    for path, v in nnx.to_flat_state(state["params"]):
        moved = not np.array_equal(np.asarray(v[...]), np.asarray(before[path][...]))
        assert moved == (layers.param_group_of(v) == "default"), path
        if not moved:
            frozen.add("/".join(map(str, path)).split("mixer/")[-1])
    assert {"decay_proj/bias", "log_A"} <= frozen

    ckpt = Checkpointer(str(tmp_path / "ckpt"), config.checkpoint)
    ckpt.save(2, state, {}, {}, force=True)
    ckpt.wait()
    _, restored, _, _ = ckpt.restore_latest(t.abstract_state)
    ckpt.close()
    assert flat_labels(restored["params"], config) == flat_labels(state["params"], config)
    assert flat_labels(t.abstract_state["params"], config) == flat_labels(state["params"], config)
    state, metrics = t.train_step(restored, t.shard_batch(next(it)))   # the optimizer accepts it
    assert np.isfinite(float(metrics["loss"]))
