"""Builds a small flash-linear-attention (fla) causal LM, saves it with its own save_pretrained,
and writes its logits on fixed tokens: the golden side of tests/convert/test_golden_fla.py.

Run with the peers' torch (.peers/torch/bin/python, built by ../shared/peers/setup.sh):

    python fla_reference.py OUT_DIR MODEL_TYPE '{"hidden_size": 64, ...}'

writes OUT_DIR/checkpoint/{config.json, model.safetensors} and OUT_DIR/reference.npz (tokens,
logits [b, t, vocab] float32).

    python fla_reference.py OUT_DIR reload CHECKPOINT_DIR

loads CHECKPOINT_DIR (memzoo's write-back) with the model class's from_pretrained and fails
unless its logits on OUT_DIR's tokens equal OUT_DIR/reference.npz's exactly.

fla's layers call Triton kernels, which need a GPU. On a CPU exactly those calls are swapped,
while the models, their modules, weights and composition stay fla's:
  * the fused norms: fla.modules.norm.layernorm.rms_norm (RMSNorm, the blocks' fused add + norm)
    -> fla's own rms_norm_ref; fused_norm_gate.rms_norm_gated (FusedRMSNormGated) -> the same
    reference times the gate's activation;
  * ShortConvolution's forward and Gated DeltaNet's fused q/k/v causal_conv1d -> the module's
    own nn.Conv1d weights through torch.nn.functional.conv1d (causal padding, SiLU);
  * the gated MLP's fused swiglu_linear -> silu(gate) * up, then the down projection;
  * the chunked / fused-recurrent ops -> fla's naive recurrences: Gated DeltaNet
    naive_recurrent_gated_delta_rule (q/k L2 norm, sigmoid beta and the gate
    naive_gdn_gate(A_log, dt_bias) done as the kernels' flags ask); GLA naive_recurrent_gla;
    DeltaNet delta_rule_recurrence (after the q/k L2 norm its kernel flag asks for); RetNet
    naive_retention (the parallel form: its state is never asked for here); linear attention
    naive_recurrent_linear_attn;
  * the Triton rotary embedding (RetNet) -> fla's rotary_embedding_ref on the module's own
    cos/sin tables.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import fla.layers.delta_net as deltanet_layer
import fla.layers.gated_deltanet as gdn_layer
import fla.layers.gla as gla_layer
import fla.layers.linear_attn as linear_attn_layer
import fla.layers.multiscale_retention as retention_layer
import fla.modules.rotary.ops as rotary_ops
import fla.modules.mlp as mlp_module
from fla.models import (DeltaNetConfig, DeltaNetForCausalLM, GatedDeltaNetConfig,
                        GatedDeltaNetForCausalLM, GLAConfig, GLAForCausalLM,
                        LinearAttentionConfig, LinearAttentionForCausalLM, RetNetConfig,
                        RetNetForCausalLM)
from fla.modules.causal_conv1d.ops import ShortConvolution
from fla.modules.norm import fused_norm_gate, layernorm
from fla.ops.gated_delta_rule.gate import naive_gdn_gate
from fla.ops.delta_rule.naive import delta_rule_recurrence
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.ops.gla.naive import naive_recurrent_gla
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
from fla.ops.retention.naive import naive_retention

MODELS = {"gated_deltanet": (GatedDeltaNetConfig, GatedDeltaNetForCausalLM),
          "gla": (GLAConfig, GLAForCausalLM),
          "delta_net": (DeltaNetConfig, DeltaNetForCausalLM),
          "retnet": (RetNetConfig, RetNetForCausalLM),
          "linear_attn": (LinearAttentionConfig, LinearAttentionForCausalLM)}


def rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
             **unused):
    return layernorm.rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm,
                                  upcast=True)


def rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                   residual_in_fp32=False, eps=1e-6):
    assert residual is None and not prenorm
    y = layernorm.rms_norm_ref(x, weight, bias, eps=eps, upcast=True)
    g = g.float()
    return (y * (F.silu(g) if activation in ("swish", "silu") else torch.sigmoid(g))).to(x.dtype)


def conv(x, weight, bias, activation):
    """Depthwise causal conv of x [B, T, D] with weight [D, W] (+ SiLU)."""
    W = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), weight[:, None], bias,
                 groups=weight.shape[0]).transpose(1, 2)
    return F.silu(y) if activation in ("silu", "swish") else y


def short_conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False,
                       cu_seqlens=None, **unused):
    assert residual is None and mask is None and cache is None and cu_seqlens is None
    return conv(x, self.weight[:, 0], self.bias, self.activation), None


def fused_qkv_conv(x, weight=None, bias=None, activation=None, **unused):
    return conv(x, weight, bias, activation), None


def swiglu_linear(x, y, weight, bias):
    return F.linear(F.silu(x) * y, weight, bias)


def l2norm(x, eps=1e-6):
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                     allow_neg_eigval=False, use_gate_in_kernel=False, A_log=None, dt_bias=None,
                     scale=None, cu_seqlens=None, **unused):
    assert cu_seqlens is None
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid()
    if allow_neg_eigval:
        beta = beta * 2
    if use_gate_in_kernel:
        g = naive_gdn_gate(g, A_log, dt_bias)
    o, state = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale,
                                                initial_state=initial_state,
                                                output_final_state=output_final_state)
    return o.to(v.dtype), state


def gla(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, scale=None,
        cu_seqlens=None, **unused):
    assert cu_seqlens is None and scale is None
    o, state = naive_recurrent_gla(q, k, v, gk if gk is not None else g,
                                   initial_state=initial_state,
                                   output_final_state=output_final_state)
    return o, state


def delta_rule(q, k, v, beta, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, scale=None, cu_seqlens=None, **unused):
    assert cu_seqlens is None and scale is None
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    heads_first = lambda x: x.transpose(1, 2)  # the naive recurrence wants [B, H, T, ...]
    o, state = delta_rule_recurrence(heads_first(q), heads_first(k), heads_first(v),
                                     heads_first(beta), initial_state=initial_state,
                                     output_final_state=output_final_state)
    return heads_first(o).to(v.dtype), state


def retention(q, k, v, initial_state=None, output_final_state=False, **unused):
    assert initial_state is None and not output_final_state
    heads_first = lambda x: x.transpose(1, 2)
    return heads_first(naive_retention(heads_first(q), heads_first(k), heads_first(v))), None


def rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
           **unused):
    assert isinstance(seqlen_offsets, int) and cu_seqlens is None and not inplace
    T = x.shape[1]
    return rotary_ops.rotary_embedding_ref(x, cos[seqlen_offsets:seqlen_offsets + T],
                                           sin[seqlen_offsets:seqlen_offsets + T], interleaved)


def linear_attn(q, k, v, initial_state=None, output_final_state=False, normalize=False,
                scale=None, cu_seqlens=None, **unused):
    assert cu_seqlens is None
    return naive_recurrent_linear_attn(q, k, v, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state,
                                       normalize=normalize)


def patch():
    layernorm.rms_norm = rms_norm
    fused_norm_gate.rms_norm_gated = rms_norm_gated
    ShortConvolution.forward = short_conv_forward
    gdn_layer.causal_conv1d = fused_qkv_conv
    mlp_module.swiglu_linear = swiglu_linear
    gdn_layer.chunk_gated_delta_rule = gated_delta_rule
    gdn_layer.fused_recurrent_gated_delta_rule = gated_delta_rule
    deltanet_layer.chunk_delta_rule = deltanet_layer.fused_recurrent_delta_rule = delta_rule
    for name in ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention",
                 "parallel_retention"):
        setattr(retention_layer, name, retention)
    rotary_ops.rotary_embedding = rotary
    for name in ("chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn"):
        setattr(linear_attn_layer, name, linear_attn)
    gla_layer.fused_recurrent_gla = gla_layer.chunk_gla = gla_layer.fused_chunk_gla = gla


def randomize(model):
    """Away from the published init (norm weights 1, fixed decays): random values exercise every
    tensor's layout, so a transposed or swapped tensor cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(("bias", "dt_bias")):
                p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 4 + 0.5))
            elif "conv1d" in name:
                p.copy_(0.5 * torch.randn_like(p))


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float().numpy()


def main(out, model_type, fields, seed=0, batch=2, length=40):
    patch()
    torch.manual_seed(seed)
    config_cls, model_cls = MODELS[model_type]
    model = model_cls(config_cls(**fields))
    randomize(model)
    model.eval()
    model.save_pretrained(os.path.join(out, "checkpoint"))
    tokens = torch.randint(0, model.config.vocab_size, (batch, length))
    np.savez(os.path.join(out, "reference.npz"), tokens=tokens.numpy(),
             logits=logits_of(model, tokens))


def reload(out, checkpoint):
    patch()
    with open(os.path.join(checkpoint, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    model = MODELS[model_type][1].from_pretrained(checkpoint)
    model.eval()
    ref = np.load(os.path.join(out, "reference.npz"))
    logits = logits_of(model, torch.from_numpy(ref["tokens"]))
    if not np.array_equal(logits, ref["logits"]):
        sys.exit(f"reloaded logits differ: max |diff| {np.abs(logits - ref['logits']).max()}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2] == "reload":
        reload(sys.argv[1], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
