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
    "deltanet": dict(num_heads=2, chunk_size=CHUNK),
    "gated_deltanet": dict(num_heads=2, chunk_size=CHUNK),
    "gla": dict(num_heads=2, chunk_size=CHUNK),
    "hippo_rnn": dict(state_size=8),
    "linear_attention": dict(num_heads=2, chunk_size=CHUNK),
    "mamba": dict(state_size=4),
    "mamba2": dict(state_size=8, head_dim=8, chunk_size=CHUNK),
    "memora": dict(num_heads=2, chunk_size=4),
    "mom": dict(num_heads=2, num_memories=3, chunk_size=CHUNK),
    "moneta": dict(num_heads=2, chunk_size=4),
    "neural_memory": dict(num_heads=2, chunk_size=4),
    "retnet": dict(num_heads=2, chunk_size=CHUNK),
    "rglru": dict(num_heads=2),
    "s4d": dict(state_size=8),
    "s5": dict(state_size=8),
    "titans_mac": dict(num_heads=2, segment_len=8, num_persistent=2),
    "titans_mag": dict(num_heads=2, window=8, chunk_size=4, num_persistent=2),
    "titans_mal": dict(num_heads=2, window=8, chunk_size=4, num_persistent=2),
    "yaad": dict(num_heads=2, chunk_size=4),
}
