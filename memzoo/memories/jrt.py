"""JRT-RNN's prefix linear attention (Arora et al., 2024, "Just read twice: closing the recall
gap for recurrent language models"), the "jrt" mixer.

A prompt of `prefix_len` tokens is encoded non-causally: every token of it sees the whole prompt
through a separate encoder state built from its own key and value projections k^e, v^e; the
tokens after it decode causally, reading the same encoder state. With P = prefix_len and
phi the feature map (elu + 1 by default),

    E     = sum_{j < P} phi(k^e_j) v^e_j^T          z^E = sum_{j < P} phi(k^e_j)
    S_t   = sum_{j <= t} phi(k_j) v_j^T             z_t = sum_{j <= t} phi(k_j)
    o_t   = phi(q_t)^T (E + S_t) / (phi(q_t)^T (z^E + z_t) + eps)      for every t

so a prompt token t < P reads keys after it (only inside the prompt), and a token t >= P reads
the prompt encoded once more (the paper's "read twice") plus the causal state. After the prompt
E + S_t is one k x v matrix per head: the decoding state is as large as linear attention's.

Computed on the shared op (pallas_kernels.chunked_linear_attention, via LinearMemory's
run_memory) in linear time: with k^e masked to the prompt (m_j = [pos_j < P]),

    phi(q_t)^T E = forward_t + backward_t - (phi(q_t) . m_t phi(k^e_t)) v^e_t

where forward is the causal op over (q, m k^e, v^e) and backward the same op run on the
reversed sequence (each includes token t itself, hence the diagonal term taken once away);
for t >= P the backward part and the diagonal vanish. The normaliser z rides in a ones column
of v and v^e (as in memzoo.linear_attention.LinearAttention).

Packed documents (`segment_ids`): each document's first P tokens are its prompt. Decoding: the
cache (`JRTCache`: LinearMemory's cache plus the encoder state of the prompt tokens seen so
far, so LinearMemory's step and prefill serve it) holds the causal state, the encoder state,
the short-conv window and the position. A prompt token's output needs the whole prompt, so it
is only defined in a call that reaches position P: a prefill that ends inside the prompt, or a
`step` inside it, returns NaN for those tokens (loudly wrong, as attention's cache overflow),
while still accumulating them; the intended use is a prefill of (at least) the prompt, then
`step`. `noncausal_prefix` (= prefix_len) declares this to the contract test
(tests/memzoo/test_contract.py): causality is checked from P on, and decoding after a prefill
of the prompt. With P = 0 the mixer is causal linear attention with an (unused) encoder.

With `conv_size`, k^e and v^e go through the same short causal convolution (SiLU) as q, k, v
(one depthwise conv over all five). The paper's model interleaves Based's short-convolution
layers with its prefix-linear-attention layers, so the encoder reads inputs a short conv has
mixed; without one here, k^e_j and v^e_j come from the same token, and a first-layer E can
hold no key -> value binding (on mqar16q4_jrt the mixer without it stayed on the 1/16
plateau, 0.061 held-out; with it 0.566, benchmarks/RESULTS.md). Still no rotary positions. (JRT-RNN's full recipe adds Based's Taylor feature map and a sliding
window attention; the feature map is an option here, the window is another mixer.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from memzoo.linear_attention.common import (LinearAttentionCache, check_option,
                                            check_positive_int, normal_init, repeat_heads,
                                            run_memory)
from memzoo.linear_attention.linear_attention import EPS, LinearAttention
from memzoo.registry import register_mixer


ENCODER_INITS = ("independent", "copy")


@struct.dataclass
class JRTCache(LinearAttentionCache):
    """LinearAttentionCache (the causal state, the conv window, tokens seen) plus `encoder`
    [b, kv heads, k, v + 1] float32: the encoder state of the prompt tokens seen so far."""
    encoder: jax.Array = None


@register_mixer("jrt")
class JRT(LinearAttention):
    """Prefix linear attention (JRT-RNN): [b, t, d] -> [b, t, d].

    Options: `prefix_len` (int >= 0, the prompt encoded non-causally), `encoder_init`
    ("independent": k^e, v^e drawn apart from k, v, as the paper's code; "copy", ours: they
    start equal to k, v, conv taps included, so E = S_{P-1} and the mixer starts as the prompt
    read twice, JRT-Prompt, then the two sets train apart) and LinearAttention's (normalize is
    always on: the encoder's and decoder's sums share one denominator, as in the paper).

    >>> jrt = JRT(8, num_heads=2, prefix_len=3, rngs=nnx.Rngs(0))
    >>> jrt(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(self, d_model: int, *, prefix_len: int = 0, num_heads: int = 4,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 value_dim: int | None = None, feature_map: str = "elu+1", qk_norm: str = "none",
                 conv_size: int = 0, output_norm: str = "none", output_gate: bool = False,
                 chunk_size: int | None = None, implementation: str = "auto",
                 norm_eps: float = 1e-6, encoder_init: str = "independent", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        check_positive_int("JRT", "prefix_len", prefix_len, minimum=0)
        check_option("JRT", "encoder_init", encoder_init, ENCODER_INITS)
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, value_dim=value_dim, feature_map=feature_map,
                         normalize=True, qk_norm=qk_norm, conv_size=conv_size,
                         output_norm=output_norm, output_gate=output_gate,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=norm_eps, dtype=dtype, rngs=rngs)
        self.prefix_len = prefix_len
        G, K, V = self.num_kv_heads, self.head_dim, self.value_dim
        self.wk_enc = normal_init(rngs, (d_model, G, K), d_model, ("embed", "kv_heads", "kv"))
        self.wv_enc = normal_init(rngs, (d_model, G, V), d_model, ("embed", "kv_heads", "kv"))
        self.encoder_init = encoder_init
        if encoder_init == "copy":
            self.wk_enc[...] = self.wk[...]
            self.wv_enc[...] = self.wv[...]
            if self.conv_weight is not None:
                kv = slice(self.num_heads * K, self.num_heads * K + G * (K + V))
                w = self.conv_weight[...]
                self.conv_weight[...] = w.at[:, -G * (K + V):].set(w[:, kv])

    @property
    def noncausal_prefix(self) -> int:
        return self.prefix_len

    @property
    def conv_channels(self) -> int:
        """The short convolution runs over k^e, v^e as well as q, k, v."""
        return super().conv_channels + self.num_kv_heads * (self.head_dim + self.value_dim)

    def _project(self, x):
        return super()._project(x) + tuple(
            jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
            for w in (self.wk_enc, self.wv_enc))

    def _encoder(self, q, k, v, in_prompt, enc_state, segment_ids):
        """phi(q_t)^T E per token ([b, t, H, v + 1], float32) and the new encoder state."""
        k = self._qk(k, k)[1] * in_prompt[:, :, None, None].astype(self.dtype)
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        kw = dict(scale=1.0, chunk_size=self.chunk_size, implementation=self.implementation)
        forward, enc_state = run_memory("linear", q, k, v, state=enc_state,
                                        segment_ids=segment_ids, **kw)
        flip = (lambda a: None if a is None else jnp.flip(a, axis=1))
        backward, _ = run_memory("linear", flip(q), flip(k), flip(v),
                                 segment_ids=flip(segment_ids), **kw)
        group = q.shape[2] // k.shape[2]
        kq = repeat_heads(k, group).astype(jnp.float32)
        diag = jnp.sum(q.astype(jnp.float32) * kq, axis=-1, keepdims=True) \
            * repeat_heads(v, group).astype(jnp.float32)
        f32 = jnp.float32
        return forward.astype(f32) + flip(backward).astype(f32) - diag, enc_state

    def _forward(self, x, cache, segment_ids, decode: bool = False):
        b, T, _ = x.shape
        x = x.astype(self.dtype)
        parts, conv_state = self._conv(self._project(x), None if cache is None else cache.conv,
                                       segment_ids, decode)
        q, k, v, k_enc, v_enc = parts
        q, k = self._qk(q, k)
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        pos = self._positions(b, T, index, segment_ids)
        in_prompt = pos < self.prefix_len
        o_dec, state = self._memory(q, k, v, None, None, None if cache is None else cache.state,
                                    segment_ids, raw=True)
        o_enc, encoder = self._encoder(q, k_enc, v_enc, in_prompt,
                                       None if cache is None else cache.encoder, segment_ids)
        o = o_dec.astype(jnp.float32) + o_enc
        o = o[..., :-1] / (o[..., -1:] + EPS)
        if cache is not None:
            # A prompt token needs the whole prompt: defined only if this call reaches its end.
            incomplete = in_prompt & (index + T < self.prefix_len)
            o = jnp.where(incomplete[:, :, None, None], jnp.nan, o)
        y = self._output(o, x)
        return y, JRTCache(state, conv_state, index + T, encoder)

    def _memory(self, q, k, v, log_gate, beta, state, segment_ids, raw: bool = False):
        """raw=True: the numerator and the normaliser column, not yet divided."""
        if not raw:
            return super()._memory(q, k, v, log_gate, beta, state, segment_ids)
        v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        return run_memory("linear", q, k, v1, state=state, scale=1.0, segment_ids=segment_ids,
                          chunk_size=self.chunk_size, implementation=self.implementation)

    # ---- the SequenceMixer protocol (LinearMemory's step / __call__ on this cache) -------------
    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> JRTCache:
        """The state before any token (`max_len` ignored: the state does not grow)."""
        inner = super().init_cache(batch_size)
        return JRTCache(inner.state, inner.conv, inner.index, jnp.zeros_like(inner.state))

    def _check_cache(self, cache, batch: int) -> None:
        if not isinstance(cache, JRTCache):
            raise ValueError(f"JRT: `cache` must be a JRTCache (from init_cache({batch})), got "
                             f"{type(cache).__name__}")
        super()._check_cache(cache, batch)
