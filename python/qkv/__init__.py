"""qkv: attention on the CPU, from NumPy and PyTorch.

Arrays in, arrays of the same kind out: NumPy arrays give NumPy arrays, torch tensors give torch
tensors. Contiguous float32, bfloat16 and float16 inputs are read where they lie (no copy), results are
written straight into the returned arrays, and the GIL is released while qkv computes. With torch
tensors that require grad, the functions are differentiable (qkv's fused backward), twice (a
gradient penalty). Torch tensors go through the operator torch.ops.qkv.attention, which
torch.jit.trace records, torch.fx keeps as one node, and meta tensors run through.

- ``attention``: the whole contract (scores, masks, options) in qkv's ``[B, N, H, D]`` layout.
- ``scaled_dot_product_attention``: PyTorch's signature and ``[..., H, N, D]`` layout.
- ``flash_attn_func``, ``flash_attn_varlen_func``: FlashAttention's signatures and layout.
- ``flash_attn_with_kvcache``: a generation step against a KV cache (contiguous or paged),
  appended in place, rotary embeddings fused (FlashAttention's signature).
- ``flex_attention``, ``create_block_mask``, ``and_masks``, ``or_masks``, ``noop_mask``:
  PyTorch's FlexAttention (block masks from a mask_mod, a score_mod) with a backward;
  ``qkv.score_mods``: the score_mods it runs natively (ALiBi, soft cap, relative bias, scales).
- ``explain``: the four steps of attention on a sentence (projections, scores, weights,
  output) as arrays, the numbers ``qkv explain`` prints.
- ``qkv.nn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` computing with qkv;
  ``qkv.nn.DifferentialAttention``: the Differential Transformer's attention on qkv's.

Errors are ``qkv.Error`` (bad shapes, dtypes or values, the message naming the argument, the
expected and the given), which is both a ``ValueError`` and a ``RuntimeError`` (what PyTorch
raises for the same mistakes), or ``TypeError`` (a dtype qkv does not read).
"""
from ._functions import (attention, flash_attn_func, flash_attn_varlen_func,
                         scaled_dot_product_attention, simd_target)
from . import score_mods
from ._explain import Explanation, explain
from ._kv_cache import flash_attn_with_kvcache
from ._flex import (BlockMask, and_masks, create_block_mask, flex_attention, noop_mask,
                    or_masks)
from ._qkv import Error

__all__ = ["attention", "scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache",
           "flex_attention", "create_block_mask", "BlockMask", "and_masks", "or_masks",
           "noop_mask", "score_mods", "explain", "Explanation", "simd_target", "Error", "nn"]


def __getattr__(name):
    # qkv.nn needs torch: it is imported when first used.
    if name == "nn":
        import importlib
        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'qkv' has no attribute '{name}'")
