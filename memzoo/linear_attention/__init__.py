"""The linear-attention family: matrix-state memories on pallas_kernels.chunked_linear_attention
and pallas_kernels.delta_rule. Importing registers "linear_attention", "retnet", "gla",
"deltanet", "gated_deltanet" and "mom" in memzoo.MIXERS (and "hgrn", "hgrn2", "gsa",
"based", "rebased"; "gated_deltaproduct", "comba", "kda", "rwkv7", the last two on
pallas_kernels.dplr_delta_rule).

The shared body (projections, short conv, q/k norms, GQA, output norm and gate, the decoding
cache) is `common.LinearMemory`; each file adds one memory's gates.
"""
from memzoo.linear_attention.based import Based, BasedCache, ReBased
from memzoo.linear_attention.common import LinearAttentionCache, LinearMemory, run_memory
from memzoo.linear_attention.deltanet import DeltaNet, GatedDeltaNet
from memzoo.linear_attention.deltaproduct import Comba, GatedDeltaProduct
from memzoo.linear_attention.gla import GLA
from memzoo.linear_attention.gsa import GatedSlotAttention
from memzoo.linear_attention.hgrn import HGRN, HGRN2
from memzoo.linear_attention.kda import RWKV7, KimiDeltaAttention
from memzoo.linear_attention.linear_attention import LinearAttention
from memzoo.linear_attention.mom import MixtureOfMemories
from memzoo.linear_attention.retnet import RetNet, retention_decays
from memzoo.linear_attention.mlstm import MLSTM, mlstm_memory
from memzoo.linear_attention.slstm import SLSTM, SLSTMCache, slstm_scan, slstm_step
from memzoo.linear_attention.rwkv6 import RWKV6

__all__ = ["LinearAttentionCache", "LinearMemory", "run_memory", "LinearAttention", "RetNet",
           "retention_decays", "Based", "BasedCache", "ReBased", "GLA", "GatedSlotAttention", "HGRN", "HGRN2", "DeltaNet", "GatedDeltaNet", "MixtureOfMemories"]
__all__ += ["RWKV6", "MLSTM", "mlstm_memory"]
__all__ += ["SLSTM", "SLSTMCache", "slstm_scan", "slstm_step"]
__all__ += ["GatedDeltaProduct", "Comba", "KimiDeltaAttention", "RWKV7"]
