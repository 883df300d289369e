"""Jitted entry points for tests: one XLA compile per module and shape costs far less CPU than
eager op-by-op dispatch, which on the shared 2-core machine dominated the suite's time."""
from flax import nnx


@nnx.jit
def forward(mixer, x):
    return mixer(x)


@nnx.jit
def prefill(mixer, x, cache):
    return mixer(x, cache=cache)


@nnx.jit
def step(mixer, x_t, cache):
    return mixer.step(x_t, cache)


def prefill_then_decode(mixer, x, t1, cache):
    """Prefill x[:, :t1] from `cache`, then decode the rest token by token: [b, t, d] out."""
    import jax.numpy as jnp
    y_prefill, cache = prefill(mixer, x[:, :t1], cache)
    decoded = []
    for t in range(t1, x.shape[1]):
        y_t, cache = step(mixer, x[:, t], cache)
        decoded.append(y_t)
    return jnp.concatenate([y_prefill, *[y[:, None] for y in decoded]], axis=1)


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


def assert_packed_equals_alone(mixer, x, lengths, tol=1e-5):
    """mixer(x, segment_ids) on packed rows == each document run alone; returns the packed y."""
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    for r, a, b in documents(lengths):
        err = relative_rmse(y[r:r + 1, a:b], forward(mixer, x[r:r + 1, a:b]))
        assert err < tol, (r, a, b, err)
    return y


def assert_packed_decoding_equals_alone(mixer, x, lengths, t1, tol=1e-5):
    """Prefill x[:, :t1] then step the rest, with segment ids: each document == it decoded alone
    (prefill of its first half, then steps, from a fresh cache)."""
    import jax.numpy as jnp
    ids = segment_ids_of(lengths)
    y, cache = prefill_packed(mixer, x[:, :t1], mixer.init_cache(x.shape[0]), ids[:, :t1])
    ys = [y]
    for t in range(t1, x.shape[1]):
        y_t, cache = step_packed(mixer, x[:, t], cache, ids[:, t])
        ys.append(y_t[:, None])
    y = jnp.concatenate(ys, axis=1)
    for r, a, b in documents(lengths):
        alone = prefill_then_decode(mixer, x[r:r + 1, a:b], max(1, (b - a) // 2),
                                    mixer.init_cache(1))
        err = relative_rmse(y[r:r + 1, a:b], alone)
        assert err < tol, (r, a, b, err)
    return y


def assert_packed_gradients_equal_alone(mixer, x, lengths, tol=1e-5):
    """Gradients (parameters and input) of a weighted sum of the packed outputs == the sum of
    each document's alone."""
    import jax
    import jax.numpy as jnp
    ids = segment_ids_of(lengths)
    w = jax.random.normal(jax.random.key(99), x.shape[:2] + (mixer.d_model,))

    @nnx.jit
    def packed(m, x):
        return nnx.grad(lambda m, x: jnp.sum(m(x, segment_ids=ids) * w), argnums=(0, 1))(m, x)

    @nnx.jit
    def alone(m, x, w):
        return nnx.grad(lambda m, x: jnp.sum(m(x) * w), argnums=(0, 1))(m, x)

    gm, gx = packed(mixer, x)
    total_m = jax.tree.map(jnp.zeros_like, gm)
    total_x = jnp.zeros_like(gx)
    for r, a, b in documents(lengths):
        dm, dx = alone(mixer, x[r:r + 1, a:b], w[r:r + 1, a:b])
        total_m = jax.tree.map(jnp.add, total_m, dm)
        total_x = total_x.at[r:r + 1, a:b].set(dx)
    leaves_p, leaves_a = jax.tree.leaves(gm), jax.tree.leaves(total_m)
    assert len(leaves_p) == len(leaves_a) and leaves_p
    for p, q in zip(leaves_p, leaves_a):
        assert relative_rmse(p, q) < tol, relative_rmse(p, q)
    assert relative_rmse(gx, total_x) < tol, relative_rmse(gx, total_x)
