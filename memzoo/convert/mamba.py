"""mamba-ssm checkpoints (MambaLMHeadModel.save_pretrained: config.json + pytorch_model.bin)
<-> memzoo CausalLM with "mamba" or "mamba2" mixers.

The reference block is "add -> norm -> mixer" carrying the residual separately, which is the
pre-norm block memzoo builds (x + mixer(norm(x))) written another way; the final norm_f and
the (tied or not) lm_head follow. Its GatedMLP (d_intermediate > 0) computes
fc2(y * silu(gate)) with fc1's output split [y | gate], while memzoo's GLU splits [gate | value]:
the two halves of fc1 swap on the way in and back. mamba-ssm pads the vocabulary to a multiple
of pad_vocab_size_multiple; the memzoo model has the padded vocabulary, as the reference's
logits do.

Supported: Mamba1 / Mamba2 layers (ssm_cfg["layer"]) with their own options, RMSNorm or
LayerNorm, tied or untied heads, with or without the MLP. Not supported, each an error naming
the field: attention layers (attn_layer_idx), Mamba-2's d_ssm < d_inner, D_has_hdim,
rmsnorm=False, norm_before_gate=True, dt_init other than "random"/"constant" (an init only).
"""
from __future__ import annotations

import math

import numpy as np
from flax import nnx

from memzoo.convert import (TORCH_NAME, ConversionError, Tensor, assign, extract, linear,
                            require_zero_mlp_biases)

WEIGHTS_NAME = TORCH_NAME
# MambaLMHeadModel's defaults for what config.json may leave out.
MAMBA_CONFIG = dict(d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg={},
                    attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True,
                    fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)
# mamba_ssm.models.mixer_seq_simple.MixerModel's norm_epsilon (not a config field).
NORM_EPS = 1e-5
MLP_MULTIPLE = 128  # GatedMLP rounds its width up to this
MAMBA1 = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False)
MAMBA2 = dict(d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1,
              D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
              dt_limit=(0.0, float("inf")), bias=False, conv_bias=True, chunk_size=256)
# Reference options that only shape initialisation or the kernels' schedule, not the function.
IGNORED = {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range",
           "conv_init", "use_fast_path", "use_mem_eff_path", "layer", "chunk_size",
           "sequence_parallel", "process_group", "layer_idx"}


def detect(config: dict) -> bool:
    return "ssm_cfg" in config and "n_layer" in config and "model_type" not in config


def _conv(w):
    """torch depthwise Conv1d weight [C, 1, W] <-> memzoo [W, C] (tap W-1 = current token in
    both)."""
    return np.ascontiguousarray(np.asarray(w)[:, 0, :].T)


def _conv_back(w):
    return np.ascontiguousarray(np.asarray(w).T[:, None, :])


def _swap_halves(w):
    """fc1 [2H, d] as [y | gate] <-> memzoo GLU kernel [d, 2H] as [gate | value]."""
    h = w.shape[0] // 2
    return linear(np.concatenate([w[h:], w[:h]], axis=0))


def _swap_back(k):
    w = linear(k)
    h = w.shape[0] // 2
    return np.ascontiguousarray(np.concatenate([w[h:], w[:h]], axis=0))


def _config(config: dict) -> dict:
    unknown = sorted(set(config) - set(MAMBA_CONFIG))
    if unknown:
        raise ConversionError(f"config.json: unknown mamba-ssm MambaConfig field(s) {unknown}")
    return {**MAMBA_CONFIG, **config}


def mixer_options(ssm_cfg: dict, d_model: int) -> tuple[str, dict]:
    """(memzoo mixer name, its options) from config.json's ssm_cfg."""
    ssm_cfg = dict(ssm_cfg or {})
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ConversionError(f"config.json: ssm_cfg.layer={layer!r} is not supported "
                              f"(Mamba1 or Mamba2)")
    defaults = MAMBA1 if layer == "Mamba1" else MAMBA2
    unknown = sorted(set(ssm_cfg) - set(defaults) - IGNORED)
    if unknown:
        raise ConversionError(f"config.json: ssm_cfg field(s) {unknown} are not supported for "
                              f"{layer}")
    c = {**defaults, **ssm_cfg}
    if layer == "Mamba1" and c.get("dt_init", "random") not in ("random", "constant"):
        raise ConversionError(f"config.json: ssm_cfg.dt_init={c['dt_init']!r} is not supported")
    common = dict(state_size=int(c["d_state"]), expand=c["expand"], conv_width=int(c["d_conv"]),
                  conv_bias=bool(c["conv_bias"]), use_bias=bool(c["bias"]))
    if not isinstance(c["expand"], int) and not float(c["expand"]).is_integer():
        raise ConversionError(f"config.json: ssm_cfg.expand={c['expand']!r}: memzoo needs an "
                              f"integer expand")
    common["expand"] = int(c["expand"])
    if layer == "Mamba1":
        rank = c["dt_rank"]
        return "mamba", dict(common, dt_rank=math.ceil(d_model / 16) if rank == "auto"
                             else int(rank))
    d_inner = common["expand"] * d_model
    for field, want in (("d_ssm", (None, d_inner)), ("D_has_hdim", (False,)),
                        ("rmsnorm", (True,)), ("norm_before_gate", (False,))):
        if c[field] not in want:
            raise ConversionError(f"config.json: ssm_cfg.{field}={c[field]!r} is not supported "
                                  f"by memzoo's Mamba2 (supported: {want})")
    return "mamba2", dict(common, head_dim=int(c["headdim"]), num_groups=int(c["ngroups"]),
                          dt_limit=tuple(float(v) for v in c["dt_limit"]), norm_eps=1e-5)


def _mixer_rows(prefix: str, m, name: str) -> list[Tensor]:
    rows = [Tensor(f"{prefix}in_proj.weight", m.in_proj, "kernel", linear, linear),
            Tensor(f"{prefix}conv1d.weight", m, "conv_weight", _conv, _conv_back),
            Tensor(f"{prefix}A_log", m, "A_log"),
            Tensor(f"{prefix}D", m, "D_skip"),
            Tensor(f"{prefix}out_proj.weight", m.out_proj, "kernel", linear, linear)]
    if m.conv_bias is not None:
        rows.append(Tensor(f"{prefix}conv1d.bias", m, "conv_bias"))
    for proj in ("in_proj", "out_proj"):
        if getattr(m, proj).bias is not None:
            rows.append(Tensor(f"{prefix}{proj}.bias", getattr(m, proj), "bias"))
    if name == "mamba":
        rows += [Tensor(f"{prefix}x_proj.weight", m.x_proj, "kernel", linear, linear),
                 Tensor(f"{prefix}dt_proj.weight", m.dt_proj, "kernel", linear, linear),
                 Tensor(f"{prefix}dt_proj.bias", m, "dt_bias")]
    else:
        rows += [Tensor(f"{prefix}dt_bias", m, "dt_bias"),
                 Tensor(f"{prefix}norm.weight", m.norm, "scale")]
    return rows


def _rows(model, c: dict, mixer: str) -> list[Tensor]:
    rows = [Tensor("backbone.embedding.weight", model, "embed")]
    norms = [("norm", "mixer_norm"), ("norm2", "mlp_norm")]
    for i, block in enumerate(model.stack.layers):
        p = f"backbone.layers.{i}."
        rows += _mixer_rows(p + "mixer.", block.mixer, mixer)
        for ref, ours in norms:
            norm = getattr(block, ours)
            if norm is None:
                continue
            rows.append(Tensor(f"{p}{ref}.weight", norm, "scale"))
            if not c["rms_norm"]:
                rows.append(Tensor(f"{p}{ref}.bias", norm, "bias"))
        if block.mlp is not None:
            rows += [Tensor(f"{p}mlp.fc1.weight", block.mlp.up.proj, "kernel", _swap_halves,
                            _swap_back),
                     Tensor(f"{p}mlp.fc2.weight", block.mlp.down, "kernel", linear, linear)]
    rows.append(Tensor("backbone.norm_f.weight", model.final_norm, "scale"))
    if not c["rms_norm"]:
        rows.append(Tensor("backbone.norm_f.bias", model.final_norm, "bias"))
    if model.head is not None:
        rows.append(Tensor("lm_head.weight", model.head, "kernel", linear, linear))
    return rows


def model_options(config: dict) -> dict:
    """CausalLM keyword arguments for a mamba-ssm config.json."""
    c = _config(config)
    if c["attn_layer_idx"]:
        raise ConversionError(f"config.json: attn_layer_idx={c['attn_layer_idx']!r}: hybrid "
                              f"mamba-ssm stacks with attention layers are not supported")
    d = int(c["d_model"])
    mixer, options = mixer_options(c["ssm_cfg"], d)
    vocab, multiple = int(c["vocab_size"]), int(c["pad_vocab_size_multiple"])
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    hidden = int(c["d_intermediate"])
    if hidden:
        hidden = (hidden + MLP_MULTIPLE - 1) // MLP_MULTIPLE * MLP_MULTIPLE
    return dict(vocab_size=vocab, d_model=d, num_layers=int(c["n_layer"]), mixer=mixer,
                mixer_options={mixer: options}, mlp_hidden=hidden, mlp_activation="silu",
                norm="rmsnorm" if c["rms_norm"] else "layernorm", norm_eps=NORM_EPS,
                residual_fp32=bool(c["residual_in_fp32"]), mlp_bias=False,
                tie_embeddings=bool(c["tie_embeddings"]))


def build(config: dict, tensors: dict, *, source: str = TORCH_NAME, dtype=None, seed: int = 0):
    """A memzoo CausalLM holding a mamba-ssm checkpoint's weights."""
    from memzoo.models import CausalLM
    options = model_options(config)
    if dtype is not None:
        options["dtype"] = dtype
    model = CausalLM(**options, rngs=nnx.Rngs(seed))
    c = _config(config)
    # A tied head is saved under both names; the embedding is the one memzoo keeps.
    ignore = ("lm_head.weight",) if c["tie_embeddings"] else ()
    assign(_rows(model, c, options["mixer"]), tensors, source, ignore=ignore)
    return model


def export(model, config: dict) -> dict:
    """The state dict MambaLMHeadModel(config) saves, from a memzoo CausalLM."""
    c = _config(config)
    mixer = model_options(config)["mixer"]
    require_zero_mlp_biases(model, "mamba-ssm GatedMLP")
    tensors = extract(_rows(model, c, mixer))
    if c["tie_embeddings"]:
        tensors["lm_head.weight"] = tensors["backbone.embedding.weight"]
    return tensors
