"""Linear state-space memories: HiPPO, S4D, S5, Mamba, Mamba-2, Griffin's RG-LRU (importing
registers "hippo_rnn", "s4d", "s5", "mamba", "mamba2", "rglru")."""
from memzoo.ssm import discretization, hippo
from memzoo.ssm.block import SSMBlock
from memzoo.ssm.hippo import HippoOperator, HippoRNN, HippoRNNCache, hippo_matrices
from memzoo.ssm.s4d import S4D, S4DBlock, SSMCache, s4d_kernel
from memzoo.ssm.s5 import S5, S5Block
from memzoo.ssm.mamba import Mamba, MambaCache
from memzoo.ssm.mamba2 import Mamba2
from memzoo.ssm.rglru import RGLRU, RGLRUCache

__all__ = ["discretization", "hippo", "SSMBlock", "HippoOperator", "HippoRNN", "HippoRNNCache",
           "hippo_matrices", "S4D", "S4DBlock", "SSMCache", "s4d_kernel", "S5", "S5Block", "Mamba",
           "MambaCache", "Mamba2", "RGLRU", "RGLRUCache"]
