"""A fitted retriever (MemoryBank retrieval='tokens') in the training system: a fresh run fits
it on training documents before step 0 (the same fit as the bank's own on those documents),
the fit lives in the non-trained state and survives a checkpoint; a resumed run does not
refit."""
import io

import jax
import numpy as np

from tests.train.helpers import tiny
from train import input as input_lib
from train import mesh as mesh_lib
from train import trainer as trainer_lib
from train.checkpoint import Checkpointer
from train.loop import run

BANK = {"hidden": 8, "branching": [2, 2], "block_width": 4, "key_dim": 8,
        "retrieval": "tokens", "fit_documents": 24, "retrieval_window": 3}


def _config(run_dir, *sets):
    return tiny(run_dir, "optim.steps=2", "checkpoint.every=2", *sets).overrides({
        "model.mixer": "attention", "model.mixer_options": {"num_heads": 2},
        "model.num_layers": 2, "model.mlp": "memory_bank", "model.mlp_options": BANK})


def _fitted_rest(config, run_dir):
    """The bank buffers of the newest checkpoint in run_dir."""
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    t = trainer_lib.Trainer(config, mesh, vocab_size=config.data.task_options["vocab_size"])
    step, state, _, _ = Checkpointer(run_dir / "checkpoints", config.checkpoint).restore_latest(
        t.abstract_state)
    model = jax.tree.map(np.asarray, state["rest"])
    return t, step, model


def test_a_fresh_run_fits_the_retriever_and_the_fit_is_checkpointed(tmp_path):
    config = _config(tmp_path)
    out = io.StringIO()
    run(config, out=out, devices=jax.devices()[:1])
    assert "retrievers fitted on 24 training documents" in out.getvalue()
    t, step, rest = _fitted_rest(config, tmp_path)
    assert step == 2 and t.retriever_documents == 24
    # the same fit, by hand, on the run's first training documents
    d = config.data
    it, _ = input_lib.build(d.task, loader=d.loader, split="train", batch_size=d.batch_size,
                            seq_len=d.seq_len, seed=config.seed, **d.task_options)
    docs = np.concatenate([next(it)["inputs"] for _ in range(-(-24 // d.batch_size))])[:24]
    state = t.init()
    fitted, fits = t.fit_retrievers(state, docs)
    assert len(fits) == 2 and all(f["documents"] == 24 for f in fits)
    want = jax.tree.leaves(jax.tree.map(np.asarray, fitted["rest"]))
    got = jax.tree.leaves(rest)
    before = jax.tree.leaves(jax.tree.map(np.asarray, state["rest"]))
    assert any(not np.array_equal(a, b) for a, b in zip(want, before))   # the fit changed them
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)

    resumed = io.StringIO()
    run(_config(tmp_path, "optim.steps=4"), out=resumed, devices=jax.devices()[:1])
    assert "resumed from step 2" in resumed.getvalue()
    assert "retrievers fitted" not in resumed.getvalue()
