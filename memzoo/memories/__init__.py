"""Memories from the reading list's later tier, each a registered mixer: JRT-RNN's prefix linear
attention ("jrt"), Local Linear Attention ("local_linear_attention"), the Hierarchical Chunk
Attention Memory ("hcam"), the Token Turing Machine ("ttm") and Memory Mosaics
("memory_mosaic"). Importing registers them in memzoo.MIXERS.
"""
from memzoo.memories.hcam import HCAM, hcam_read
from memzoo.memories.jrt import JRT, JRTCache
from memzoo.memories.local_linear_attention import LocalLinearAttention, local_linear_read
from memzoo.memories.memory_mosaics import MemoryMosaic, MosaicCache
from memzoo.memories.ttm import TokenTuringMachine, TTMCache

__all__ = ["HCAM", "hcam_read", "JRT", "JRTCache", "LocalLinearAttention", "local_linear_read",
           "MemoryMosaic", "MosaicCache",
           "TokenTuringMachine", "TTMCache"]
