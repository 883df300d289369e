"""recurrentgemma (Griffin, JAX / Flax) parameters <-> memzoo CausalLM.

    model = from_recurrentgemma(params, config)      # params: the Flax tree, config: GriffinConfig
    params = to_recurrentgemma(model, config)         # back, the same arrays

`params` is recurrentgemma's parameter tree (`recurrentgemma.jax.load_parameters(...)`, or
`Griffin(config).init(...)`, with or without the top "params" level); `config` a GriffinConfig
or a mapping with its fields (vocab_size, width, mlp_expanded_width, num_heads, block_types,
embeddings_scale_by_sqrt_dim, attention_window_size, logits_soft_cap, lru_width). Nothing here
imports recurrentgemma.

How the two models line up (memzoo.models.griffin_options builds the memzoo side):

* blocks.i: temporal_pre_norm -> mixer -> residual, channel_pre_norm -> MLP -> residual, the
  pre-norm Block memzoo builds; recurrentgemma's RMSNorm multiplies by (1 + scale), so memzoo's
  scale is 1 + theirs.
* recurrent_block -> "rglru": linear_y (the GeLU branch) is gate_proj, linear_x in_proj, conv_1d
  (w [W, L], tap W-1 on the current token, as memzoo's) conv_weight / conv_bias, rg_lru's a_gate,
  input_gate ([H, L/H, L/H] blocks) and a_param as they are, linear_out out_proj.
* attention_block -> "attention": proj_q [d, H*k] is wq [d, H, k], proj_k / proj_v [d, k] one
  key/value head, proj_final wo [H, k, d] with out_bias; RoPE on the first half of each head;
  recurrentgemma's window w lets a token see the w before it, memzoo's window counts the token
  itself: w + 1.
* mlp_block: ffw_up w [2, d, E] (gate, value) and b [2, 1, 1, E] -> the GLU's [d, 2E] kernel
  [gate | value]; ffw_down as is; GeLU (tanh) gate.
* embedder: the tied table; inputs times sqrt(width) rounded to bfloat16, exactly as the
  reference multiplies; logits soft-capped at logits_soft_cap.

Not supported (an error naming the field): lru_only_real=False (complex RG-LRU; not a config
field there either, and no released checkpoint uses it).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memzoo.convert import ConversionError, Tensor, assign, extract
from memzoo.models import CausalLM, griffin_options

FIELDS = ("vocab_size", "width", "mlp_expanded_width", "num_heads", "block_types",
          "embeddings_scale_by_sqrt_dim", "attention_window_size", "logits_soft_cap",
          "lru_width")
KINDS = {"RECURRENT": "rglru", "ATTENTION": "attention"}


def _field(config, name: str, default: Any = ConversionError):
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    if value is ConversionError:
        raise ConversionError(f"recurrentgemma config: missing field {name!r}")
    return value


def _kind(block_type) -> str:
    name = str(getattr(block_type, "name", block_type)).upper().rsplit(".", 1)[-1]
    if name not in KINDS:
        raise ConversionError(f"recurrentgemma config: block_types entry {block_type!r} is "
                              f"neither RECURRENT nor ATTENTION")
    return KINDS[name]


def embed_scale(width: int) -> float:
    """sqrt(width) as recurrentgemma's Embedder applies it: rounded to bfloat16 first."""
    return float(jnp.sqrt(jnp.float32(width)).astype(jnp.bfloat16))


def model_options(config) -> dict[str, Any]:
    """CausalLM keywords (less rngs and dtype) for a GriffinConfig."""
    width, heads = int(_field(config, "width")), int(_field(config, "num_heads"))
    if width % heads:
        raise ConversionError(f"recurrentgemma config: num_heads={heads} must divide "
                              f"width={width}")
    kinds = [_kind(b) for b in _field(config, "block_types")]
    if not kinds:
        raise ConversionError("recurrentgemma config: block_types is empty")
    cap = _field(config, "logits_soft_cap", 0.0)
    options = griffin_options(
        d_model=width, num_heads=heads, window=int(_field(config, "attention_window_size")) + 1,
        mlp_hidden=int(_field(config, "mlp_expanded_width")),
        lru_width=_field(config, "lru_width", None), pattern=",".join(kinds),
        logit_softcap=float(cap) if cap else None,
        embed_scale=embed_scale(width) if _field(config, "embeddings_scale_by_sqrt_dim")
        else None)
    if options["embed_scale"] is None:
        del options["embed_scale"]
    return dict(vocab_size=int(_field(config, "vocab_size")), num_layers=len(kinds), **options)


def _plus_one(s):
    return np.asarray(s) + 1.0


def _minus_one(s):
    return np.asarray(s) - 1.0


def _rows(model: CausalLM, config) -> list[Tensor]:
    width, heads = int(_field(config, "width")), int(_field(config, "num_heads"))
    head_dim = width // heads
    rows = [Tensor("embedder/input_embedding", model, "embed"),
            Tensor("final_norm/scale", model.final_norm, "scale", _plus_one, _minus_one)]
    for i, block in enumerate(model.stack.layers):
        p = f"blocks.{i}/"
        rows += [Tensor(p + "temporal_pre_norm/scale", block.mixer_norm, "scale", _plus_one,
                        _minus_one),
                 Tensor(p + "channel_pre_norm/scale", block.mlp_norm, "scale", _plus_one,
                        _minus_one)]
        up, down = block.mlp.up.proj, block.mlp.down
        rows += [
            Tensor(p + "mlp_block/ffw_up/w", up, "kernel",
                   lambda w: np.concatenate([w[0], w[1]], axis=1),
                   lambda k: np.stack(np.split(k, 2, axis=1))),
            Tensor(p + "mlp_block/ffw_up/b", up, "bias",
                   lambda b: np.concatenate([b[0, 0, 0], b[1, 0, 0]]),
                   lambda b: np.stack(np.split(b, 2))[:, None, None]),
            Tensor(p + "mlp_block/ffw_down/kernel", down, "kernel"),
            Tensor(p + "mlp_block/ffw_down/bias", down, "bias")]
        mixer = block.mixer
        if block.mixer_name == "rglru":
            r = p + "recurrent_block/"
            rows += [Tensor(r + "linear_y/kernel", mixer.gate_proj, "kernel"),
                     Tensor(r + "linear_y/bias", mixer.gate_proj, "bias"),
                     Tensor(r + "linear_x/kernel", mixer.in_proj, "kernel"),
                     Tensor(r + "linear_x/bias", mixer.in_proj, "bias"),
                     Tensor(r + "conv_1d/w", mixer, "conv_weight"),
                     Tensor(r + "conv_1d/b", mixer, "conv_bias"),
                     Tensor(r + "rg_lru/a_param", mixer, "a_param"),
                     Tensor(r + "rg_lru/a_gate/w", mixer.a_gate, "kernel"),
                     Tensor(r + "rg_lru/a_gate/b", mixer.a_gate, "bias"),
                     Tensor(r + "rg_lru/input_gate/w", mixer.input_gate, "kernel"),
                     Tensor(r + "rg_lru/input_gate/b", mixer.input_gate, "bias"),
                     Tensor(r + "linear_out/kernel", mixer.out_proj, "kernel"),
                     Tensor(r + "linear_out/bias", mixer.out_proj, "bias")]
        else:
            a = p + "attention_block/"
            rows += [Tensor(a + "proj_q/kernel", mixer, "wq",
                            lambda w: w.reshape(width, heads, head_dim),
                            lambda w: w.reshape(width, heads * head_dim)),
                     Tensor(a + "proj_k/kernel", mixer, "wk",
                            lambda w: w.reshape(width, 1, head_dim),
                            lambda w: w.reshape(width, head_dim)),
                     Tensor(a + "proj_v/kernel", mixer, "wv",
                            lambda w: w.reshape(width, 1, head_dim),
                            lambda w: w.reshape(width, head_dim)),
                     Tensor(a + "proj_final/kernel", mixer, "wo",
                            lambda w: w.reshape(heads, head_dim, width),
                            lambda w: w.reshape(heads * head_dim, width)),
                     Tensor(a + "proj_final/bias", mixer, "out_bias")]
    return rows


def flatten(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested parameter tree -> {"blocks.0/recurrent_block/linear_x/kernel": array}, without a
    top "params" level."""
    if prefix == "" and set(params) == {"params"}:
        params = params["params"]
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v, np.float32)
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def from_recurrentgemma(params: Mapping, config, *, dtype=jnp.float32,
                        source: str = "recurrentgemma params", **options) -> CausalLM:
    """A memzoo CausalLM holding `params` (module docstring); `options` go to CausalLM (remat,
    ...; the layers stay unrolled, one memzoo Block per reference block)."""
    if options.get("scan_layers"):
        raise ConversionError("from_recurrentgemma: scan_layers=True is not supported (the "
                              "converter maps blocks.i to unrolled layer i)")
    kwargs = model_options(config)
    # Built abstractly: every parameter is then assigned, so nothing random is materialised.
    model = nnx.eval_shape(lambda: CausalLM(**kwargs, dtype=dtype, rngs=nnx.Rngs(0), **options))
    rows = _rows(model, config)
    for r in rows:  # abstract values take the assignment whole
        var = getattr(r.owner, r.attr)
        var.set_value(jnp.zeros(var.shape, jnp.float32))
    assign(rows, flatten(params), source)
    unset = [jax.tree_util.keystr(path) for path, leaf
             in jax.tree_util.tree_leaves_with_path(nnx.state(model))
             if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unset:  # a memzoo parameter the table does not fill: an option the reference lacks
        raise ConversionError(f"{source}: memzoo parameter(s) {unset[:8]} have no reference "
                              f"tensor")
    return model


def to_recurrentgemma(model: CausalLM, config) -> dict:
    """recurrentgemma's parameter tree (under "params") from a model `from_recurrentgemma`
    built or one with the same layout."""
    return {"params": unflatten(extract(_rows(model, config)))}


__all__ = ["from_recurrentgemma", "to_recurrentgemma", "model_options", "embed_scale",
           "flatten", "unflatten"]
