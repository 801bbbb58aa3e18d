"""Plain-torch references for the LoRA ops, the metadata builder they share; also the engine's CPU path.

Each op has the signature and shapes of its public op in `tandem_kernels` (the package docstring
holds the contract). Work is done per token group, i.e. per adapter: one gather, one GEMM and one
scatter for all of an adapter's tokens, however many requests they come from, and plain views
instead of the gather and scatter when those tokens are consecutive (a prefill). Half and bf16
inputs are upcast so every product accumulates in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lora_token_groups(
    seq_lens: Sequence[int], seq_slots: Sequence[int | None], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the tokens of packed sequences by adapter slot: (token_indices, group_offsets, group_slots).

    seq_lens[i] tokens of sequence i follow those of sequence i - 1 in the batch; seq_slots[i] is
    the adapter slot it uses, or None for the base model alone (its tokens join no group). There is
    one group per distinct slot, in ascending slot order, and its tokens keep their batch order.
    """
    if len(seq_lens) != len(seq_slots):
        raise ValueError(f"{len(seq_lens)} sequence lengths but {len(seq_slots)} slots")
    ranges: dict[int, list[torch.Tensor]] = {}
    start = 0
    for n, slot in zip(seq_lens, seq_slots):
        if n < 0:
            raise ValueError(f"negative sequence length {n}")
        if slot is not None:
            if slot < 0:
                raise ValueError(f"adapter slot {slot} is negative; use None for no adapter")
            ranges.setdefault(slot, []).append(torch.arange(start, start + n, dtype=torch.int64))
        start += n
    slots = sorted(ranges)
    chunks = [torch.cat(ranges[s]) for s in slots]
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + len(c))
    token_indices = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
    return (
        token_indices.to(device),
        torch.tensor(offsets, dtype=torch.int32, device=device),
        torch.tensor(slots, dtype=torch.int32, device=device),
    )


def _groups(
    ranks: torch.Tensor,
    scaling: torch.Tensor | None,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
):
    """Yield (slot, rank, scale, rows) per non-empty group; one host sync for all the per-adapter values.

    rows indexes the group's tokens: a slice when they are consecutive (one request, the usual
    prefill), so the caller works on views without a gather and a scatter; else the index tensor.
    """
    offsets = group_offsets.tolist()
    slots = group_slots.tolist()
    rank_of = ranks.tolist()
    scale_of = scaling.tolist() if scaling is not None else [None] * len(rank_of)
    assert len(offsets) == len(slots) + 1, (group_offsets.shape, group_slots.shape)
    # Host values are cheaper than a few tiny tensor ops per group. Tokens are distinct (the
    # contract), so a group whose span is its size holds exactly the tokens of that range.
    idx_list = token_indices.tolist()
    for g, slot in enumerate(slots):
        lo, hi = offsets[g], offsets[g + 1]
        if hi <= lo:
            continue
        group = idx_list[lo:hi]
        first, last = min(group), max(group)
        if last - first == hi - lo - 1:
            rows: slice | torch.Tensor = slice(first, last + 1)
        else:
            rows = token_indices[lo:hi]
        yield slot, rank_of[slot], scale_of[slot], rows


def _take(t: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    """t's rows: a view for a slice, a copy otherwise (index_select beats advanced indexing on CPU)."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
) -> torch.Tensor:
    """y[t] = x[t] @ lora_a[slot].T for every grouped token; returns [num_tokens, max_rank] float32.

    Rows of tokens in no group, and columns from the slot's rank on, are zero.
    """
    max_rank = lora_a.shape[1]
    y = torch.zeros(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    for slot, rank, _, rows in _groups(ranks, None, token_indices, group_offsets, group_slots):
        assert 0 < rank <= max_rank, (slot, rank, max_rank)
        a = lora_a[slot, :rank].float()  # [rank, hidden_in]
        y[rows, :rank] = _take(x, rows).float() @ a.T
    return y


def lora_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    out: torch.Tensor,
    scaling: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """out[t, out_offset:out_offset + hidden_out] += scaling[slot] * y[t] @ lora_b[slot].T, in place.

    Only grouped tokens are written; the sum is taken in fp32 and rounded to out's dtype once.
    """
    hidden_out, max_rank = lora_b.shape[1:]
    assert 0 <= out_offset and out_offset + hidden_out <= out.shape[1], (out_offset, hidden_out, out.shape)
    target = out[:, out_offset : out_offset + hidden_out]
    for slot, rank, scale, rows in _groups(ranks, scaling, token_indices, group_offsets, group_slots):
        assert 0 < rank <= max_rank, (slot, rank, max_rank)
        b = lora_b[slot, :, :rank].float()  # [hidden_out, rank]
        current = _take(target, rows)  # a view of out for a slice, a copy for an index tensor
        acc = current.float()  # current itself when out is fp32
        # One GEMM accumulating into the output rows: no separate product, scaling and sum passes.
        acc.addmm_(_take(y, rows)[:, :rank], b.T, alpha=scale)
        if acc is not current or not isinstance(rows, slice):
            # index_put_ on the view writes into out; index_copy_ is slow on CPU for small copies
            # (see reference.store_kvcache).
            target[rows] = acc.to(out.dtype)
