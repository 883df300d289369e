"""Constructor options for tests/memzoo/test_contract.py: per registered mixer, only what it needs
to run at the contract test's small shapes (d_model 16, 20 tokens) and still exercise its
general code path: heads that divide d_model, chunks / segments / windows shorter than the
sequence (so state crosses a chunk boundary and the last chunk is partial), small states.

A mixer missing here is still tested, with its defaults."""

# < T = 20: two chunks, the last partial. 16, not less: under "auto" the delta rule's CUDA
# variant (power-of-two chunks >= 16) is lowered, and checked, on every platform.
CHUNK = 16

MIXER_OPTIONS: dict[str, dict] = {
    "attention": dict(num_heads=2),
    "based": dict(num_heads=2, feature_dim=4, window=8, chunk_size=CHUNK),
    "deltanet": dict(num_heads=2, chunk_size=CHUNK),
    "gated_deltanet": dict(num_heads=2, chunk_size=CHUNK),
    "gated_deltaproduct": dict(num_heads=2, n_householder=2, chunk_size=CHUNK),
    "kda": dict(num_heads=2, chunk_size=CHUNK),
    "comba": dict(num_heads=2, chunk_size=CHUNK),
    # Alone, an rwkv7 layer is its own layer 1 (its value-residual LoRA gets no gradient); the
    # residual is tested in a CausalLM (tests/memzoo/test_rwkv7_value_residual.py).
    "rwkv7": dict(num_heads=2, decay_rank=4, a_rank=4, gate_rank=4, value_residual=False,
                  chunk_size=CHUNK),
    "gla": dict(num_heads=2, chunk_size=CHUNK),
    "gsa": dict(num_heads=2, num_slots=4, chunk_size=CHUNK),
    "hgrn": dict(lower_bound=0.1),
    "hgrn2": dict(num_heads=2, lower_bound=0.1, output_gate=True, chunk_size=CHUNK),
    "hippo_rnn": dict(state_size=8),
    "hopfield": dict(num_heads=2, update_steps=2),
    # memzoo.memories: prefix_len 4 <= the contract's cuts (T0, T1); windows / chunks /
    # segments < T, so decoding crosses their boundaries
    "jrt": dict(num_heads=2, prefix_len=4, conv_size=4, chunk_size=CHUNK),
    "local_linear_attention": dict(num_heads=2, window=8),
    "hcam": dict(num_heads=2, chunk_len=3, top_k=2),
    "ttm": dict(memory_size=4, num_read=2, segment_len=3),
    "memory_mosaic": dict(num_heads=2),
    # sentences of 3: the contract's cuts fall mid-sentence; memory_size 3 < the 6 sentences
    "memn2n": dict(sentence_len=3, num_hops=2, memory_size=3, embed_dim=8),
    "ntm": dict(memory_slots=6, memory_width=4, read_heads=2, write_heads=2),
    "linear_attention": dict(num_heads=2, chunk_size=CHUNK),
    "mamba": dict(state_size=4),
    "mamba2": dict(state_size=8, head_dim=8, chunk_size=CHUNK),
    "memora": dict(num_heads=2, chunk_size=4),
    "mom": dict(num_heads=2, num_memories=3, chunk_size=CHUNK),
    "moneta": dict(num_heads=2, chunk_size=4),
    "neural_memory": dict(num_heads=2, chunk_size=4),
    "rebased": dict(num_heads=2, feature_dim=4, chunk_size=CHUNK),
    "retnet": dict(num_heads=2, chunk_size=CHUNK),
    "rwkv6": dict(num_heads=2, lerp_rank=4, decay_rank=8, chunk_size=CHUNK),
    "mlstm": dict(num_heads=2, proj_factor=1.0, chunk_size=CHUNK),
    "slstm": dict(num_heads=2),
    # mini-batches of 4 < T: decoding crosses mini-batch boundaries (re-anchoring)
    "ttt_linear": dict(num_heads=2, mini_batch=4),
    "ttt_mlp": dict(num_heads=2, mini_batch=4, mlp_expansion=2),
    "rglru": dict(num_heads=2),
    "s4d": dict(state_size=8),
    "s5": dict(state_size=8),
    "titans_mac": dict(num_heads=2, segment_len=8, num_persistent=2),
    "titans_mag": dict(num_heads=2, window=8, chunk_size=4, num_persistent=2),
    "titans_mal": dict(num_heads=2, window=8, chunk_size=4, num_persistent=2),
    "yaad": dict(num_heads=2, chunk_size=4),
}
