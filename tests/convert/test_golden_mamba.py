"""mamba-ssm checkpoints -> memzoo (memzoo.convert.mamba) against mamba-ssm itself.

Each case builds a small MambaLMHeadModel under the peers' torch (mamba_reference.py: random
weights away from the published init, saved by its own save_pretrained), converts the saved
directory, and compares logits on the same tokens: relative RMSE <= 1e-4 in float32 for the
parallel form and for prefill + token-by-token decoding. The model written back must hold the
very tensors it was read from, and mamba-ssm must load it (strict) and give the same logits.
"""
import os

import pytest

from tests.convert.golden import assert_golden_round_trip

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
    out = assert_golden_round_trip("mamba_reference.py", tmp_path, ssm_cfg, model_cfg)
    assert sorted(os.listdir(out)) == ["config.json", "pytorch_model.bin"]
