"""Packed documents: with segment_ids, every mixer's output for a document equals running that
document alone (no state or attention crosses a change of id)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from memzoo import MIXERS
from pallas_kernels import _testing as kt

BOUNDS = [(0, 5), (5, 14), (14, 20)]

CASES = [
    ("s4d", dict(state_size=8, mode="conv")),
    ("s4d", dict(state_size=8, mode="recurrent")),
    ("s4d", dict(state_size=8, mode="recurrent", bidirectional=True)),
    ("s5", dict(state_size=8)),
    ("s5", dict(state_size=8, bidirectional=True)),
    ("attention", dict(num_heads=2)),
]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_packed_equals_separate(name, options):
    mixer = MIXERS[name](8, rngs=nnx.Rngs(0), **options)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 20, 8))
    seg = jnp.concatenate([jnp.full((2, e - s), i, jnp.int32) for i, (s, e) in enumerate(BOUNDS)], 1)
    packed = mixer(x, segment_ids=seg)
    separate = jnp.concatenate([mixer(x[:, s:e]) for s, e in BOUNDS], axis=1)
    kt.assert_close(packed, separate, 1e-5, f"{name} packed vs separate")
    # And the ids matter: without them the later documents see the earlier ones.
    assert kt.rel_rmse(mixer(x), separate) > 1e-3
