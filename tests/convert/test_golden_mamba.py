"""mamba-ssm checkpoints -> memzoo (memzoo.convert.mamba) against mamba-ssm itself.

Each case builds a small MambaLMHeadModel under the peers' torch (mamba_reference.py: random
weights away from the published init, saved by its own save_pretrained), converts the saved
directory, and compares logits on the same tokens: relative RMSE <= 1e-4 in float32 for the
parallel form and for prefill + token-by-token decoding. The model written back must hold the
very tensors it was read from, and mamba-ssm must load it (strict) and give the same logits.
"""
import os

import numpy as np
import pytest

from memzoo.convert import load_checkpoint, read_tensors, save_checkpoint
from tests.convert.golden import assert_same_tensors, check_logits, run_reference

CASES = {
    # Mamba-2: grouped B/C, a gated MLP, untied head, RMSNorm.
    "mamba2_groups_mlp": (dict(layer="Mamba2", d_state=16, headdim=16, ngroups=2, chunk_size=16),
                          dict(d_model=64, n_layer=2, vocab_size=101, d_intermediate=96,
                               tie_embeddings=False)),
    # Mamba-2: one group, dt clipped, no MLP, tied, LayerNorm.
    "mamba2_tied_dt_limit": (dict(layer="Mamba2", d_state=32, headdim=32, dt_limit=[0.01, 0.5],
                                  chunk_size=16),
                             dict(d_model=64, n_layer=2, vocab_size=96, rms_norm=False)),
    # Mamba-1: tied head, LayerNorm, no MLP.
    "mamba1_layernorm": (dict(layer="Mamba1", d_state=8),
                         dict(d_model=64, n_layer=2, vocab_size=101, rms_norm=False)),
    # Mamba-1: projection biases, explicit dt_rank, a gated MLP, untied head.
    "mamba1_bias_mlp": (dict(layer="Mamba1", d_state=16, dt_rank=8, bias=True, d_conv=3),
                        dict(d_model=96, n_layer=2, vocab_size=64, d_intermediate=128,
                             tie_embeddings=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mamba_checkpoint_matches_reference(case, tmp_path):
    ssm_cfg, model_cfg = CASES[case]
    run_reference("mamba_reference.py", str(tmp_path), ssm_cfg, model_cfg)
    ref = np.load(tmp_path / "reference.npz")
    model, config = load_checkpoint(str(tmp_path / "checkpoint"))
    check_logits(model, ref["tokens"], ref["logits"])

    out = tmp_path / "written"
    save_checkpoint(model, config, str(out))
    assert sorted(os.listdir(out)) == ["config.json", "pytorch_model.bin"]
    assert_same_tensors(read_tensors(str(out))[0], read_tensors(str(tmp_path / "checkpoint"))[0])
    # mamba-ssm reads memzoo's file (strict load_state_dict) and computes the same logits.
    run_reference("mamba_reference.py", str(tmp_path), "reload", str(out))
