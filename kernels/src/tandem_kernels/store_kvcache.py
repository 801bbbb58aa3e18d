"""Triton kernel writing new tokens' keys and values into the paged KV cache.

Shapes:
    key, value          [num_tokens, num_kv_heads, head_dim]
    k_cache, v_cache    [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping        [num_tokens] int64, slot = block_id * block_size + offset; -1 skips the token
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    key_stride_t,
    key_stride_h,
    value_stride_t,
    value_stride_h,
    cache_stride_b,
    cache_stride_s,
    cache_stride_h,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token moves all its heads at once: a [heads, head_dim] tile is a few KiB,
    # big enough to keep a GPU busy, and the slot is loaded once.
    token = tl.program_id(0).to(tl.int64)  # int64 offsets: a large cache holds more than 2**31 elements
    slot = tl.load(slot_mapping_ptr + token)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A negative slot is a padding row (a CUDA-graph batch padded to its captured size): skip it.
    live = (offs_h[:, None] * 0 + slot) >= 0  # a [heads, 1] tensor: a scalar bool mask breaks the interpreter
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & live

    src_k = token * key_stride_t + offs_h[:, None] * key_stride_h + offs_d[None, :]
    src_v = token * value_stride_t + offs_h[:, None] * value_stride_h + offs_d[None, :]
    dst = (
        (slot // BLOCK_SIZE) * cache_stride_b
        + (slot % BLOCK_SIZE) * cache_stride_s
        + offs_h[:, None] * cache_stride_h
        + offs_d[None, :]
    )
    tl.store(k_cache_ptr + dst, tl.load(key_ptr + src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(value_ptr + src_v, mask=mask), mask=mask)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its cache slot, in place."""
    num_tokens, num_kv_heads, head_dim = key.shape
    _, block_size, cache_heads, cache_dim = k_cache.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert v_cache.shape == k_cache.shape, (v_cache.shape, k_cache.shape)
    assert (cache_heads, cache_dim) == (num_kv_heads, head_dim), (k_cache.shape, key.shape)
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype, (key.dtype, k_cache.dtype)
    assert slot_mapping.dtype == torch.int64, slot_mapping.dtype
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    # The kernel indexes both caches with k_cache's strides.
    assert k_cache.stride() == v_cache.stride(), (k_cache.stride(), v_cache.stride())
    assert k_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    assert slot_mapping.is_contiguous()
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_SIZE=block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
