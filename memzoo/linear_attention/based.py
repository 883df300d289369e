"""Based (Arora et al., 2024, "Simple linear attention language models balance the recall-
throughput tradeoff") and ReBased (Aksenov et al., 2024, "Linear Transformers with Learnable
Kernel Functions are Better In-Context Models"): the "based" and "rebased" mixers. Both are
normalised linear attention (memzoo.linear_attention.LinearAttention) over small projected
query/key heads (`feature_dim`, default 16) through a quadratic feature map
(common.FEATURE_MAPS / common.LEARNED_FEATURE_MAPS):

    o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps)

  Based    phi = "taylor": phi(q).phi(k) = 1 + s + s^2 / 2, s = q.k / sqrt(feature_dim)
  ReBased  phi = "rebased": phi(q).phi(k) = (q~.k~)^2 / feature_dim, x~ = gamma LN(x) + beta

Based's paper builds a model from separate layers: linear attention (this map), short gated
convolutions and small sliding-window softmax attention, interleaved. As one mixer, "based" is
the sum of its two attentions, each with its own projections:

    y = W_o LinAttn_taylor(x) + SlidingWindowAttention_W(x)    (memzoo.attention, RoPE, window W)

so the exact local tokens come from the window and the long-range, approximate ones from the
Taylor state; `window=0` leaves the linear attention alone (fla's BasedLinearAttention). The
window attention handles packed documents itself and decodes with its ring KV cache; the
decoding cache is `BasedCache` (the linear state and the ring). ReBased is the linear attention
alone, as fla's ReBasedLinearAttention.

Hedgehog (Zhang et al., 2024) is a feature map of the family, not a mixer of its own (as in fla,
where it is an option of the linear-attention layer): `linear_attention` with
`feature_map="hedgehog"`.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx, struct

from memzoo.attention import Attention, KVCache
from memzoo.linear_attention.common import LinearAttentionCache, check_positive_int
from memzoo.linear_attention.linear_attention import LinearAttention
from memzoo.registry import register_mixer


@struct.dataclass
class BasedCache:
    """linear: the Taylor linear attention's state; window: the window attention's ring of
    keys and values (None with window=0)."""
    linear: LinearAttentionCache
    window: KVCache | None


@register_mixer("rebased")
class ReBased(LinearAttention):
    """ReBased: normalised linear attention with the learnable quadratic kernel (module
    docstring). `feature_dim` (16) is the per-head query/key width before the map (the state
    keeps feature_dim (feature_dim + 1) / 2 features per head); values are d_model / num_heads.

    >>> m = ReBased(8, num_heads=2, feature_dim=4, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    feature = "rebased"

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 feature_dim: int = 16, value_dim: int | None = None, conv_size: int = 0,
                 output_norm: str = "none", output_gate: bool = False,
                 chunk_size: int | None = None, implementation: str = "auto",
                 norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        owner = type(self).__name__
        check_positive_int(owner, "feature_dim", feature_dim)
        if value_dim is None and isinstance(num_heads, int) and num_heads > 0 \
                and d_model % num_heads == 0:
            value_dim = d_model // num_heads
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=feature_dim, value_dim=value_dim, feature_map=self.feature,
                         normalize=True, qk_norm="none", conv_size=conv_size,
                         output_norm=output_norm, output_gate=output_gate,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=norm_eps, dtype=dtype, rngs=rngs)


@register_mixer("based")
class Based(ReBased):
    """Based: Taylor linear attention + sliding-window softmax attention, summed (module
    docstring). Options beyond ReBased's: `window` (64; 0: no window attention),
    `window_heads` (the window attention's heads; default num_heads).

    >>> m = Based(8, num_heads=2, feature_dim=4, window=4, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    feature = "taylor"

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 feature_dim: int = 16, value_dim: int | None = None, window: int = 64,
                 window_heads: int | None = None, conv_size: int = 0,
                 output_norm: str = "none", output_gate: bool = False,
                 chunk_size: int | None = None, implementation: str = "auto",
                 norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"Based: `window` must be an integer >= 0 (0: no window "
                             f"attention), got {window!r}")
        window_heads = num_heads if window_heads is None else window_heads
        check_positive_int("Based", "window_heads", window_heads)
        super().__init__(d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         feature_dim=feature_dim, value_dim=value_dim, conv_size=conv_size,
                         output_norm=output_norm, output_gate=output_gate,
                         chunk_size=chunk_size, implementation=implementation,
                         norm_eps=norm_eps, dtype=dtype, rngs=rngs)
        self.window = window
        self.window_attention = (Attention(d_model, num_heads=window_heads, window=window,
                                           implementation=implementation, dtype=dtype,
                                           rngs=rngs) if window else None)

    def init_cache(self, batch_size: int, *, max_len: int | None = None) -> BasedCache:
        """The linear state and the window's ring (`window` slots whatever `max_len` says)."""
        ring = (None if self.window_attention is None
                else self.window_attention.init_cache(batch_size, max_len=max_len))
        return BasedCache(super().init_cache(batch_size), ring)

    def __call__(self, x, cache: BasedCache | None = None, *, segment_ids=None):
        """Parallel form, or with `cache` the prefill that continues from it: (y, cache).
        `segment_ids` [b, t] int: packed documents (parallel form only)."""
        if cache is None:
            y = super().__call__(x, segment_ids=segment_ids)
            if self.window_attention is not None:
                y = y + self.window_attention(x, segment_ids=segment_ids)
            return y
        self._check_based_cache(cache)
        y, linear = super().__call__(x, cache.linear, segment_ids=segment_ids)
        ring = cache.window
        if self.window_attention is not None:
            y_window, ring = self.window_attention(x, ring)
            y = y + y_window
        return y, BasedCache(linear, ring)

    def step(self, x_t, cache: BasedCache):
        self._check_based_cache(cache)
        y, linear = super().step(x_t, cache.linear)
        ring = cache.window
        if self.window_attention is not None:
            y_window, ring = self.window_attention.step(x_t, ring)
            y = y + y_window
        return y, BasedCache(linear, ring)

    def _check_based_cache(self, cache) -> None:
        if not isinstance(cache, BasedCache) or (cache.window is None) \
                != (self.window_attention is None):
            raise ValueError(f"Based: `cache` must be a BasedCache from init_cache (window="
                             f"{self.window}), got {type(cache).__name__}")
