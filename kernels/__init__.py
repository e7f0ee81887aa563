"""Hot ops behind one dispatch point: the engine's layers call only these functions.

Today every op runs its pure-torch reference (kernels/reference.py); the Triton kernels take over
for CUDA tensors as they land, with the reference kept as their test oracle.
"""

from kernels.reference import paged_decode_attention, paged_prefill_attention, store_kvcache

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kvcache"]
