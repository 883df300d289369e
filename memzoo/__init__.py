"""memzoo: a JAX / Flax NNX zoo of sequence memories.

Every memory is a mixer [batch, time, d_model] -> [batch, time, d_model] registered by name in
`MIXERS` (see memzoo.registry for the decoding protocol every mixer keeps).
"""
from memzoo import attention, layers, linear_attention, memory_layers, neural_memory, ssm
from memzoo import memories  # after linear_attention: JRT builds on it
from memzoo.attention import Attention, KVCache
from memzoo.registry import (MIXERS, SequenceMixer, UnknownMixerError, accepts_keyword,
                              build_mixer, register_mixer)
from memzoo.ssm import (RGLRU, S4D, S5, HippoRNN, HippoRNNCache, Mamba, Mamba2, MambaCache,
                        RGLRUCache, S4DBlock, S5Block, SSMBlock, SSMCache)

__all__ = ["MIXERS", "register_mixer", "build_mixer", "SequenceMixer", "UnknownMixerError",
           "accepts_keyword",
           "attention", "Attention", "linear_attention", "memories", "memory_layers", "neural_memory", "KVCache", "layers", "ssm", "HippoRNN", "HippoRNNCache", "S4D", "S4DBlock", "S5", "S5Block",
           "SSMBlock", "SSMCache", "Mamba", "Mamba2", "MambaCache", "RGLRU", "RGLRUCache"]
