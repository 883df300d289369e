"""Run recurrentgemma's own Griffin (JAX) on small random weights and save its parameters and
logits: `python recurrentgemma_peer.py OUT.npz` in a Python that has recurrentgemma[jax]
(../shared/peers/setup.sh's .peers/jax). Imports nothing from memzoo, so it runs there."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

CONFIG = dict(vocab_size=61, width=32, mlp_expanded_width=48, num_heads=4,
              block_types=("RECURRENT", "RECURRENT", "ATTENTION", "RECURRENT"),
              embeddings_scale_by_sqrt_dim=True, attention_window_size=5, logits_soft_cap=30.0)
BATCH, T = 2, 19
# Packed rows for the segment check: row 0 restarts at 7 and 13, row 1 at 11.
RESTARTS = [(7, 13), (11,)]


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def main(path):
    from recurrentgemma import common
    import recurrentgemma.jax as rg
    config = common.GriffinConfig(
        **{**CONFIG, "block_types": tuple(common.TemporalBlockType[b]
                                          for b in CONFIG["block_types"])})
    model = rg.Griffin(config, gradient_checkpointing=False)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG["vocab_size"], (BATCH, T)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (BATCH, T))
    params = model.init(jax.random.key(0), tokens, pos)
    # Norm scales and biases start at zero: move every parameter so each one counts.
    params = jax.tree.map(lambda p: p + 0.2 * jnp.asarray(rng.standard_normal(p.shape), p.dtype)
                          * (jnp.sqrt(jnp.mean(p ** 2)) + 0.5), params)
    logits, _ = model.apply(params, tokens, pos, return_cache=False)
    packed = np.asarray(pos).copy()
    segment_ids = np.zeros((BATCH, T), np.int32)
    for row, starts in enumerate(RESTARTS):
        for s in starts:
            packed[row, s:] = np.arange(T - s)
            segment_ids[row, s:] += 1
    logits_packed, _ = model.apply(params, tokens, jnp.asarray(packed), return_cache=False)
    np.savez(path, tokens=np.asarray(tokens), logits=np.asarray(logits, np.float32),
             logits_packed=np.asarray(logits_packed, np.float32), segment_ids=segment_ids,
             config=json.dumps(CONFIG),
             **{f"param:{k}": v for k, v in flat(params["params"]).items()})


if __name__ == "__main__":
    main(sys.argv[1])
