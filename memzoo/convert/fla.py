"""flash-linear-attention (fla) checkpoints (its Hugging Face models' save_pretrained:
config.json with model_type + model.safetensors) <-> memzoo CausalLM.

fla's causal LMs share one frame, memzoo's pre-norm block: embeddings, per layer
attn_norm -> attn -> residual, mlp_norm -> GatedMLP -> residual (RMSNorms with norm_eps), a final
norm and lm_head. The GatedMLP is down(silu(gate(x)) * up(x)), memzoo's SwiGLU with the GLU
kernel [gate | up]. Each mixer (`MIXERS` below) maps its layer's config fields to memzoo mixer
options and its tensors to the mixer's parameters; fla's per-channel projections
[heads * dim, d] become memzoo's [d, heads, dim], and its separate q/k/v short convolutions
memzoo's one depthwise convolution over the concatenated [q | k | v] channels.

Refused, each naming the config field: hybrid attention layers (attn), attention residuals
(attnres_block_size), an MLP activation other than swish, and per mixer the options memzoo's
mixer does not have (e.g. Gated DeltaNet's num_v_heads > num_heads). fla's allow_neg_eigval
(beta = 2 sigmoid) maps to the mixers' option of the same name.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from memzoo.convert import (SAFETENSORS_NAME, ConversionError, Tensor, assign, extract, linear,
                            require_zero_mlp_biases)

WEIGHTS_NAME = SAFETENSORS_NAME
# Fields of fla's configs that only steer kernels, training or generation, not the function.
IGNORED = {"architectures", "attn_mode", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
           "torch_dtype", "fuse_cross_entropy", "fuse_linear_cross_entropy", "fuse_norm",
           "fuse_swiglu", "initializer_range", "max_position_embeddings", "transformers_version",
           "use_cache", "use_l2warp", "model_type", "vocab_size", "hidden_size",
           "num_hidden_layers", "norm_eps", "tie_word_embeddings", "hidden_ratio",
           "intermediate_size", "hidden_act", "attn", "attnres_block_size"}


# ---- tensor layouts ----------------------------------------------------------------------

def heads_in(w, shape=None):
    """fla projection weight [heads * dim, d] <-> memzoo [d, heads, dim] (`shape`)."""
    return np.ascontiguousarray(np.asarray(w).T.reshape(shape))


def heads_in_back(p):
    return np.ascontiguousarray(np.asarray(p).reshape(p.shape[0], -1).T)


def heads_out(w, shape):
    """fla output projection [d, heads * dim] <-> memzoo [heads, dim, d]."""
    return np.ascontiguousarray(np.asarray(w).T.reshape(shape))


def heads_out_back(p):
    return np.ascontiguousarray(np.asarray(p).reshape(-1, p.shape[-1]).T)


def _proj(key, owner, attr):
    shape = tuple(getattr(owner, attr).shape)
    if len(shape) == 3 and attr == "wo":
        return Tensor(key, owner, attr, lambda w: heads_out(w, shape), heads_out_back)
    return Tensor(key, owner, attr, lambda w: heads_in(w, shape), heads_in_back)


def _qkvo(p: str, m) -> list[Tensor]:
    """The four attention-style projections every fla linear-attention layer has."""
    return [_proj(p + f"{n}_proj.weight", m, f"w{n}") for n in "qkvo"]


def _short_convs(keys, m):
    """fla's ShortConvolutions over q, k, v (each [channels, 1, W]) <-> memzoo's one conv [W,
    q + k + v channels]."""
    sizes = [m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim,
             m.num_kv_heads * m.value_dim]

    def to_memzoo(*ws):
        return np.ascontiguousarray(np.concatenate([w[:, 0, :] for w in ws], axis=0).T)

    def to_reference(p):
        cols = np.split(np.asarray(p).T, np.cumsum(sizes)[:-1], axis=0)
        return tuple(np.ascontiguousarray(c[:, None, :]) for c in cols)
    return Tensor(tuple(keys), m, "conv_weight", to_memzoo, to_reference)


def _field(c: dict, name: str, allowed, model_type: str):
    """The field's value (fla's default, allowed[0], when config.json leaves it out), refused
    unless in `allowed`."""
    value = c.get(name, allowed[0])
    if value not in allowed:
        raise ConversionError(f"config.json: {name}={value!r} is not supported for "
                              f"model_type={model_type!r} (supported: {list(allowed)})")
    return value


# ---- mixers: (config -> memzoo mixer + options, rows) ----------------------------------------

def gated_deltanet_options(c: dict) -> tuple[str, dict]:
    t = "gated_deltanet"
    H, K = int(c.get("num_heads", 6)), int(c.get("head_dim", 256))
    V = K * float(c.get("expand_v", 2.0))
    if not float(V).is_integer():
        raise ConversionError(f"config.json: head_dim * expand_v = {V} is not an integer")
    if c.get("num_v_heads") not in (None, H):
        raise ConversionError(f"config.json: num_v_heads={c['num_v_heads']!r} != num_heads={H} "
                              f"(fla's grouped value heads) is not supported by memzoo's "
                              f"gated_deltanet, whose grouping shares key/value heads instead")
    _field(c, "use_short_conv", (True,), t)
    neg = bool(_field(c, "allow_neg_eigval", (False, True), t))
    _field(c, "output_gate_activation", ("swish", "silu"), t)
    return t, dict(num_heads=H, head_dim=K, value_dim=int(V), qk_norm="l2",
                   conv_size=int(c.get("conv_size", 4)), output_norm="rmsnorm",
                   output_gate=bool(c.get("use_gate", True)),
                   norm_eps=float(c.get("norm_eps", 1e-6)), allow_neg_eigval=neg)


GATED_DELTANET_FIELDS = {"expand_v", "use_gate", "use_short_conv", "allow_neg_eigval",
                         "conv_size", "head_dim", "num_heads", "num_v_heads",
                         "output_gate_activation"}


def gated_deltanet_rows(p: str, m, c: dict) -> list[Tensor]:
    rows = [*_qkvo(p, m),
            _short_convs([p + f"{n}_conv1d.weight" for n in "qkv"], m),
            Tensor(p + "b_proj.weight", m.beta_proj, "kernel", linear, linear),
            Tensor(p + "a_proj.weight", m.decay_proj, "kernel", linear, linear),
            Tensor(p + "dt_bias", m.decay_proj, "bias"),
            Tensor(p + "A_log", m, "log_A"),
            Tensor(p + "o_norm.weight", m.o_norm, "scale")]
    if m.wg is not None:
        rows.append(_proj(p + "g_proj.weight", m, "wg"))
    return rows


def _heads_of(c: dict, expand_k: float, expand_v: float, owner: str) -> tuple[int, int, int]:
    """(num_heads, key dim per head, value dim per head) from hidden_size * expand_k / _v."""
    d, H = int(c["hidden_size"]), int(c.get("num_heads", 4))
    dims = []
    for name, expand in (("expand_k", expand_k), ("expand_v", expand_v)):
        total = d * float(expand)
        if not total.is_integer() or int(total) % H:
            raise ConversionError(f"config.json: hidden_size * {name} = {total} must be an "
                                  f"integer divisible by num_heads={H} ({owner})")
        dims.append(int(total) // H)
    return H, dims[0], dims[1]


def gla_options(c: dict) -> tuple[str, dict]:
    t = "gla"
    H, K, V = _heads_of(c, c.get("expand_k", 0.5), c.get("expand_v", 1.0), t)
    G = c.get("num_kv_heads") or H
    feature_map = _field(c, "feature_map", (None, "relu"), t)
    _field(c, "clamp_min", (None,), t)
    _field(c, "elementwise_affine", (True,), t)
    _field(c, "use_gk", (True,), t)
    _field(c, "use_gv", (False,), t)
    return t, dict(num_heads=H, num_kv_heads=int(G), head_dim=K, value_dim=V,
                   feature_map=feature_map or "identity",
                   conv_size=int(c.get("conv_size", 4)) if c.get("use_short_conv") else 0,
                   output_norm="rmsnorm", output_gate=bool(c.get("use_output_gate", True)),
                   norm_eps=float(c.get("norm_eps", 1e-6)))


GLA_FIELDS = {"expand_k", "expand_v", "num_heads", "num_kv_heads", "feature_map",
              "use_short_conv", "conv_size", "use_output_gate", "clamp_min",
              "elementwise_affine", "use_gk", "use_gv"}


def _fused_norm_gate(m, c: dict) -> bool:
    """Whether fla built GLA's / RetNet's output norm fused with the swish gate, which names
    its weight g_norm_swish_gate rather than g_norm."""
    return (m.wg is not None and c.get("fuse_norm", True)
            and c.get("hidden_act", "swish") == "swish")


def gla_rows(p: str, m, c: dict) -> list[Tensor]:
    rows = [*_qkvo(p, m),
            Tensor(p + "gk_proj.0.weight", m, "gate_down", linear, linear),
            _proj(p + "gk_proj.1.weight", m, "gate_up"),
            Tensor(p + "gk_proj.1.bias", m, "gate_bias",
                   lambda b: np.reshape(b, m.gate_bias.shape), lambda b: np.reshape(b, -1))]
    if m.conv_weight is not None:
        rows.append(_short_convs([p + f"{n}_conv1d.weight" for n in "qkv"], m))
    if m.wg is not None:
        rows.append(_proj(p + "g_proj.weight", m, "wg"))
    fused = _fused_norm_gate(m, c)
    rows.append(Tensor(p + ("g_norm_swish_gate.weight" if fused else "g_norm.weight"),
                       m.o_norm, "scale"))
    return rows


def deltanet_options(c: dict) -> tuple[str, dict]:
    t = "delta_net"
    H, K, V = _heads_of(c, c.get("expand_k", 1.0), c.get("expand_v", 1.0), t)
    _field(c, "use_short_conv", (True,), t)
    _field(c, "use_beta", (True,), t)
    neg = bool(_field(c, "allow_neg_eigval", (False, True), t))
    _field(c, "qk_norm", ("l2",), t)
    _field(c, "qk_activation", ("silu",), t)  # with the conv: its SiLU, nothing more
    return "deltanet", dict(num_heads=H, head_dim=K, value_dim=V, qk_norm="l2",
                            conv_size=int(c.get("conv_size", 4)), output_norm="rmsnorm",
                            output_gate=bool(c.get("use_gate", False)),
                            norm_eps=float(c.get("norm_eps", 1e-6)), allow_neg_eigval=neg)


# fla's DeltaNet layer takes use_output_norm and always norms, so the field changes nothing.
DELTANET_FIELDS = {"expand_k", "expand_v", "use_gate", "use_short_conv", "allow_neg_eigval",
                   "conv_size", "use_beta", "use_output_norm", "num_heads", "qk_norm",
                   "qk_activation"}


def deltanet_rows(p: str, m, c: dict) -> list[Tensor]:
    rows = [*_qkvo(p, m),
            _short_convs([p + f"{n}_conv1d.weight" for n in "qkv"], m),
            Tensor(p + "b_proj.weight", m.beta_proj, "kernel", linear, linear),
            Tensor(p + "o_norm.weight", m.o_norm, "scale")]
    if m.wg is not None:
        rows.append(_proj(p + "g_proj.weight", m, "wg"))
    return rows


def retnet_options(c: dict) -> tuple[str, dict]:
    t = "retnet"
    H, K, V = _heads_of(c, c.get("expand_k", 1.0), c.get("expand_v", 2.0), t)
    if c.get("num_kv_heads") not in (None, H):
        # fla decays each query head at its own rate 1 - 2^(-5-h), so the query heads sharing
        # a key/value head hold different states; memzoo keeps one state (one decay) per
        # key/value head.
        raise ConversionError(f"config.json: num_kv_heads={c['num_kv_heads']!r} != num_heads="
                              f"{H} is not supported for retnet (fla decays each query head "
                              f"at its own rate; memzoo shares one state per key/value head)")
    _field(c, "feature_map", (None,), t)
    _field(c, "elementwise_affine", (True,), t)
    # fla's RetNet model does not pass use_short_conv / conv_size to its layers: never a conv.
    return t, dict(num_heads=H, head_dim=K, value_dim=V, conv_size=0, output_norm="rmsnorm",
                   output_gate=bool(c.get("use_output_gate", True)), rotary=True,
                   rope_base=10_000.0, norm_eps=float(c.get("norm_eps", 1e-6)))


RETNET_FIELDS = {"expand_k", "expand_v", "num_heads", "num_kv_heads", "feature_map",
                 "use_short_conv", "conv_size", "use_output_gate", "elementwise_affine"}


def retnet_rows(p: str, m, c: dict) -> list[Tensor]:
    rows = [*_qkvo(p, m)]
    if m.wg is not None:
        rows.append(_proj(p + "g_proj.weight", m, "wg"))
    fused = _fused_norm_gate(m, c)
    rows.append(Tensor(p + ("g_norm_swish_gate.weight" if fused else "g_norm.weight"),
                       m.o_norm, "scale"))
    return rows


# fla's feature_map names -> memzoo's (those with learned maps, e.g. the default
# "elementwise_product", "hedgehog", "t2r", and "dpfp", have no memzoo counterpart).
FEATURE_MAPS = {"elu": "elu+1", "relu": "relu", "identity": "identity"}


def linear_attn_options(c: dict) -> tuple[str, dict]:
    t = "linear_attn"
    H, K, V = _heads_of(c, c.get("expand_k", 1.0), c.get("expand_v", 1.0), t)
    feature_map = _field(c, "feature_map", ("elementwise_product", *FEATURE_MAPS), t)
    if feature_map not in FEATURE_MAPS:
        raise ConversionError(f"config.json: feature_map={feature_map!r} (a learned feature map) "
                              f"is not supported; memzoo's linear_attention has "
                              f"{sorted(FEATURE_MAPS)}")
    _field(c, "norm_q", (False,), t)
    _field(c, "norm_k", (False,), t)
    _field(c, "elementwise_affine", (True,), t)
    normalize = bool(c.get("norm_feature_map", False))
    if normalize and feature_map == "identity":
        raise ConversionError("config.json: norm_feature_map=True with feature_map='identity' "
                              "is not supported (memzoo normalises positive features only)")
    # fla's model always builds the layer's RMSNorm output norm and no gate.
    return "linear_attention", dict(num_heads=H, num_kv_heads=int(c.get("num_kv_heads") or H),
                                    head_dim=K, value_dim=V, feature_map=FEATURE_MAPS[feature_map],
                                    normalize=normalize, output_norm="rmsnorm",
                                    output_gate=False, norm_eps=float(c.get("norm_eps", 1e-6)))


LINEAR_ATTN_FIELDS = {"expand_k", "expand_v", "num_heads", "num_kv_heads", "feature_map",
                      "tie_feature_map_qk", "norm_q", "norm_k", "norm_feature_map",
                      "elementwise_affine"}


def linear_attn_rows(p: str, m, c: dict) -> list[Tensor]:
    return [*_qkvo(p, m),
            Tensor(p + "norm.weight", m.o_norm, "scale")]


# model_type -> (options from config, tensor rows of one layer's mixer, the config fields read)
MIXERS = {
    "gated_deltanet": (gated_deltanet_options, gated_deltanet_rows, GATED_DELTANET_FIELDS),
    "gla": (gla_options, gla_rows, GLA_FIELDS),
    "delta_net": (deltanet_options, deltanet_rows, DELTANET_FIELDS),
    "retnet": (retnet_options, retnet_rows, RETNET_FIELDS),
    "linear_attn": (linear_attn_options, linear_attn_rows, LINEAR_ATTN_FIELDS),
}


# ---- the model frame ---------------------------------------------------------------------------

def detect(config: dict) -> bool:
    return config.get("model_type") in MIXERS


def _mixer(config: dict):
    t = config.get("model_type")
    if t not in MIXERS:
        raise ConversionError(f"config.json: model_type={t!r} is not a supported fla model "
                              f"(supported: {sorted(MIXERS)})")
    return MIXERS[t]


def mlp_width(c: dict) -> int:
    """GatedMLP's width: intermediate_size, or 2/3 * hidden_ratio * hidden_size rounded up to
    a multiple of 256, as fla computes it."""
    if c.get("intermediate_size") is not None:
        return int(c["intermediate_size"])
    ratio = c.get("hidden_ratio") or 4
    width = int(c["hidden_size"] * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


def model_options(config: dict) -> dict:
    """CausalLM keyword arguments for an fla config.json."""
    options_of, _, fields = _mixer(config)
    t = config["model_type"]
    unknown = sorted(set(config) - IGNORED - fields)
    if unknown:
        raise ConversionError(f"config.json: field(s) {unknown} of model_type={t!r} are not "
                              f"supported by memzoo.convert.fla")
    if config.get("attn") is not None:
        raise ConversionError("config.json: attn is set (hybrid softmax-attention layers), "
                              "which memzoo.convert.fla does not support")
    if config.get("attnres_block_size") is not None:
        raise ConversionError("config.json: attnres_block_size is set (attention residuals), "
                              "which memzoo does not support")
    _field(config, "hidden_act", ("swish",), t)
    for name in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(config.get(name), int):
            raise ConversionError(f"config.json: {name} must be an int, got "
                                  f"{config.get(name)!r}")
    mixer, options = options_of(config)
    return dict(vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                num_layers=config["num_hidden_layers"], mixer=mixer,
                mixer_options={mixer: options}, mlp_hidden=mlp_width(config),
                mlp_activation="silu", mlp_bias=False, norm="rmsnorm",
                norm_eps=float(config.get("norm_eps", 1e-6)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def _mlp_in(gate, up):
    return np.ascontiguousarray(np.concatenate([gate.T, up.T], axis=1))


def _mlp_in_back(k):
    gate, up = np.split(np.asarray(k), 2, axis=1)
    return np.ascontiguousarray(gate.T), np.ascontiguousarray(up.T)


def _rows(model, config: dict) -> list[Tensor]:
    _, mixer_rows, _ = _mixer(config)
    rows = [Tensor("model.embeddings.weight", model, "embed")]
    for i, block in enumerate(model.stack.layers):
        p = f"model.layers.{i}."
        rows.append(Tensor(p + "attn_norm.weight", block.mixer_norm, "scale"))
        rows += mixer_rows(p + "attn.", block.mixer, config)
        rows += [Tensor(p + "mlp_norm.weight", block.mlp_norm, "scale"),
                 Tensor((p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                        block.mlp.up.proj, "kernel", _mlp_in, _mlp_in_back),
                 Tensor(p + "mlp.down_proj.weight", block.mlp.down, "kernel", linear, linear)]
    rows.append(Tensor("model.norm.weight", model.final_norm, "scale"))
    if model.head is not None:
        rows.append(Tensor("lm_head.weight", model.head, "kernel", linear, linear))
    return rows


def build(config: dict, tensors: dict, *, source: str = SAFETENSORS_NAME, dtype=None,
          seed: int = 0):
    """A memzoo CausalLM holding an fla checkpoint's weights."""
    from memzoo.models import CausalLM
    options = model_options(config)
    if dtype is not None:
        options["dtype"] = dtype
    model = CausalLM(**options, rngs=nnx.Rngs(seed))
    # A tied head may be saved beside the embedding it equals; memzoo keeps the embedding.
    ignore = ("lm_head.weight",) if options["tie_embeddings"] else ()
    assign(_rows(model, config), tensors, source, ignore=ignore)
    return model


def export(model, config: dict) -> dict:
    """The state dict fla's model for `config` saves, from a memzoo CausalLM."""
    model_options(config)  # the same checks as loading
    require_zero_mlp_biases(model, "fla GatedMLP")
    return extract(_rows(model, config))
