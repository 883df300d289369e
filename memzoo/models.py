"""Models built from registered mixers.

`CausalLM`: token embedding, `num_layers` pre-norm residual blocks (norm -> mixer -> residual,
norm -> MLP -> residual), a final norm and a head tied to the embedding (or not). Each layer's
mixer is chosen by name from `memzoo.MIXERS` through a repeating pattern ("s4d" or
"s4d,s4d,attention"), so hybrid stacks need no code. `SequenceClassifier` puts a pooled linear
head on the same stack.

The stack (`BlockStack`), shared by both models:

* `scan_layers=True` builds one repeat of the pattern (a `BlockGroup`: one block for a uniform
  stack, three for "s4d,s4d,attention") `num_layers // len(pattern)` times with `nnx.vmap`, so
  every parameter gets a leading repeat axis, and applies the repeats with `nnx.scan`: XLA
  compiles one group whatever the depth. Scanning over whole repeats is what lets a hybrid
  stack scan at all (a scan body must be the same function with the same parameter shapes at
  every step); layers past the last whole repeat (`num_layers % len(pattern)`) run unrolled
  after the scan. `scan_layers=False` is a Python loop over `num_layers` blocks.
* `remat` wraps each block in `nnx.remat` with a policy from `REMAT_POLICIES` (True/False mean
  "full"/"none").
* Caches mirror the layout: `StackCache(scanned=<a tuple per pattern position, each leaf with a
  leading repeat axis>, layers=<a tuple of per-layer caches>)`.
* A side channel rides beside the residual stream, opt-in: a mixer that defines
  `side_channel(batch, length)` (its entries before the first block: a dict of arrays, {} for
  none) is called with `side=` and returns (its usual result, the side channel after it); other
  mixers never see it, and a stack without such a mixer carries None (the plain stack). The
  entries are per token (or scalars), so decoding builds them afresh for each token and they
  need no cache; they thread through the layer scan as part of its carry. RWKV-7's value
  residual (layer 1's values, read by every later layer) is what it was made for. An MLP slot
  that reads the token ids (`reads_tokens`: MemoryBank's fitted retriever) gets them as the
  entry "tokens" ([batch, time] int, the ids at the block's positions); the models pass their
  tokens to the stack, and their vocabulary size to such a slot.

Mixed precision: `dtype` is the compute dtype of every layer (passed to each mixer unless
`mixer_options` says otherwise); parameters stay float32; logits are float32.
`residual_fp32=True` keeps the residual stream (the embeddings and every block's sum) in
float32 while the norms hand `dtype` to the mixers and MLPs (mamba-ssm's residual_in_fp32).

Options that reference checkpoints need (issue 16's converters), all off by default:
`mlp_hidden` (the MLP width itself), `mlp_bias` (False: the gated MLP without biases, as
mamba-ssm's and fla's GatedMLP), `mlp_activation` (the gated MLP's activation: "silu"
SwiGLU, "gelu" / "gelu_tanh" Gemma's GeGLU, "gelu_exact"), `norm_eps` (every block norm and
the final norm), `embed_scale` (Gemma's sqrt(d_model) on the input embeddings only; a tied
head reads the unscaled table), `logit_softcap` (c * tanh(logits / c), in `project`, so the
chunked losses see it too).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from memzoo import layers
from memzoo.attention import check_segment_ids, segment_positions
from memzoo.registry import MIXERS, accepts_keyword

def _real_residuals_only(policy: Callable[..., bool]) -> Callable[..., bool]:
    """`policy`, except that complex results are recomputed rather than saved.

    jax.checkpoint rounds every saved residual with `reduce_precision` (to pin XLA's excess
    precision, jax PR 22244), which rejects complex dtypes (JAX 0.10 through 0.12 at least), so
    saving the SSMs' complex dots (S5's B projection, S4D/S5 read-outs) fails to trace. These
    dots are a few per block and cheap to redo.
    """
    def saveable(prim, *avals, **params) -> bool:
        if any(jnp.issubdtype(getattr(a, "dtype", jnp.float32), jnp.complexfloating)
               for a in avals):
            return False
        return policy(prim, *avals, **params)
    saveable.__name__ = getattr(policy, "__name__", "policy")
    return saveable


# name -> jax.checkpoint policy; "full" saves nothing (recompute the whole block), "none" skips
# remat altogether (an nnx.remat with everything_saveable would still add a checkpoint boundary).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": _real_residuals_only(jax.checkpoint_policies.dots_saveable),
    "dots_with_no_batch_dims_saveable": _real_residuals_only(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}
POOLINGS = ("mean", "last")
# The residual stream's logical axes, pinned at block boundaries when a training loop asks
# (layers.activation_sharding): rows over the batch axes, time over the sequence axis, the width
# whole (a weight's "embed" axis is split over fsdp; an activation's must not be).
RESIDUAL_AXES = ("batch", "length", None)
# The logical name of the repeat axis that scan_layers adds to every stacked parameter, so
# its sharding metadata keeps one name per dimension (a rule table maps it, usually to None).
LAYER_AXIS = {nnx.PARTITION_NAME: "layers"}


def parse_pattern(pattern: str) -> list[str]:
    """"s4d, s4d,attention" -> ["s4d", "s4d", "attention"], every name checked in MIXERS."""
    if not isinstance(pattern, str):
        raise ValueError(f"`mixer` must be a comma-separated string of mixer names, got "
                         f"{type(pattern).__name__}")
    names = [p.strip() for p in pattern.split(",") if p.strip()]
    if not names:
        raise ValueError(f"`mixer` pattern must name at least one mixer, got {pattern!r}")
    for name in names:
        MIXERS[name]  # raises UnknownMixerError listing the known names
    return names


def layer_pattern(pattern: str, num_layers: int) -> list[str]:
    names = parse_pattern(pattern)
    return [names[i % len(names)] for i in range(num_layers)]


def _init_of(constructor):
    # A class's own signature can be its metaclass's (*args, **kwargs), as for nnx.Module.
    return constructor.__init__ if isinstance(constructor, type) else constructor


def _takes_any_keyword(constructor) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD
                   for p in inspect.signature(_init_of(constructor)).parameters.values())
    except (TypeError, ValueError):
        return False


def route_mixer_options(names: list[str], mixer_options: dict[str, Any] | None
                        ) -> dict[str, dict[str, Any]]:
    """Options per mixer name. A key that names a registered mixer holds that mixer's own
    options ({"attention": {"num_heads": 2}}); every other key is shared and goes to each mixer
    whose constructor takes it, so {"state_size": 16} configures the SSMs of "s4d,attention"
    without reaching attention. A shared key that no registered mixer names is an error."""
    options = dict(mixer_options or {})
    own = {k: dict(options.pop(k)) for k in list(options)
           if k in MIXERS and isinstance(options[k], dict)}  # in this pattern or not
    routed, used = {}, set()
    for name in dict.fromkeys(names):
        ctor = MIXERS[name]
        taken = {k: v for k, v in options.items()
                 if accepts_keyword(_init_of(ctor), k) or _takes_any_keyword(ctor)}
        used |= set(taken)
        routed[name] = {**taken, **own.get(name, {})}
    # Keys some other registered mixer declares are let through, so one config can carry
    # e.g. state_size across presets with and without SSMs; anything else is likely a typo.
    unused = sorted(k for k in set(options) - used
                    if not any(accepts_keyword(_init_of(MIXERS[m]), k) for m in MIXERS))
    if unused:
        raise ValueError(f"mixer_options {unused} are taken by none of the mixers {sorted(set(names))}")
    return routed


def check_tokens(owner: str, tokens, ndim: int = 2, legend: str = "[batch, time]") -> None:
    if not hasattr(tokens, "dtype") or not jnp.issubdtype(tokens.dtype, jnp.integer) \
            or tokens.ndim != ndim:
        raise ValueError(f"{owner}: `tokens` must be an integer array {legend}, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                         f"{tuple(getattr(tokens, 'shape', ()))}")


@struct.dataclass
class StackCache:
    """Decoding state of a BlockStack: `scanned` (None without scan) is a tuple with one cache
    per pattern position whose leaves carry a leading repeat axis; `layers` a tuple of the
    unrolled layers' caches; `position` (CausalLM with learned positions only) the number of
    tokens consumed, a scalar int32."""
    scanned: Any
    layers: tuple
    position: Any = None


MLP_KINDS = ("dense", "pkm", "memory_bank", "hopfield")


def check_block_options(owner: str, *, mlp_hidden=None, mlp_activation="silu", norm_eps=None,
                        residual_fp32=False, mlp_bias=True) -> None:
    """Refuse bad block options by name before any layer is built."""
    if mlp_hidden is not None and (isinstance(mlp_hidden, bool) or not isinstance(mlp_hidden, int)
                                   or mlp_hidden < 0):
        raise ValueError(f"{owner}: mlp_hidden must be an int >= 0 (0: no MLP) or None "
                         f"(mlp_ratio * d_model), got {mlp_hidden!r}")
    if mlp_activation not in layers.ACTIVATIONS:
        raise ValueError(f"{owner}: mlp_activation must be one of {tuple(layers.ACTIVATIONS)}, "
                         f"got {mlp_activation!r}")
    if norm_eps is not None and (isinstance(norm_eps, bool)
                                 or not isinstance(norm_eps, (int, float)) or not norm_eps > 0):
        raise ValueError(f"{owner}: norm_eps must be a float > 0 or None (the norms' default), "
                         f"got {norm_eps!r}")
    if not isinstance(residual_fp32, bool):
        raise ValueError(f"{owner}: residual_fp32 must be a bool, got {residual_fp32!r}")
    if not isinstance(mlp_bias, bool):
        raise ValueError(f"{owner}: mlp_bias must be a bool, got {mlp_bias!r}")


class Block(nnx.Module):
    """x + mixer(norm(x)), then x + MLP(norm(x)); the MLP is a gated MLP (SwiGLU by default,
    `mlp_activation`) of width `mlp_hidden` or else mlp_ratio * d, or with mlp="pkm" a
    product-key memory (memzoo.memory_layers, options in mlp_options), with mlp="memory_bank"
    a hierarchical memory bank over an anchor MLP of that width (its context summary is state:
    the block's cache is then (mixer cache, bank cache)), with mlp="hopfield" a multi-head
    Hopfield layer over learned patterns. `residual_fp32` keeps x in float32 (each branch is
    computed in `dtype` from the norm's output)."""

    def __init__(self, d_model: int, mixer: str, *, mixer_options: dict[str, Any], mlp_ratio: int,
                 norm: str, dtype, rngs: nnx.Rngs, mlp: str = "dense",
                 mlp_options: dict[str, Any] | None = None, mlp_hidden: int | None = None,
                 mlp_activation: str = "silu", norm_eps: float | None = None,
                 residual_fp32: bool = False, mlp_bias: bool = True):
        check_block_options("Block", mlp_hidden=mlp_hidden, mlp_activation=mlp_activation,
                            norm_eps=norm_eps, residual_fp32=residual_fp32, mlp_bias=mlp_bias)
        self.mixer_norm = layers.norm(norm, d_model, dtype=dtype, rngs=rngs, epsilon=norm_eps)
        # mixer_options: {name: options} from route_mixer_options
        self.mixer = MIXERS.build(mixer, d_model, rngs=rngs,
                                  **{"dtype": dtype, **mixer_options.get(mixer, {})})
        if mlp == "pkm":
            from memzoo.memory_layers import ProductKeyMemory  # memory_layers imports layers
            self.mlp = ProductKeyMemory(d_model, **(mlp_options or {}), dtype=dtype, rngs=rngs)
        elif mlp == "memory_bank":
            from memzoo.memory_layers import MemoryBank
            options = {"hidden": mlp_ratio * d_model if mlp_hidden is None else mlp_hidden,
                       "activation": mlp_activation, "use_bias": mlp_bias, **(mlp_options or {})}
            self.mlp = MemoryBank(d_model, **options, dtype=dtype, rngs=rngs)
        elif mlp == "hopfield":
            from memzoo.memory_layers import Hopfield
            self.mlp = Hopfield(d_model, **(mlp_options or {}), dtype=dtype, rngs=rngs)
        else:
            hidden = mlp_ratio * d_model if mlp_hidden is None else mlp_hidden
            self.mlp = (layers.MLP(d_model, hidden, activation=mlp_activation, gated=True,
                                   use_bias=mlp_bias, dtype=dtype, rngs=rngs)
                        if hidden > 0 else None)
        self.mlp_norm = (layers.norm(norm, d_model, dtype=dtype, rngs=rngs, epsilon=norm_eps)
                         if self.mlp else None)
        self.dtype = dtype
        # An MLP slot with state across tokens (MemoryBank's context summary) takes segment_ids
        # and rides in the block's cache beside the mixer's.
        self.mlp_stateful = bool(getattr(self.mlp, "stateful", False))
        # The residual stream's dtype: each branch's output is cast to it before the sum.
        self.residual_dtype = jnp.float32 if residual_fp32 else dtype
        # Optional protocol keywords (memzoo.registry.SequenceMixer), decided once here.
        self.mixer_name = mixer
        self.takes_segment_ids = accepts_keyword(self.mixer.__call__, "segment_ids")
        self.cache_takes_max_len = accepts_keyword(self.mixer.init_cache, "max_len")
        self.reads_side = callable(getattr(self.mixer, "side_channel", None))
        self.mlp_reads_tokens = bool(getattr(self.mlp, "reads_tokens", False))

    def _mixer(self, fn, h, side, *args, **kw):
        """(fn(h, ...), the side channel after it): `side` goes only to a mixer that reads one."""
        if side is None or not self.reads_side:
            return fn(h, *args, **kw), side
        return fn(h, *args, side=side, **kw)

    def _tokens(self, side):
        """The MLP slot's keywords from the side channel: the token ids where it reads them."""
        if not self.mlp_reads_tokens:
            return {}
        if side is None or "tokens" not in side:
            raise ValueError(f"Block: the MLP slot ({type(self.mlp).__name__}) reads the token "
                             f"ids; call it through CausalLM / SequenceClassifier (or give the "
                             f"stack `tokens=`)")
        return {"tokens": side["tokens"]}

    def _mlp(self, x, segment_ids=None, side=None):
        if self.mlp is not None:
            kw = {"segment_ids": segment_ids} if self.mlp_stateful else {}
            x = x + self.mlp(self.mlp_norm(x), **kw, **self._tokens(side)).astype(
                self.residual_dtype)
        return x

    def _mlp_cached(self, x, cache, step: bool, side=None):
        """(x + MLP, the MLP's new cache) for a stateful MLP."""
        h = self.mlp_norm(x)
        kw = self._tokens(side)
        if step and kw:
            kw = {"tokens": kw["tokens"][:, 0]}     # the one token of a step: [batch, 1] -> [batch]
        y, cache = self.mlp.step(h, cache, **kw) if step else self.mlp(h, cache=cache, **kw)
        return x + y.astype(self.residual_dtype), cache

    def __call__(self, x, *, segment_ids=None, cache=None, side=None):
        """The block's result; with a side channel (module docstring), (result, side)."""
        x = layers.constrain_activation(x, RESIDUAL_AXES)
        h = self.mixer_norm(x)
        kw = {}
        if segment_ids is not None:
            if not self.takes_segment_ids:
                # Dropping them would let packed documents see each other without a word.
                raise ValueError(
                    f"Block: mixer {self.mixer_name!r} ({type(self.mixer).__name__}) does not "
                    f"take `segment_ids`, so it cannot keep packed documents apart; give its "
                    f"__call__ a `segment_ids` keyword that resets its state where the id "
                    f"changes (memzoo.registry.SequenceMixer), or call without segment_ids")
            kw = {"segment_ids": segment_ids}
        if cache is None:
            y, new_side = self._mixer(self.mixer, h, side, **kw)
            x = layers.constrain_activation(x + y.astype(self.residual_dtype), RESIDUAL_AXES)
            return _with_side(self._mlp(x, segment_ids, side), side, new_side)
        if self.mlp_stateful:
            cache, mlp_cache = cache
            (y, cache), new_side = self._mixer(self.mixer, h, side, cache=cache)
            x, mlp_cache = self._mlp_cached(x + y.astype(self.residual_dtype), mlp_cache, False,
                                            side)
            return _with_side((x, (cache, mlp_cache)), side, new_side)
        (y, cache), new_side = self._mixer(self.mixer, h, side, cache=cache)
        return _with_side((self._mlp(x + y.astype(self.residual_dtype), side=side), cache), side,
                          new_side)

    def step(self, x_t, cache, side=None):
        if self.mlp_stateful:
            cache, mlp_cache = cache
            (y, cache), new_side = self._mixer(self.mixer.step, self.mixer_norm(x_t), side, cache)
            x_t, mlp_cache = self._mlp_cached(x_t + y.astype(self.residual_dtype), mlp_cache,
                                              True, side)
            return _with_side((x_t, (cache, mlp_cache)), side, new_side)
        (y, cache), new_side = self._mixer(self.mixer.step, self.mixer_norm(x_t), side, cache)
        return _with_side((self._mlp(x_t + y.astype(self.residual_dtype), side=side), cache),
                          side, new_side)

    def init_cache(self, batch_size: int, max_len: int | None = None):
        if self.cache_takes_max_len:
            cache = self.mixer.init_cache(batch_size, max_len=max_len)
        else:
            cache = self.mixer.init_cache(batch_size)
        return (cache, self.mlp.init_cache(batch_size)) if self.mlp_stateful else cache


def _with_side(out, side, new_side):
    """A Block's result as it was without a side channel; (result, side) with one."""
    return out if side is None else (out, new_side)


def _and_side(out, side):
    """A Block's result -> (result, side) whether or not a side channel rides along."""
    return out if side is not None else (out, None)


class BlockGroup(nnx.Module):
    """One repeat of the pattern: the body of the layer scan."""

    def __init__(self, names: list[str], *, rngs: nnx.Rngs, **block_options):
        self.blocks = nnx.List([Block(block_options["d_model"], name, rngs=rngs,
                                      **{k: v for k, v in block_options.items() if k != "d_model"})
                                for name in names])

    def __call__(self, x, side, apply: Callable, *, segment_ids=None, cache=None):
        """(x, side), or with `cache` ((x, caches), side)."""
        if cache is None:
            for block in self.blocks:
                x, side = apply(block, x, segment_ids, side)
            return x, side
        new = []
        for block, c in zip(self.blocks, cache):
            (x, c), side = _and_side(block(x, cache=c, side=side), side)
            new.append(c)
        return (x, tuple(new)), side

    def step(self, x_t, cache, side=None):
        new = []
        for block, c in zip(self.blocks, cache):
            (x_t, c), side = _and_side(block.step(x_t, c, side), side)
            new.append(c)
        return (x_t, tuple(new)), side

    def init_cache(self, batch_size: int, max_len: int | None = None):
        return tuple(b.init_cache(batch_size, max_len) for b in self.blocks)


class BlockStack(nnx.Module):
    """`num_layers` Blocks in the order of `pattern`, scanned over repeats or unrolled (module
    docstring)."""

    def __init__(self, d_model: int, num_layers: int, pattern: str, *,
                 mixer_options: dict[str, Any] | None = None, mlp_ratio: int = 2,
                 norm: str = "rmsnorm", scan_layers: bool = False, remat: str | bool = "none",
                 dtype=jnp.float32, mlp: str = "dense", mlp_options: dict[str, Any] | None = None,
                 mlp_hidden: int | None = None, mlp_activation: str = "silu",
                 norm_eps: float | None = None, residual_fp32: bool = False,
                 mlp_bias: bool = True, rngs: nnx.Rngs):
        check_block_options("BlockStack", mlp_hidden=mlp_hidden, mlp_activation=mlp_activation,
                            norm_eps=norm_eps, residual_fp32=residual_fp32, mlp_bias=mlp_bias)
        if isinstance(remat, bool):  # configs that only switch it on or off
            remat = "full" if remat else "none"
        if remat not in REMAT_POLICIES:
            raise ValueError(f"`remat` must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
        unit = parse_pattern(pattern)
        routed = route_mixer_options(unit, mixer_options)
        options = dict(d_model=d_model, mixer_options=routed, mlp_ratio=mlp_ratio, norm=norm,
                       dtype=dtype, mlp_hidden=mlp_hidden, mlp_activation=mlp_activation,
                       norm_eps=norm_eps, residual_fp32=residual_fp32, mlp_bias=mlp_bias)
        memory_layers, mlp_options = self._memory_options(d_model, num_layers, mlp, mlp_options,
                                                          scan_layers, rngs)
        if memory_layers is None:  # every layer the same kind: the scan can stack them
            options.update(mlp=mlp, mlp_options=mlp_options)
        self.remat, self.scan_layers = remat, bool(scan_layers)
        self.repeats = num_layers // len(unit) if scan_layers else 0
        if self.repeats:
            @nnx.split_rngs(splits=self.repeats)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_AXIS)
            def build(rngs):
                return BlockGroup(unit, rngs=rngs, **options)
            self.scanned = build(rngs)
        else:
            self.scanned = None
        tail = layer_pattern(pattern, num_layers)[self.repeats * len(unit):]
        per_layer = [{} if memory_layers is None else
                     dict(mlp="pkm" if i in memory_layers else "dense", mlp_options=mlp_options)
                     for i in range(len(tail))]
        self.layers = nnx.List([Block(d_model, name, rngs=rngs, **extra,
                                      **{k: v for k, v in options.items() if k != "d_model"})
                                for name, extra in zip(tail, per_layer)])

    def _memory_options(self, d_model, num_layers, mlp, mlp_options, scan_layers, rngs):
        """(layer indices with a memory or None for all, the ProductKeyMemory options).

        mlp_options beyond ProductKeyMemory's own: "layers" (indices of the layers whose MLP is
        a memory; the rest stay dense) and "shared_values" (one value table for all of them,
        built here and handed to each layer)."""
        if mlp not in MLP_KINDS:
            raise ValueError(f"`mlp` must be one of {MLP_KINDS}, got {mlp!r}")
        options = dict(mlp_options or {})
        if mlp != "pkm":
            self.memory_values = None
            if mlp != "dense":   # memory_bank, hopfield: their own options, every layer
                return None, options
            if options:
                raise ValueError(f"`mlp_options` are for mlp='pkm', 'memory_bank' or "
                                 f"'hopfield', got {sorted(options)} with mlp={mlp!r}")
            return None, None
        which = options.pop("layers", None)
        shared = bool(options.pop("shared_values", False))
        if (which is not None or shared) and scan_layers:
            raise ValueError("mlp_options 'layers' / 'shared_values' need scan_layers=False "
                             "(scanned layers are identical and own their parameters)")
        if which is not None:
            which = {int(i) for i in which}
            if not which or min(which) < 0 or max(which) >= num_layers:
                raise ValueError(f"mlp_options['layers'] must be layer indices in "
                                 f"[0, {num_layers}), got {sorted(which)}")
        if shared:
            from memzoo.memory_layers import MemoryValues
            n_keys = options.get("n_keys", 32)
            self.memory_values = MemoryValues(
                n_keys * n_keys, options.get("value_dim") or d_model,
                init_std=options.get("value_init_std"), rngs=rngs)
            options["values"] = self.memory_values
        else:
            self.memory_values = None
        return (which if which is not None else (set(range(num_layers)) if shared else None),
                options)

    def _apply(self) -> Callable:
        def apply(block, x, segment_ids, side):
            return _and_side(block(x, segment_ids=segment_ids, side=side), side)
        if self.remat == "none":
            return apply
        return nnx.remat(apply, policy=REMAT_POLICIES[self.remat])

    def side_channel(self, batch_size: int, length: int, tokens=None):
        """The side channel entering the first block (module docstring): the entries of every
        mixer here that reads one, and `tokens` where an MLP slot reads them, or None when
        nothing does."""
        blocks = list(self.layers) + ([] if self.scanned is None else list(self.scanned.blocks))
        side = {}
        for block in blocks:
            if block.reads_side:
                side.update(block.mixer.side_channel(batch_size, length))
        if any(block.mlp_reads_tokens for block in blocks):
            if tokens is None or tuple(tokens.shape) != (batch_size, length):
                raise ValueError(f"BlockStack: an MLP slot reads the token ids; pass `tokens` "
                                 f"[batch, time] = {(batch_size, length)}, got "
                                 f"{None if tokens is None else tuple(tokens.shape)}")
            side["tokens"] = tokens
        return side or None

    def __call__(self, x, *, segment_ids=None, tokens=None):
        apply = self._apply()
        side = self.side_channel(x.shape[0], x.shape[1], tokens)
        if self.scanned is not None:
            @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry, transform_metadata=LAYER_AXIS)
            def body(carry, group, segment_ids):
                return group(*carry, apply, segment_ids=segment_ids)
            x, side = body((x, side), self.scanned, segment_ids)
        for block in self.layers:
            x, side = apply(block, x, segment_ids, side)
        return x

    def init_cache(self, batch_size: int, max_len: int | None = None) -> StackCache:
        scanned = None
        if self.scanned is not None:
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=LAYER_AXIS)
            def init(group):
                return group.init_cache(batch_size, max_len)
            scanned = init(self.scanned)
        return StackCache(scanned, tuple(b.init_cache(batch_size, max_len) for b in self.layers))

    def prefill(self, x, cache: StackCache, tokens=None):
        scanned = None
        side = self.side_channel(x.shape[0], x.shape[1], tokens)
        if self.scanned is not None:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata=LAYER_AXIS)
            def body(carry, group, c):
                (x, c), side = group(*carry, None, cache=c)
                return (x, side), c
            (x, side), scanned = body((x, side), self.scanned, cache.scanned)
        new = []
        for block, c in zip(self.layers, cache.layers):
            (x, c), side = _and_side(block(x, cache=c, side=side), side)
            new.append(c)
        return x, StackCache(scanned, tuple(new))

    def step(self, x_t, cache: StackCache, tokens=None):
        """`tokens` [batch, 1]: the step's token ids (where an MLP slot reads them)."""
        scanned = None
        # one token: the mixers' step sees [b, 1, ...]
        side = self.side_channel(x_t.shape[0], 1, tokens)
        if self.scanned is not None:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata=LAYER_AXIS)
            def body(carry, group, c):
                x_t, side = carry
                (x_t, c), side = group.step(x_t, c, side)
                return (x_t, side), c
            (x_t, side), scanned = body((x_t, side), self.scanned, cache.scanned)
        new = []
        for block, c in zip(self.layers, cache.layers):
            (x_t, c), side = _and_side(block.step(x_t, c, side), side)
            new.append(c)
        return x_t, StackCache(scanned, tuple(new))


def _check_sizes(owner: str, **sizes: int) -> None:
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"{owner}: {', '.join(sizes)} must be positive ints, got "
                         + ", ".join(f"{k}={v!r}" for k, v in sizes.items()))


def _check_scalars(owner: str, **values) -> None:
    bad = {k: v for k, v in values.items() if v is not None and (
        isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0)}
    if bad:
        raise ValueError(f"{owner}: " + ", ".join(f"{k} must be a float > 0 or None, got {v!r}"
                                                  for k, v in bad.items()))


def _embed_tokens(table, tokens, dtype, scale: float | None, residual_fp32: bool):
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    if scale is not None:
        # In the compute dtype, as Gemma rounds its normaliser to the activations' dtype.
        x = x * jnp.asarray(scale, dtype)
    return x.astype(jnp.float32) if residual_fp32 else x


def _with_vocab(mlp: str, mlp_options, vocab_size: int):
    """mlp_options with the model's vocabulary size for an MLP slot that embeds token ids
    (MemoryBank's retrieval='tokens'), unless the options give one."""
    if mlp == "memory_bank" and (mlp_options or {}).get("retrieval") == "tokens":
        return {"vocab_size": vocab_size, **mlp_options}
    return mlp_options


def _embedding(vocab_size: int, d_model: int, rngs: nnx.Rngs) -> nnx.Param:
    # d_model^-0.5 keeps tied-head logits O(1) at initialisation.
    return layers.param(
        jax.random.normal(rngs.params(), (vocab_size, d_model), jnp.float32) * d_model ** -0.5,
        ("vocab", "embed"))


class CausalLM(nnx.Module):
    """tokens [batch, time] int -> logits [batch, time, vocab] float32.

    >>> lm = CausalLM(vocab_size=16, d_model=8, num_layers=2, mixer="s4d", rngs=nnx.Rngs(0))
    >>> lm(jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 16)

    Decoding: `cache = lm.init_cache(batch, max_len)`, `logits, cache = lm.prefill(tokens,
    cache)`, `logits_t, cache = lm.decode_step(token_t, cache)`; `memzoo.generate.generate`
    loops them under jit.

    `max_positions=P > 0` adds learned absolute position embeddings (GPT-2's; zoology's MQAR
    models use them) for positions 0..P-1, restarting at each packed segment. They give
    attention a previous-token pattern that RoPE alone must first learn a shared direction for.
    Longer inputs are refused; under jit a decode past P reuses position P - 1.
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, mixer: str = "s4d",
                 mixer_options: dict[str, Any] | None = None, mlp_ratio: int = 2,
                 norm: str = "rmsnorm", tie_embeddings: bool = True, scan_layers: bool = False,
                 remat: str = "none", dtype=jnp.float32, mlp: str = "dense",
                 mlp_options: dict[str, Any] | None = None, max_positions: int = 0,
                 mlp_hidden: int | None = None, mlp_activation: str = "silu",
                 norm_eps: float | None = None, residual_fp32: bool = False,
                 embed_scale: float | None = None, logit_softcap: float | None = None,
                 mlp_bias: bool = True, rngs: nnx.Rngs):
        _check_sizes("CausalLM", vocab_size=vocab_size, d_model=d_model, num_layers=num_layers)
        if not isinstance(max_positions, int) or max_positions < 0:
            raise ValueError(f"CausalLM: max_positions must be an int >= 0 (0: no learned "
                             f"positions), got {max_positions!r}")
        check_block_options("CausalLM", mlp_hidden=mlp_hidden, mlp_activation=mlp_activation,
                            norm_eps=norm_eps, residual_fp32=residual_fp32, mlp_bias=mlp_bias)
        _check_scalars("CausalLM", embed_scale=embed_scale, logit_softcap=logit_softcap)
        self.vocab_size, self.dtype, self.max_positions = vocab_size, dtype, max_positions
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self.logit_softcap = None if logit_softcap is None else float(logit_softcap)
        self.residual_fp32 = residual_fp32
        self.embed = _embedding(vocab_size, d_model, rngs)
        mlp_options = _with_vocab(mlp, mlp_options, vocab_size)
        self.positions = None if not max_positions else layers.param(
            jax.random.normal(rngs.params(), (max_positions, d_model), jnp.float32)
            * d_model ** -0.5, ("positions", "embed"))
        self.stack = BlockStack(d_model, num_layers, mixer, mixer_options=mixer_options,
                                mlp_ratio=mlp_ratio, norm=norm, scan_layers=scan_layers,
                                remat=remat, dtype=dtype, mlp=mlp, mlp_options=mlp_options,
                                mlp_hidden=mlp_hidden, mlp_activation=mlp_activation,
                                norm_eps=norm_eps, residual_fp32=residual_fp32,
                                mlp_bias=mlp_bias, rngs=rngs)
        self.final_norm = layers.norm(norm, d_model, dtype=dtype, rngs=rngs, epsilon=norm_eps)
        self.head = None if tie_embeddings else layers.Linear(
            d_model, vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dtype, rngs=rngs)

    def _embed(self, tokens, positions=None):
        if self.embed_scale is None and not self.residual_fp32:
            x = jnp.take(self.embed[...], tokens, axis=0)
            if self.positions is not None:
                x = x + jnp.take(self.positions[...], positions, axis=0, mode="clip")
            return x.astype(self.dtype)
        x = _embed_tokens(self.embed[...], tokens, self.dtype, self.embed_scale,
                          self.residual_fp32)
        if self.positions is not None:
            x = x + jnp.take(self.positions[...], positions, axis=0,
                             mode="clip").astype(x.dtype)
        return x

    def _check_length(self, owner: str, length: int, offset: int = 0) -> None:
        if self.positions is not None and offset + length > self.max_positions:
            raise ValueError(f"{owner}: {offset + length} positions, but the model learned "
                             f"max_positions={self.max_positions}")

    def _logits(self, x):
        return self.project(self.final_norm(x))

    def project(self, h):
        """The vocabulary projection: final hidden states [..., d_model] (after the final norm,
        as `features` returns them) -> float32 logits [..., vocab]."""
        if self.head is None:
            logits = jnp.einsum("...d,vd->...v", h,
                                self.embed[...].astype(self.dtype)).astype(jnp.float32)
        else:
            logits = self.head(h).astype(jnp.float32)
        if self.logit_softcap is not None:
            c = self.logit_softcap
            logits = c * jnp.tanh(logits / c)
        return logits

    def __call__(self, tokens, *, segment_ids=None):
        """`segment_ids` [batch, time] int marks packed documents: every mixer keeps them apart
        (no information crosses a change of id; memzoo.registry.SequenceMixer), and a mixer
        without the keyword makes Block raise a ValueError rather than let them mix."""
        return self.project(self.features(tokens, segment_ids=segment_ids))

    def features(self, tokens, *, segment_ids=None):
        """The final hidden states [batch, time, d_model] that `project` turns into logits:
        what memzoo.losses.cross_entropy_sums reads a chunk at a time."""
        check_tokens("CausalLM", tokens)
        if segment_ids is not None:
            check_segment_ids("CausalLM", segment_ids, tokens.shape)
        positions = None
        if self.positions is not None:
            self._check_length("CausalLM", tokens.shape[1])
            positions = (jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
                         if segment_ids is None else segment_positions(segment_ids))
        return self.final_norm(self.stack(self._embed(tokens, positions),
                                          segment_ids=segment_ids, tokens=tokens))

    def init_cache(self, batch_size: int, max_len: int | None = None) -> StackCache:
        """The state before any token; `max_len` sizes caches that grow (attention's)."""
        cache = self.stack.init_cache(batch_size, max_len)
        if self.positions is not None:
            cache = cache.replace(position=jnp.zeros((), jnp.int32))
        return cache

    def _positions(self, owner: str, cache: StackCache, length: int):
        if self.positions is None:
            return None
        if cache.position is None:
            raise ValueError(f"{owner}: this model has learned positions; pass a cache from "
                             f"its own init_cache (the given one has no position counter)")
        if not isinstance(cache.position, jax.core.Tracer):
            self._check_length(owner, length, int(cache.position))
        return cache.position + jnp.arange(length, dtype=jnp.int32)[None]

    def _advance(self, old: StackCache, new: StackCache, length: int) -> StackCache:
        return new if old.position is None else new.replace(position=old.position + length)

    def prefill(self, tokens, cache: StackCache):
        """(logits [b, t, vocab], cache after tokens), continuing from `cache`."""
        check_tokens("CausalLM.prefill", tokens)
        positions = self._positions("CausalLM.prefill", cache, tokens.shape[1])
        x, new = self.stack.prefill(self._embed(tokens, positions), cache, tokens)
        return self._logits(x), self._advance(cache, new, tokens.shape[1])

    def decode_step(self, token_t, cache: StackCache):
        """(logits [b, vocab], cache) for one token per row, token_t [b] int."""
        check_tokens("CausalLM.decode_step", token_t, ndim=1, legend="[batch]")
        positions = self._positions("CausalLM.decode_step", cache, 1)
        x_t, new = self.stack.step(self._embed(token_t, None if positions is None
                                                else positions[:, 0]), cache, token_t[:, None])
        return self._logits(x_t), self._advance(cache, new, 1)


class SequenceClassifier(nnx.Module):
    """tokens [batch, time] int -> class logits [batch, num_classes] float32.

    The CausalLM stack, a final norm, pooling over time ("mean", or "last": the last real
    token, which for causal mixers has seen the whole sequence), and a linear head. `mask`
    [batch, time] bool marks real tokens in padded batches (default: all real).

    >>> clf = SequenceClassifier(vocab_size=16, num_classes=3, d_model=8, num_layers=1,
    ...                          rngs=nnx.Rngs(0))
    >>> clf(jnp.zeros((2, 5), jnp.int32)).shape
    (2, 3)
    """

    def __init__(self, *, vocab_size: int, num_classes: int, d_model: int, num_layers: int,
                 mixer: str = "s4d", pooling: str = "mean",
                 mixer_options: dict[str, Any] | None = None, mlp_ratio: int = 2,
                 norm: str = "rmsnorm", scan_layers: bool = False, remat: str = "none",
                 dtype=jnp.float32, mlp: str = "dense", mlp_options: dict[str, Any] | None = None,
                 mlp_hidden: int | None = None, mlp_activation: str = "silu",
                 norm_eps: float | None = None, residual_fp32: bool = False,
                 embed_scale: float | None = None, mlp_bias: bool = True, rngs: nnx.Rngs):
        check_block_options("SequenceClassifier", mlp_hidden=mlp_hidden,
                            mlp_activation=mlp_activation, norm_eps=norm_eps,
                            residual_fp32=residual_fp32, mlp_bias=mlp_bias)
        _check_scalars("SequenceClassifier", embed_scale=embed_scale)
        _check_sizes("SequenceClassifier", vocab_size=vocab_size, num_classes=num_classes,
                     d_model=d_model, num_layers=num_layers)
        if pooling not in POOLINGS:
            raise ValueError(f"SequenceClassifier: pooling must be one of {POOLINGS}, "
                             f"got {pooling!r}")
        self.pooling, self.dtype = pooling, dtype
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self.residual_fp32 = residual_fp32
        self.embed = _embedding(vocab_size, d_model, rngs)
        mlp_options = _with_vocab(mlp, mlp_options, vocab_size)
        self.stack = BlockStack(d_model, num_layers, mixer, mixer_options=mixer_options,
                                mlp_ratio=mlp_ratio, norm=norm, scan_layers=scan_layers,
                                remat=remat, dtype=dtype, mlp=mlp, mlp_options=mlp_options,
                                mlp_hidden=mlp_hidden, mlp_activation=mlp_activation,
                                norm_eps=norm_eps, residual_fp32=residual_fp32,
                                mlp_bias=mlp_bias, rngs=rngs)
        self.final_norm = layers.norm(norm, d_model, dtype=dtype, rngs=rngs, epsilon=norm_eps)
        self.head = layers.Linear(d_model, num_classes, axes=("embed", "classes"), dtype=dtype,
                                  rngs=rngs)

    def __call__(self, tokens, *, mask=None, segment_ids=None):
        check_tokens("SequenceClassifier", tokens)
        if mask is not None and (not hasattr(mask, "shape")
                                 or tuple(mask.shape) != tuple(tokens.shape)):
            raise ValueError("SequenceClassifier: `mask` must be [batch, time] like tokens "
                             f"{tuple(tokens.shape)}, got {tuple(getattr(mask, 'shape', ()))}")
        if segment_ids is not None:
            check_segment_ids("SequenceClassifier", segment_ids, tokens.shape)
        x = _embed_tokens(self.embed[...], tokens, self.dtype, self.embed_scale,
                          self.residual_fp32)
        x = self.final_norm(self.stack(x, segment_ids=segment_ids, tokens=tokens)).astype(
            jnp.float32)
        T = tokens.shape[1]
        m = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
        if self.pooling == "mean":
            w = m.astype(jnp.float32)
            pooled = jnp.einsum("btd,bt->bd", x, w) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
        else:
            last = jnp.max(jnp.where(m, jnp.arange(T)[None], 0), axis=1)
            pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return self.head(pooled.astype(self.dtype)).astype(jnp.float32)


GRIFFIN_PATTERN = "rglru,rglru,attention"


def griffin_options(*, d_model: int, num_heads: int, window: int = 2049,
                    mlp_hidden: int | None = None, lru_width: int | None = None,
                    pattern: str = GRIFFIN_PATTERN, logit_softcap: float | None = 30.0,
                    embed_scale: float | None = None) -> dict[str, Any]:
    """CausalLM keywords for Griffin (De et al., 2024; recurrentgemma): two "rglru" blocks then
    one local-attention block, repeated; multi-query attention (one key/value head) over a
    `window` of tokens (itself included; recurrentgemma's attention_window_size + 1) with RoPE
    on half of each head and a biased output projection; a GeGLU MLP of width `mlp_hidden`
    (default 3 * d_model); RMSNorm eps 1e-6; input embeddings times sqrt(d_model) (or
    `embed_scale`); logits soft-capped at 30; a tied head. `num_heads` is shared by the
    attention and the RG-LRU's block-diagonal gates, as in recurrentgemma."""
    return dict(
        d_model=d_model, mixer=pattern, tie_embeddings=True, norm="rmsnorm", norm_eps=1e-6,
        mixer_options={
            "rglru": {"num_heads": num_heads, "lru_width": lru_width},
            "attention": {"num_heads": num_heads, "num_kv_heads": 1,
                          "head_dim": d_model // num_heads, "window": window,
                          "rope_fraction": 0.5, "out_bias": True}},
        mlp_hidden=3 * d_model if mlp_hidden is None else mlp_hidden,
        mlp_activation="gelu_tanh",
        embed_scale=math.sqrt(d_model) if embed_scale is None else embed_scale,
        logit_softcap=logit_softcap)


def griffin(*, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
            rngs: nnx.Rngs, window: int = 2049, mlp_hidden: int | None = None,
            lru_width: int | None = None, logit_softcap: float | None = 30.0,
            pattern: str = GRIFFIN_PATTERN, **options) -> CausalLM:
    """A Griffin CausalLM (`griffin_options`); `options` go to CausalLM (dtype, scan_layers,
    remat, ...)."""
    return CausalLM(vocab_size=vocab_size, num_layers=num_layers, rngs=rngs,
                    **griffin_options(d_model=d_model, num_heads=num_heads, window=window,
                                      mlp_hidden=mlp_hidden, lru_width=lru_width,
                                      pattern=pattern, logit_softcap=logit_softcap), **options)
