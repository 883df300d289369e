"""flash-linear-attention checkpoints -> memzoo (memzoo.convert.fla) against fla itself.

Each case builds a small fla causal LM under the peers' torch (fla_reference.py: random weights
away from the published init, saved by its own save_pretrained), converts the saved directory,
and compares logits on the same tokens: relative RMSE <= 1e-4 in float32 for the parallel form
and for prefill + token-by-token decoding. The model written back must hold the very tensors it
was read from, and fla's from_pretrained must load it and give the same logits.
"""
import pytest

from tests.convert.golden import assert_golden_round_trip

BASE = dict(hidden_size=64, num_hidden_layers=2, vocab_size=100, fuse_cross_entropy=False)
CASES = {
    # Gated DeltaNet: short convs, output gate, norm_eps 1e-5 in every norm.
    "gated_deltanet": ("gated_deltanet", dict(BASE, head_dim=16, num_heads=4, norm_eps=1e-5)),
    # ... without the output gate (plain RMSNorm output), tied head, its own MLP width.
    "gated_deltanet_nogate_tied": ("gated_deltanet", dict(BASE, head_dim=32, num_heads=2,
                                                          expand_v=1.0, use_gate=False,
                                                          tie_word_embeddings=True,
                                                          intermediate_size=96)),
    # ... with negative eigenvalues: beta = 2 sigmoid in (0, 2).
    "gated_deltanet_neg_eigval": ("gated_deltanet", dict(BASE, head_dim=16, num_heads=2,
                                                         allow_neg_eigval=True)),
    # GLA: key/value heads shared by two query heads each, short convs.
    "gla_gqa_conv": ("gla", dict(BASE, num_heads=4, num_kv_heads=2, use_short_conv=True,
                                 norm_eps=1e-5)),
    # GLA as published: no conv, one key/value head per head, fused norm + swish gate.
    "gla": ("gla", dict(BASE, num_heads=2)),
    # DeltaNet with fla's output gate and wider values.
    "delta_net_gate": ("delta_net", dict(BASE, num_heads=4, use_gate=True, expand_v=2)),
    # ... with negative eigenvalues.
    "delta_net_neg_eigval": ("delta_net", dict(BASE, num_heads=2, allow_neg_eigval=True)),
    # DeltaNet as published (no gate: RMSNorm output).
    "delta_net": ("delta_net", dict(BASE, num_heads=2)),
    # RetNet: rotary q/k, fixed decays per head, RMSNorm + swish gate (fla's output norm).
    "retnet": ("retnet", dict(BASE, num_heads=4, norm_eps=1e-5)),
    # Linear attention: elu + 1 features, normalised, key/value heads shared in pairs.
    "linear_attn_elu_normalized": ("linear_attn", dict(BASE, num_heads=4, num_kv_heads=2,
                                                       feature_map="elu",
                                                       norm_feature_map=True)),
    # ... relu features, unnormalised (scaled by K^-1/2), wider values.
    "linear_attn_relu": ("linear_attn", dict(BASE, num_heads=2, feature_map="relu",
                                             expand_v=2.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fla_checkpoint_matches_reference(case, tmp_path):
    model_type, fields = CASES[case]
    assert_golden_round_trip("fla_reference.py", tmp_path, model_type, fields)
