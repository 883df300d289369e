"""Jitted entry points for tests: one XLA compile per module and shape costs far less CPU than
eager op-by-op dispatch, which on the shared 2-core machine dominated the suite's time.
Also the one rule for tests that need the reference implementations (.peers)."""
import os

import pytest
from flax import nnx


def peers_missing(message: str):
    """Skip a test whose reference implementation is not built, except where the run requires
    the peers (CI builds them and sets MEMZOO_REQUIRE_PEERS=1): there a missing peer fails."""
    if os.environ.get("MEMZOO_REQUIRE_PEERS") == "1":
        pytest.fail(f"MEMZOO_REQUIRE_PEERS=1 but {message}")
    pytest.skip(message)


@nnx.jit
def forward(mixer, x):
    return mixer(x)


@nnx.jit
def prefill(mixer, x, cache):
    return mixer(x, cache=cache)


@nnx.jit
def step(mixer, x_t, cache):
    return mixer.step(x_t, cache)


@nnx.jit
def lm_prefill(model, tokens, cache):
    return model.prefill(tokens, cache)


@nnx.jit
def lm_decode(model, token, cache):
    return model.decode_step(token, cache)


def lm_prefill_then_decode(model, tokens, t1: int):
    """A CausalLM's logits [b, t, v] from a prefill of tokens[:, :t1] and then one decode step
    per token, from a cache of room t: what the parallel form must equal."""
    import jax.numpy as jnp
    logits, cache = lm_prefill(model, tokens[:, :t1],
                               model.init_cache(tokens.shape[0], tokens.shape[1]))
    out = [logits]
    for t in range(t1, tokens.shape[1]):
        logits_t, cache = lm_decode(model, tokens[:, t], cache)
        out.append(logits_t[:, None])
    return jnp.concatenate(out, axis=1)


# ---- packed documents ---------------------------------------------------------------------------
def segment_ids_of(lengths):
    """[[len, ...] per row] -> [b, t] int32 ids, alternating 1, 2, 1, ... so an id comes back
    (a document is a change of id, not a distinct value)."""
    import numpy as np
    import jax.numpy as jnp
    ids = np.zeros((len(lengths), sum(lengths[0])), np.int32)
    for r, row in enumerate(lengths):
        assert sum(row) == ids.shape[1]
        start = 0
        for i, n in enumerate(row):
            ids[r, start:start + n] = 1 + i % 2
            start += n
    return jnp.asarray(ids)


def documents(lengths):
    """(row, start, stop) of every document."""
    out = []
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            out.append((r, start, start + n))
            start += n
    return out


def relative_rmse(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / max(np.mean(b ** 2), 1e-30)))


@nnx.jit
def forward_packed(mixer, x, segment_ids):
    return mixer(x, segment_ids=segment_ids)


@nnx.jit
def prefill_packed(mixer, x, cache, segment_ids):
    return mixer(x, cache=cache, segment_ids=segment_ids)


@nnx.jit
def step_packed(mixer, x_t, cache, segment_ids):
    return mixer.step(x_t, cache, segment_ids=segment_ids)


def alone_rows(x, docs, seed=0):
    """Every document (r, start, stop) of the packed rows x [b, t, d] at the start of a row of its
    own, followed by unrelated random tokens: [len(docs), t, d]. A causal mixer's outputs on a
    row's first n tokens are those of the n tokens run alone (causality is the contract's first
    check, tests/memzoo/test_contract.py), and so are the gradients under a cotangent that is zero
    past them: one batched call runs every document alone, instead of one compile per document
    length. The filler is random, not zeros, so it cannot hide a leak by being neutral."""
    import jax
    rows = jax.random.normal(jax.random.key(seed), (len(docs),) + x.shape[1:], x.dtype)
    for i, (r, a, b) in enumerate(docs):
        rows = rows.at[i, :b - a].set(x[r, a:b])
    return rows


def packed_layout(rows, docs, like):
    """The inverse of `alone_rows` for outputs: each row's first tokens back at their document's
    place in an array shaped like `like` (zeros where no document is)."""
    import jax.numpy as jnp
    out = jnp.zeros(like.shape[:2] + rows.shape[2:], rows.dtype)
    for i, (r, a, b) in enumerate(docs):
        out = out.at[r, a:b].set(rows[i, :b - a])
    return out


def assert_packed_equals_alone(mixer, x, lengths, tol=1e-5):
    """mixer(x, segment_ids) on packed rows == each document run alone; returns the packed y."""
    docs = documents(lengths)
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    alone = packed_layout(forward(mixer, alone_rows(x, docs)), docs, x)
    for r, a, b in docs:
        err = relative_rmse(y[r:r + 1, a:b], alone[r:r + 1, a:b])
        assert err < tol, (r, a, b, err)
    return y


def assert_packed_decoding_equals_alone(mixer, x, lengths, t1, tol=1e-5):
    """Prefill x[:, :t1] then step the rest, with segment ids (the cache resets at every new id,
    inside the prefill and between steps): == the packed parallel form, which
    `assert_packed_equals_alone` holds to each document alone. Returns the decoded y."""
    import jax.numpy as jnp
    ids = segment_ids_of(lengths)
    y, cache = prefill_packed(mixer, x[:, :t1], mixer.init_cache(x.shape[0]), ids[:, :t1])
    ys = [y]
    for t in range(t1, x.shape[1]):
        y_t, cache = step_packed(mixer, x[:, t], cache, ids[:, t])
        ys.append(y_t[:, None])
    y = jnp.concatenate(ys, axis=1)
    parallel = forward_packed(mixer, x, ids)
    for r, a, b in documents(lengths):
        err = relative_rmse(y[r:r + 1, a:b], parallel[r:r + 1, a:b])
        assert err < tol, (r, a, b, err)
    return y


def assert_packed_gradients_equal_alone(mixer, x, lengths, tol=1e-5):
    """Gradients (parameters and input) of a weighted sum of the packed outputs == the sum of
    each document's alone (all documents in one batched call, `alone_rows`)."""
    import jax
    import jax.numpy as jnp
    ids = segment_ids_of(lengths)
    docs = documents(lengths)
    w = jax.random.normal(jax.random.key(99), x.shape[:2] + (mixer.d_model,))
    w_alone = jnp.zeros((len(docs),) + w.shape[1:], w.dtype)
    for i, (r, a, b) in enumerate(docs):
        w_alone = w_alone.at[i, :b - a].set(w[r, a:b])

    @nnx.jit
    def grads(m, x, x_alone):
        packed = nnx.grad(lambda m, x: jnp.sum(m(x, segment_ids=ids) * w), argnums=(0, 1))(m, x)
        alone = nnx.grad(lambda m, x: jnp.sum(m(x) * w_alone), argnums=(0, 1))(m, x_alone)
        return packed, alone

    (gm, gx), (total_m, dx_alone) = grads(mixer, x, alone_rows(x, docs))
    total_x = packed_layout(dx_alone, docs, x)
    leaves_p, leaves_a = jax.tree.leaves(gm), jax.tree.leaves(total_m)
    assert len(leaves_p) == len(leaves_a) and leaves_p
    for p, q in zip(leaves_p, leaves_a):
        assert relative_rmse(p, q) < tol, relative_rmse(p, q)
    assert relative_rmse(gx, total_x) < tol, relative_rmse(gx, total_x)
