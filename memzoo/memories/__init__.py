"""Memories from the reading list's later tier, each a registered mixer: JRT-RNN's prefix linear
attention ("jrt"), Local Linear Attention ("local_linear_attention"), the Hierarchical Chunk
Attention Memory ("hcam"), the Token Turing Machine ("ttm"), Memory Mosaics
("memory_mosaic"), the Neural Turing Machine ("ntm") and
End-to-End Memory Networks ("memn2n"). Importing registers them in memzoo.MIXERS.
RecurrentMemoryLM (RMT / HMT) is a model wrapper, not a mixer (rmt.py).
"""
from memzoo.memories.hcam import HCAM, hcam_read
from memzoo.memories.jrt import JRT, JRTCache
from memzoo.memories.local_linear_attention import LocalLinearAttention, local_linear_read
from memzoo.memories.memn2n import MemN2N, MemN2NCache
from memzoo.memories.memory_mosaics import MemoryMosaic, MosaicCache
from memzoo.memories.ntm import NeuralTuringMachine, NTMCache
from memzoo.memories.rmt import MemoryState, RecurrentMemoryCache, RecurrentMemoryLM
from memzoo.memories.ttm import TokenTuringMachine, TTMCache

__all__ = ["HCAM", "hcam_read", "JRT", "JRTCache", "LocalLinearAttention", "local_linear_read",
           "MemN2N", "MemN2NCache", "MemoryMosaic", "MosaicCache",
           "NeuralTuringMachine", "NTMCache",
           "RecurrentMemoryLM", "RecurrentMemoryCache", "MemoryState",
           "TokenTuringMachine", "TTMCache"]
