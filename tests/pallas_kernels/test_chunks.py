"""pallas_kernels._chunks: the one encoding of segment boundaries and the chunk layout, against
plain Python loops over the same ids (every op's segment handling derives from these)."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _chunks

pytestmark = pytest.mark.kernel


def _ids(seed, batch, length):
    rng = np.random.default_rng(seed)
    # Runs of equal ids, and an id that comes back after another (a change, not a new value).
    ids = rng.integers(0, 3, (batch, length))
    return jnp.asarray(np.where(rng.random((batch, length)) < 0.6, 1, ids), jnp.int32)


@pytest.mark.parametrize("length", [1, 2, 13])
@pytest.mark.parametrize("reverse", [False, True])
def test_segment_starts_and_runs_match_a_loop(length, reverse):
    ids = np.asarray(_ids(length, 3, length))
    starts = np.asarray(_chunks.segment_starts(jnp.asarray(ids), reverse=reverse))
    runs = np.asarray(_chunks.segment_runs(jnp.asarray(ids), reverse=reverse))
    order = range(length - 1, -1, -1) if reverse else range(length)
    for b in range(ids.shape[0]):
        prev, run = None, 0
        for t in order:
            start = prev is not None and ids[b, t] != prev
            run += start
            assert starts[b, t] == start and runs[b, t] == run, (b, t)
            prev = ids[b, t]
    assert runs.dtype == np.int32


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_chunk_resets_count_starts_since_each_chunk_began(chunk):
    ids = _ids(7, 2, 13)
    starts = np.asarray(_chunks.segment_starts(ids))
    counts = np.asarray(_chunks.chunk_resets(jnp.asarray(starts), chunk))
    n = -(-13 // chunk)
    assert counts.shape == (2, n, chunk)
    padded = np.pad(starts, [(0, 0), (0, n * chunk - 13)])    # padding steps start nothing
    for b in range(2):
        for t in range(n * chunk):
            want = padded[b, t // chunk * chunk:t + 1].sum()
            assert counts[b, t // chunk, t % chunk] == want, (b, t)


@pytest.mark.parametrize("chunk_major", [False, True])
def test_to_chunks_round_trip(chunk_major):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 13, 3, 4))
    c = _chunks.to_chunks(x, 5, chunk_major=chunk_major)
    assert c.shape == ((3, 2, 3, 5, 4) if chunk_major else (2, 3, 3, 5, 4))
    np.testing.assert_array_equal(_chunks.from_chunks(c, 13, chunk_major=chunk_major), x)
    # Chunk n, step i of a head is time step n * 5 + i; the padding is zero.
    c = np.asarray(_chunks.to_chunks(x, 5))
    np.testing.assert_array_equal(c[1, 2, 1, 3], x[1, 8, 2])
    assert not c[:, :, 2, 3:].any()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_sequence_parallel_shard_edge_cuts(reverse, n):
    """The state carried into shard j is cut exactly when the ids either side of the edge it
    crosses differ (shard j-1's last and j's first; j's last and j+1's first in reverse)."""
    sp = importlib.import_module("pallas_kernels.sequence_parallel")
    ids = _ids(n, n * 2, 3).reshape(n, 2, 3)      # [shard, batch, local time]
    cuts = jax.vmap(lambda s: sp._boundary_resets(s, "i", n, reverse), axis_name="i")(ids)[0]
    ids = np.asarray(ids)
    for j in range(n):
        for b in range(2):
            if reverse:
                want = j + 1 < n and ids[j, b, -1] != ids[j + 1, b, 0]
            else:
                want = j > 0 and ids[j, b, 0] != ids[j - 1, b, -1]
            assert bool(cuts[j, b]) == want, (j, b)
