"""Prefill attention on a GPU for chunks whose KV is already in the paged cache: a prompt after a
cached prefix (a shared system prompt, an earlier turn), a long prompt's later chunks, and any
chunk scheduled in the same step as one of those.

PyTorch's fused attention over each sequence's pages, gathered in the cache's own dtype, with the
causal diagonal aligned to the last query (`causal_lower_right`). For half-precision inputs SDPA
then runs its flash kernel, which reads grouped KV heads as they are (no expansion) and sums in
float32. The reference (`reference.paged_prefill_attention`) upcasts the gathered KV to float32
and passes an explicit mask: SDPA's math path, with every query-by-position score in memory
(1 GB per layer for a 2K chunk over 4K positions of Llama-3-8B).

The gather copies a sequence's context once per layer: a few percent of the attention's own time
at prefill sizes, which are bound by arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tandem_kernels.reference import gather_kv, host_ints


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor | Sequence[int],
    context_lens: torch.Tensor | Sequence[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention for packed chunks over their cached KV (the contract of
    `tandem_kernels.paged_prefill_attention`); returns q's shape and dtype. `cu_seqlens_q` and
    `context_lens` may be host lists, which spares a synchronization per call."""
    block_size = k_cache.shape[1]
    bounds, lens = host_ints(cu_seqlens_q), host_ints(context_lens)
    if len(bounds) != len(lens) + 1 or block_tables.shape[0] < len(lens):
        raise ValueError(f"{len(lens)} sequences need {len(lens) + 1} bounds and as many table rows")
    # Imported here: `torch.nn.attention.bias` pulls in torch._dynamo, about 2 s of every
    # process's start on a CPU host, where this path never runs.
    from torch.nn.attention.bias import causal_lower_right

    out = torch.empty_like(q)
    for s, kv_len in enumerate(lens):
        start, end = bounds[s], bounds[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if not q_len <= kv_len <= block_tables.shape[1] * block_size:
            raise ValueError(f"sequence {s}: {q_len} queries over {kv_len} cached positions")
        pages = -(-kv_len // block_size)
        # [1, kv_heads, kv_len, D], the layout SDPA reads, in the cache's dtype.
        k = gather_kv(k_cache, block_tables[s : s + 1], pages, upcast=False)[:, :, :kv_len]
        v = gather_kv(v_cache, block_tables[s : s + 1], pages, upcast=False)[:, :, :kv_len]
        qs = q[start:end].transpose(0, 1).unsqueeze(0).to(k.dtype)
        o = F.scaled_dot_product_attention(
            qs, k, v, attn_mask=causal_lower_right(q_len, kv_len), scale=scale, enable_gqa=True
        )
        out[start:end] = o[0].transpose(0, 1)
    return out
