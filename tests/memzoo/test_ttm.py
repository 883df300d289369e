"""Token Turing Machine ("ttm", memzoo/memories/ttm.py): the module equals the paper's machine
written out segment by segment in float64 numpy from its own parameters (read by token
summarisation of [memory; segment so far], process, write the memory from [memory; processed;
segment] at each segment's end), per document when packed; the memory carries information across
segments; the short conv (conv_size) against its definition and through decoding; bad options
name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward, forward_packed, segment_ids_of

D, T, BATCH, M, R, S = 8, 11, 2, 3, 2, 4


def build(**options):
    return memzoo.MIXERS["ttm"](D, rngs=nnx.Rngs(0), memory_size=M, num_read=R, segment_len=S,
                                **options)


def with_random_conv(mixer):
    # The conv starts at 0 (the plain machine): random weights make the tests see it.
    mixer.conv_weight[...] = 0.5 * jax.random.normal(jax.random.key(7), mixer.conv_weight.shape)
    return mixer


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, T, D), jnp.float32)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def summarize(X, W):
    a = X @ W
    a = np.exp(a - a.max(0))
    return (a / a.sum(0)).T @ X


def naive(mixer, x, lengths=None):
    p = {".".join(map(str, k)): np.asarray(v[...], np.float64)
         for k, v in nnx.to_flat_state(nnx.state(mixer, nnx.Param))}
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for r, row in enumerate(lengths or [[x.shape[1]]] * x.shape[0]):
        start = 0
        for n in row:
            memory = p["initial_memory"]
            if mixer.conv_weight is not None:   # residual short conv, within the document
                doc, W = x[r, start:start + n].copy(), mixer.conv_size
                x[r, start:start + n] = doc + sum(
                    p["conv_weight"][W - 1 - i] * np.pad(doc, ((i, 0), (0, 0)))[:n]
                    for i in range(W))
            for a in range(0, n, S):   # one step of the machine per segment
                seg = x[r, start + a:start + min(a + S, n)]
                for i in range(len(seg)):
                    z = summarize(np.concatenate([memory, seg[:i + 1]]), p["read_weights.kernel"])
                    h = gelu_tanh(z @ p["processor.up.kernel"] + p["processor.up.bias"])
                    o = z + h @ p["processor.down.kernel"] + p["processor.down.bias"]
                    out[r, start + a + i] = o.reshape(-1) @ p["out.kernel"]
                if len(seg) == S:
                    memory = summarize(np.concatenate([memory, o, seg]), p["write_weights.kernel"])
            start += n
    return out


def test_equals_the_machine_segment_by_segment_float64():
    mixer, x = build(), inputs()
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, "ttm vs naive")


def test_short_conv_equals_its_definition_float64():
    mixer, x = with_random_conv(build(conv_size=3)), inputs(4)
    assert_close(forward(mixer, x), naive(mixer, x), 1e-5, "ttm conv vs naive")
    lengths = [[6, 5], [2, 9]]
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    assert_close(y, naive(mixer, x, lengths), 1e-5, "ttm conv packed vs naive")


def test_short_conv_decodes_as_the_parallel_form():
    mixer, x = with_random_conv(build(conv_size=3)), inputs(5)
    y_pre, cache = mixer(x[:, :5], mixer.init_cache(BATCH))
    ys = [y_pre]
    for t in range(5, T):
        y_t, cache = mixer.step(x[:, t], cache)
        ys.append(y_t[:, None])
    assert_close(jnp.concatenate(ys, 1), mixer(x), 1e-5, "ttm conv prefill + steps vs parallel")


def test_packed_documents_restart_the_machine():
    mixer, x = build(), inputs(2)
    lengths = [[6, 5], [2, 9]]
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    assert_close(y, naive(mixer, x, lengths), 1e-5, "ttm packed vs naive")


def test_the_memory_carries_the_past_segments():
    # A change in the first segment reaches the third one only through the written memory.
    mixer, x = build(), inputs(3)
    y, y2 = forward(mixer, x), forward(mixer, x.at[:, 0].add(1.0))
    assert float(jnp.min(jnp.max(jnp.abs(y2[:, 2 * S:] - y[:, 2 * S:]), -1))) > 1e-4


@pytest.mark.parametrize("option", ["memory_size", "num_read", "segment_len", "mlp_ratio",
                                    "conv_size"])
def test_bad_options_name_the_option(option):
    with pytest.raises(ValueError, match=option):
        memzoo.MIXERS["ttm"](D, rngs=nnx.Rngs(0), **{option: 0 if option != "conv_size" else 1})
