"""Test-time memories: Titans' neural memory and its architectures (MAC, MAG, MAL), and the
Miras family (Moneta, Yaad, Memora) as configurations of the same machinery (core.py)."""
from memzoo.neural_memory.core import MemoryRule, chunk_update, chunked_memory
from memzoo.neural_memory.memory import MIRAS, NeuralMemory, NeuralMemoryCache
from memzoo.neural_memory.titans import TitansCache, TitansMAC, TitansMAG, TitansMAL
from memzoo.neural_memory.ttt import TTT

__all__ = ["MemoryRule", "chunk_update", "chunked_memory", "NeuralMemory", "NeuralMemoryCache",
           "MIRAS", "TitansCache", "TitansMAC", "TitansMAG", "TitansMAL"]
__all__ += ["TTT"]
