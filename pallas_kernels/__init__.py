"""memzoo's kernel library: one folder per op, each with a pure-JAX reference, an XLA path and
Pallas kernels for TPU (Mosaic) and GPU (Triton), chosen by `implementation=` (see _dispatch).

The contract every op keeps is in WORKSPACE.md ("The kernel contract").
"""
from pallas_kernels._dispatch import IMPLEMENTATIONS, kernel_axes, pallas_interpret
from pallas_kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from pallas_kernels.delta_rule import delta_rule
from pallas_kernels.dplr_delta_rule import dplr_delta_rule
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.chunked_linear_attention import chunked_linear_attention
from pallas_kernels.linear_scan import linear_scan
from pallas_kernels.memory_lookup import memory_lookup
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.sequence_parallel import sequence_parallel

__all__ = ["IMPLEMENTATIONS", "causal_conv1d", "causal_conv1d_update", "chunked_linear_attention", "delta_rule", "dplr_delta_rule", "flash_attention", "kernel_axes", "linear_scan", "memory_lookup", "pallas_interpret", "selective_scan",
           "sequence_parallel"]
