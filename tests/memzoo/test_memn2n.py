"""End-to-End Memory Networks ("memn2n", memzoo/memories/memn2n.py): the module equals the
paper's equations written out token by token in float64 numpy from its own parameters (sentence
bags with position encoding, temporal encoding by recency, K hops u_{k+1} = u_k + o_k, adjacent
weight tying), with and without the sentence query, per document when packed; the memory keeps
only `memory_size` sentences; bad options name the option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memzoo
from pallas_kernels._testing import assert_close
from tests.memzoo.helpers import forward, forward_packed, segment_ids_of

D, T, BATCH, S, K, M, E = 8, 17, 2, 3, 2, 2, 6


def build(**options):
    options = {"sentence_len": S, "num_hops": K, "memory_size": M, "embed_dim": E, **options}
    return memzoo.MIXERS["memn2n"](D, rngs=nnx.Rngs(0), **options)


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, T, D), jnp.float32)


def softmax(a):
    a = np.exp(a - a.max())
    return a / a.sum()


def naive(mixer, x, lengths=None, query_sentence=True):
    A = np.asarray(mixer.embeddings[...], np.float64)        # [K+1, d, e]: E_0 .. E_K
    TE = np.asarray(mixer.temporal[...], np.float64)          # [K+1, M, e]
    j = np.arange(1, S + 1)[:, None] / S
    k = np.arange(1, E + 1)[None, :] / E
    pe = (1 - j) - k * (1 - 2 * j)                            # the paper's l_kj
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for r, row in enumerate(lengths or [[x.shape[1]]] * x.shape[0]):
        start = 0
        for n in row:
            doc = x[r, start:start + n]

            def bag(hop, sentence, upto=S):
                words = doc[sentence * S:sentence * S + upto]
                return sum(pe[i] * (w @ A[hop]) for i, w in enumerate(words))

            for p in range(n):
                word, sentence = p % S, p // S
                u = bag(0, sentence, word + 1) if query_sentence else doc[p] @ A[0]
                memory = list(range(sentence - 1, max(sentence - M, 0) - 1, -1))  # by recency
                for hop in range(1, K + 1):
                    if not memory:
                        break
                    keys = [bag(hop - 1, i) + TE[hop - 1][slot] for slot, i in enumerate(memory)]
                    vals = [bag(hop, i) + TE[hop][slot] for slot, i in enumerate(memory)]
                    prob = softmax(np.array([u @ m for m in keys]))
                    u = u + sum(q * c for q, c in zip(prob, vals))
                out[r, start + p] = A[K] @ u
            start += n
    return out


@pytest.mark.parametrize("query_sentence", [True, False])
def test_equals_the_papers_equations_float64(query_sentence):
    mixer, x = build(query_sentence=query_sentence), inputs()
    assert_close(forward(mixer, x), naive(mixer, x, query_sentence=query_sentence), 1e-5,
                 f"memn2n vs naive, {query_sentence=}")


def test_packed_documents_count_sentences_from_their_start():
    mixer, x = build(), inputs(2)
    lengths = [[7, 10], [4, 13]]
    y = forward_packed(mixer, x, segment_ids_of(lengths))
    assert_close(y, naive(mixer, x, lengths), 1e-5, "memn2n packed vs naive")


def test_memory_holds_only_the_most_recent_sentences():
    # A change in sentence 0 reaches sentences 1 .. M through the memory and no later one.
    mixer, x = build(), inputs(3)
    y, y2 = forward(mixer, x), forward(mixer, x.at[:, 0].add(1.0))
    diff = jnp.max(jnp.abs(y2 - y), axis=(0, 2))
    assert float(jnp.min(diff[S:(M + 1) * S])) > 1e-4
    assert float(jnp.max(diff[(M + 1) * S:])) == 0.0


@pytest.mark.parametrize("option", ["sentence_len", "num_hops", "memory_size", "embed_dim"])
def test_bad_options_name_the_option(option):
    with pytest.raises(ValueError, match=option):
        build(**{option: 0})


def test_bad_query_sentence_and_cache_are_refused():
    with pytest.raises(ValueError, match="query_sentence"):
        build(query_sentence=1)
    mixer = build()
    with pytest.raises(ValueError, match="cache"):
        mixer.step(jnp.zeros((BATCH, D)), mixer.init_cache(BATCH + 1))
