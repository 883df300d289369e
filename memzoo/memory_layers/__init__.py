"""Memory layers: large parametric memories read per token.

* `ProductKeyMemory` (product_key.py): product-key memory (Lample et al., 2019) with the options
  of "Memory Layers at Scale" (shared values, q/k norm, silu-gated output, a value table sharded
  along its embedding dimension, its own optimizer group). Read through
  `pallas_kernels.memory_lookup`. Usable in place of a block's MLP (memzoo.models, `mlp="pkm"`).
* `Hopfield` (hopfield.py): modern Hopfield retrieval xi_new = X softmax(beta X^T xi), over
  learned stored patterns or over the input (associative attention).

Both are per-token maps (Hopfield over the input is causal attention, not a recurrence), so a
parallel call and token-by-token calls agree trivially; neither is registered as a mixer.
`HopfieldMixer` (hopfield.py) is: the mixer "hopfield", multi-head causal Hopfield association
over the input's past tokens with a KV cache.
* `MemoryBank` (memory_bank.py): hierarchical memory banks (Pouransari et al., 2025), FFN blocks
  fetched per token by a learned key of a causal context summary, added to an anchor FFN
  (`mlp="memory_bank"`; its summary is state, carried in the block's cache).
"""
from memzoo.memory_layers.hopfield import (Hopfield, HopfieldMixer, hopfield_energy,
                                           hopfield_retrieve)
from memzoo.memory_layers.memory_bank import MemoryBank
from memzoo.memory_layers.product_key import (QUERY_NORMS, MemoryValues, ProductKeyMemory,
                                              product_key_topk)

__all__ = ["MemoryBank", "Hopfield", "HopfieldMixer", "hopfield_energy", "hopfield_retrieve", "MemoryValues", "ProductKeyMemory", "QUERY_NORMS", "product_key_topk"]
