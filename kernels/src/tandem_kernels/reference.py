"""Plain-torch references for every Tandem kernel; also the engine's CPU path.

Each function has the signature and shapes of its public op in `tandem_kernels` (the package
docstring holds the contract). Half and bf16 inputs are upcast so the softmax accumulates in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its cache slot, in place."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    # view (not reshape) so a non-contiguous cache fails loudly instead of writing into a copy
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)
    # index_put_, not index_copy_: on CPU the latter parallelises tiny copies across OpenMP threads
    # and becomes 100x slower when the cores are busy (measured: 16 ms vs 0.2 ms for 256 tokens).
    if slot_mapping.device.type == "cpu" and bool((slot_mapping < 0).any()):
        # Padding rows (slot -1) are skipped, as the Triton kernel does. Only checked on the CPU,
        # where it costs no device sync; padded batches only exist on the CUDA-graph path.
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_slots[slot_mapping] = key
    v_slots[slot_mapping] = value


def gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int, upcast: bool = True
) -> torch.Tensor:
    """Copy out the first `num_blocks` pages of each table row: [rows, kv_heads, kv_len, head_dim],
    half precision upcast to float32 unless `upcast` is False (for kernels that sum in float32)."""
    pages = cache[block_tables[:, :num_blocks].long()]  # [rows, num_blocks, block_size, kv_heads, head_dim]
    rows, _, block_size, num_kv_heads, head_dim = pages.shape
    kv = pages.view(rows, num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
    # The softmax must accumulate in fp32; upcasting the gathered copy is cheaper than a second pass.
    return kv.float() if upcast and kv.dtype in _LOW_PRECISION else kv


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attend one query token per sequence to its paged KV; returns [num_seqs, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_len = int(context_lens.max())
    num_blocks = -(-max_len // block_size)
    k = gather_kv(k_cache, block_tables, num_blocks)  # [num_seqs, kv_heads, kv_len, head_dim]
    v = gather_kv(v_cache, block_tables, num_blocks)
    positions = torch.arange(k.shape[2], device=q.device)
    mask = positions[None, :] < context_lens[:, None].to(q.device)  # [num_seqs, kv_len]
    # A group's query heads h = kv_head * group + g share one kv head, so they can stand in
    # for SDPA's query-length axis: no GQA expansion of K/V and one batched matmul per group.
    grouped_q = q.reshape(num_seqs, num_kv_heads, group, head_dim).to(k.dtype)
    out = F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _causal_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [1, heads, q_len, dim] are the last q_len positions of k/v [1, kv_heads, kv_len, dim]."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    # SDPA's is_causal aligns the diagonal top-left; a cached prefix needs it bottom-right.
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    mask = q_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def host_ints(values: torch.Tensor | Sequence[int]) -> list[int]:
    """Lengths or bounds as a host list: a list as it is, a tensor read (on a GPU, a sync)."""
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor | Sequence[int],
    context_lens: torch.Tensor | Sequence[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention for packed query chunks whose KV is already in the cache; returns q's shape.

    Query i of sequence s sits at position context_lens[s] - q_len + i, so a chunk after a
    cached prefix sees the whole prefix plus the chunk's own earlier tokens.
    """
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    # One host sync for the lengths rather than one per sequence (none for host lists).
    starts = host_ints(cu_seqlens_q)
    lens = host_ints(context_lens)
    for s, kv_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-kv_len // block_size)
        k = gather_kv(k_cache, block_tables[s : s + 1], num_blocks)[:, :, :kv_len]
        v = gather_kv(v_cache, block_tables[s : s + 1], num_blocks)[:, :, :kv_len]
        q_s = q[q_start:q_end].transpose(0, 1).unsqueeze(0).to(k.dtype)  # [1, num_heads, q_len, head_dim]
        out[q_start:q_end] = _causal_chunk_attention(q_s, k, v, scale)[0].transpose(0, 1).to(q.dtype)
    return out


@dataclass(frozen=True)
class DecodeBucket:
    """Decoding sequences of similar context length, attended to in one batched call."""

    rows: torch.Tensor  # [n] int64: each sequence's query row
    blocks: torch.Tensor  # [n * blocks_each] int64: each one's blocks, padded with its last block
    mask: torch.Tensor | None  # [n, 1, 1, kv_len] bool, True inside a context; None: no padding
    kv_len: int  # positions per sequence after padding


def plan_decode_buckets(
    block_tables: Sequence[Sequence[int]],
    context_lens: Sequence[int],
    block_size: int,
    max_padding: float = 0.1,
    position_bytes: int = 0,
    max_bucket_bytes: int = 8 << 20,
) -> list[DecodeBucket]:
    """Group decoding sequences (query rows 0, 1, ... in order) for `gathered_attention`.

    Sorted by length, a bucket grows while its padding to its longest member stays within
    `max_padding` of the blocks it holds, and while its gathered K and V (`position_bytes` per
    position) fit in `max_bucket_bytes`, so attention reads them from cache right after the
    gather. Measured per layer on this project's CI machines (SmolLM2's 3 KV heads), against one
    gather of every context followed by one call per sequence: 64 sequences of 33-96 tokens
    1.65 -> 0.52 ms, 64 of 100-2,000 tokens 42 -> 9 ms (the one large gather left its copy out
    of cache); one bucket per batch instead was 69 ms there (padding and cache misses). Built
    once per step, on the host."""
    lens = [-(-c // block_size) for c in context_lens]
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    groups: list[list[int]] = []
    held = 0
    for i in order:
        padded = (len(groups[-1]) + 1) * lens[i] if groups else 0
        if (
            groups
            and padded <= (1 + max_padding) * (held + lens[i])
            and padded * block_size * position_bytes <= max_bucket_bytes
        ):
            groups[-1].append(i)
            held += lens[i]
        else:
            groups.append([i])
            held = lens[i]
    buckets = []
    for members in groups:
        width = lens[members[-1]]  # the longest: sorted
        blocks: list[int] = []
        for i in members:
            table = list(block_tables[i][: lens[i]])
            blocks += table + table[-1:] * (width - lens[i])
        kv_len = width * block_size
        ctx = torch.tensor([context_lens[i] for i in members])
        if len(members) == 1:
            kv_len, mask = int(ctx[0]), None  # sliced to its context: no mask
        elif bool((ctx == kv_len).all()):
            mask = None
        else:
            mask = (torch.arange(kv_len)[None, :] < ctx[:, None])[:, None, None, :]
        rows = torch.tensor(members, dtype=torch.int64)
        buckets.append(DecodeBucket(rows, torch.tensor(blocks, dtype=torch.int64), mask, kv_len))
    return buckets


def _bucket_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: DecodeBucket, scale: float
) -> torch.Tensor:
    """[n, num_heads, head_dim]: the bucket's queries over their padded, masked contexts."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    n = b.rows.numel()
    width = b.blocks.numel() // n * block_size
    k = k_cache.index_select(0, b.blocks).view(n, width, num_kv_heads, head_dim)[:, : b.kv_len]
    v = v_cache.index_select(0, b.blocks).view(n, width, num_kv_heads, head_dim)[:, : b.kv_len]
    # A group's query heads stand in for SDPA's query axis: no GQA expansion of K/V.
    qs = q.index_select(0, b.rows).view(n, num_kv_heads, -1, head_dim)
    out = F.scaled_dot_product_attention(
        qs, k.transpose(1, 2), v.transpose(1, 2), attn_mask=b.mask, scale=scale
    )
    return out.reshape(n, -1, head_dim)


def gathered_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_blocks: torch.Tensor,
    cu_seqlens_q: list[int],
    context_lens: list[int],
    scale: float,
    decode_buckets: Sequence[DecodeBucket] = (),
) -> torch.Tensor:
    """Causal attention for packed query chunks over KV gathered block by block; the CPU path.

    kv_blocks [total_blocks] int64 lists, sequence after sequence, the cache blocks holding each
    sequence's context (ceil(context_len / block_size) of them, this step's tokens included);
    the offsets are host lists so the loop needs no device sync. Copying whole blocks moves the
    context in a few large rows (12 KiB for SmolLM2) instead of one 768-byte row per token, and
    skipping padding to the longest sequence is what makes mixed-length batches cheap on a CPU.

    `decode_buckets` (`plan_decode_buckets`) take the decoding sequences in batched calls; the
    chunks listed by kv_blocks / cu_seqlens_q / context_lens are then the others, whose query rows
    start at cu_seqlens_q[0].
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for b in decode_buckets:
        out[b.rows] = _bucket_attention(q, k_cache, v_cache, b, scale)  # index_put_: see store_kvcache
    if len(cu_seqlens_q) < 2:
        return out
    k = k_cache.index_select(0, kv_blocks).view(-1, num_kv_heads, head_dim)  # [blocks * bs, heads, dim]
    v = v_cache.index_select(0, kv_blocks).view(-1, num_kv_heads, head_dim)
    k0 = 0
    for s in range(len(cu_seqlens_q) - 1):
        q0, q1 = cu_seqlens_q[s], cu_seqlens_q[s + 1]
        ctx = context_lens[s]
        q_len = q1 - q0
        ks = k[k0 : k0 + ctx].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, kv_len, dim]
        vs = v[k0 : k0 + ctx].transpose(0, 1).unsqueeze(0)
        k0 += -(-ctx // block_size) * block_size
        if q_len == 1:
            # A group's query heads stand in for SDPA's query axis: no GQA expansion, no mask.
            qs = q[q0].view(1, num_kv_heads, group, head_dim)
            out[q0] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).view(num_heads, head_dim)
            continue
        qs = q[q0:q1].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, dim]
        out[q0:q1] = _causal_chunk_attention(qs, ks, vs, scale)[0].transpose(0, 1)
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm of x, or of x + residual (then also returned: the layer's new residual).

    The statistics are float32; the normalised row is rounded to x's dtype before the weight
    multiplies it, as in Hugging Face's LlamaRMSNorm.
    """
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, x)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, heads, D] and k [T, kv_heads, D] by their tokens' angles (cos, sin: [T, 1, D],
    each half the same), the rotate-half layout of Llama; new tensors, rounded after each op."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up] along the last dimension: [T, 2I] -> [T, I]."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up
