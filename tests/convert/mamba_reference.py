"""Builds a small mamba-ssm MambaLMHeadModel, saves it with its own save_pretrained, and writes
its logits on fixed tokens: the golden side of tests/convert/test_golden_mamba.py.

Run with the peers' torch (.peers/torch/bin/python, built by ../shared/peers/setup.sh):

    python mamba_reference.py OUT_DIR '{"layer": "Mamba2", ...}' '{"d_model": 64, ...}'

writes OUT_DIR/checkpoint/{config.json, pytorch_model.bin} and OUT_DIR/reference.npz (tokens,
logits [b, t, vocab] float32).

    python mamba_reference.py OUT_DIR reload CHECKPOINT_DIR

loads CHECKPOINT_DIR (memzoo's write-back) as from_pretrained does (config.json into
MambaConfig, then a strict load_state_dict) and fails unless its logits on OUT_DIR's tokens
equal OUT_DIR/reference.npz's exactly.

On a CPU, mamba-ssm's forward reaches GPU-only kernels; exactly those calls are swapped for the
package's own pure-PyTorch references, while the modules, their weights and how they compose
stay mamba-ssm's:
  * the Triton fused add + norm (layer_norm_fn / rms_norm_fn, used by Block, MixerModel and the
    Triton RMSNorm module) -> mamba_ssm.ops.triton.layer_norm.layer_norm_ref / rms_norm_ref;
  * Mamba-1's CUDA selective_scan_fn -> mamba_ssm's selective_scan_ref (the fused
    mamba_inner_fn path is off on its own: causal_conv1d is not installed, so the module's
    torch Conv1d path runs);
  * Mamba-2's Triton mamba_chunk_scan_combined -> ssd_minimal_discrete (the Mamba-2 paper's
    listing, shipped in mamba_ssm.modules.ssd_minimal) with the D skip, dt bias and softplus
    done as mamba_chunk_scan_combined documents them; the fused mamba_split_conv1d_scan_combined
    path is switched off per module (use_mem_eff_path=False), which takes the module's own
    unfused forward;
  * Mamba-2's Triton gated RMSNorm (layernorm_gated.rmsnorm_fn) -> layernorm_gated.rms_norm_ref.
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".peers"))
import peers  # noqa: E402  (registers the CUDA-extension stub mamba_ssm imports)

peers.mamba()

import torch.nn.functional as F  # noqa: E402
from einops import repeat  # noqa: E402
from mamba_ssm.models import mixer_seq_simple  # noqa: E402
from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.modules import block as block_module  # noqa: E402
from mamba_ssm.modules import mamba2 as mamba2_module  # noqa: E402
from mamba_ssm.modules import mamba_simple  # noqa: E402
from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete  # noqa: E402
from mamba_ssm.ops import selective_scan_interface  # noqa: E402
from mamba_ssm.ops.triton import layer_norm, layernorm_gated  # noqa: E402


def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False,
                  residual_in_fp32=False, is_rms_norm=False, **unused):
    ref = layer_norm.rms_norm_ref if is_rms_norm else layer_norm.layer_norm_ref
    out = ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
    if prenorm and residual_in_fp32:
        out = (out[0], out[1].float())
    return out


def rms_norm_fn(x, weight, bias, **kw):
    return layer_norm_fn(x, weight, bias, is_rms_norm=True, **kw)


def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
               seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
               return_final_states=False, return_varlen_states=False):
    assert z is None and seq_idx is None and cu_seqlens is None and initial_states is None
    b, T, H, P = x.shape
    G = B.shape[2]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    Bh, Ch = (repeat(a, "b l g n -> b l (g h) n", h=H // G).float() for a in (B, C))
    pad = (-T) % chunk_size  # zero steps (dt = 0) leave the state as it is
    X = F.pad(x.float() * dt[..., None], (0, 0, 0, 0, 0, pad))
    dA = F.pad(dt * A, (0, 0, 0, pad))
    Bh, Ch = (F.pad(a, (0, 0, 0, 0, 0, pad)) for a in (Bh, Ch))
    y, state = ssd_minimal_discrete(X, dA, Bh, Ch, chunk_size)
    y = y[:, :T]
    if D is not None:
        y = y + x.float() * (D[:, None] if D.dim() == 1 else D)
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def gated_rmsnorm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    return layernorm_gated.rms_norm_ref(x, weight, bias, z=z, eps=eps, group_size=group_size,
                                        norm_before_gate=norm_before_gate)


def patch():
    for module in (layer_norm, block_module, mixer_seq_simple):
        module.layer_norm_fn = layer_norm_fn
        if hasattr(module, "rms_norm_fn"):
            module.rms_norm_fn = rms_norm_fn
    mamba_simple.selective_scan_fn = selective_scan_interface.selective_scan_ref
    mamba2_module.mamba_chunk_scan_combined = chunk_scan
    layernorm_gated.rmsnorm_fn = gated_rmsnorm


def main(out, ssm_cfg, model_cfg, seed=0, batch=2, length=40):
    patch()
    torch.manual_seed(seed)
    config = MambaConfig(ssm_cfg=ssm_cfg, **model_cfg)
    model = mixer_seq_simple.MambaLMHeadModel(config)
    # Away from the published init (A_log, dt, D, norms at their defaults, zero biases): random
    # values exercise every tensor's layout, so a transposed or swapped tensor cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm2.weight", "norm_f.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(("bias", ".D")):
                p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(p + 0.3 * torch.randn_like(p))
    for m in model.modules():
        if isinstance(m, mamba2_module.Mamba2):
            m.use_mem_eff_path = False
    model.eval()
    model.save_pretrained(os.path.join(out, "checkpoint"))
    tokens = torch.randint(0, config.vocab_size, (batch, length))
    with torch.no_grad():
        logits = model(tokens).logits.float().numpy()
    np.savez(os.path.join(out, "reference.npz"), tokens=tokens.numpy(), logits=logits)


def reload(out, checkpoint):
    patch()
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = MambaConfig(**json.load(f))
    model = mixer_seq_simple.MambaLMHeadModel(config)
    state = torch.load(os.path.join(checkpoint, "pytorch_model.bin"), weights_only=True)
    model.load_state_dict(state, strict=True)
    for m in model.modules():
        if isinstance(m, mamba2_module.Mamba2):
            m.use_mem_eff_path = False
    model.eval()
    ref = np.load(os.path.join(out, "reference.npz"))
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["tokens"])).logits.float().numpy()
    if not np.array_equal(logits, ref["logits"]):
        sys.exit(f"reloaded logits differ: max |diff| {np.abs(logits - ref['logits']).max()}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2] == "reload":
        reload(sys.argv[1], sys.argv[3])
    else:
        main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))
